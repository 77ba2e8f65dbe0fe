"""Importers: turn a corpus on disk into source documents (text + linked image files).

Three layouts:
- a Markdown corpus folder: `docs/*.md` with relative image links, `images/`, optional
  `docs.jsonl` metadata (as in ../shared/corpora);
- the MRAMG-Bench release: `doc_*.jsonl` lines `[id, content with <PIC> markers, images_list]`,
  `images_info/*_imgs_collection.json` mapping image id to `image_path` and `image_caption`,
  image files under `IMAGE/images/...`;
- a single Markdown or HTML file.

Importers never raise on bad input: they yield a `Skipped` with the reason and go on. Only regular
files inside the corpus folder are read (a symlink may point elsewhere in it, never out of it; a FIFO
or device is refused before it is read), hidden folders are not walked, a document over
`MAX_DOCUMENT_BYTES` is refused (one message's work stays bounded), and a text that Postgres cannot
store (a NUL character, a name that is not UTF-8) skips its document or line with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from services.common.contracts import StagedDocument
from services.common.text import ImageRef, ParsedDocument, image_refs_in, parse_markdown, printable, unstorable
from services.retriever.mramg import read_mramg
from services.retriever.sources import (
    MAX_DOCUMENT_BYTES,
    FileRefused,
    Item,
    LinkedImage,
    Skipped,
    SourceDocument,
    read_regular_file,
    relative_name,
)

MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}


def detect_layout(path: Path) -> str:
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ValueError(f"{printable(str(path))}: not a regular file or folder")
    if path.is_file():
        if path.suffix.lower() in MARKDOWN_SUFFIXES | HTML_SUFFIXES:
            return "file"
        raise ValueError(f"{path}: not a Markdown or HTML file (expected {sorted(MARKDOWN_SUFFIXES | HTML_SUFFIXES)})")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    if list(path.glob("doc_*.jsonl")) and (path / "images_info").is_dir():
        return "mramg"
    if (path / "docs").is_dir() or list(path.glob("*.md")):
        return "markdown-folder"
    raise ValueError(f"{path}: neither a Markdown corpus (docs/*.md) nor an MRAMG release (doc_*.jsonl + images_info/)")


def read_corpus(path: Path) -> Iterator[Item]:
    layout = detect_layout(path)
    if layout == "file":
        path = path.resolve()  # the file named on the command line, wherever a symlink to it points
        yield from read_single_file(path, root=path.parent)
    elif layout == "mramg":
        yield from read_mramg(path)
    else:
        yield from read_markdown_folder(path)


def read_text(path: Path, root: Path) -> str | Skipped:
    name = relative_name(path, root)
    try:
        data = read_regular_file(path, MAX_DOCUMENT_BYTES)
    except FileRefused as error:
        return Skipped(name, f"{error} (split it into smaller documents)" if "limit" in str(error) else str(error))
    except OSError as error:
        return Skipped(name, f"cannot read: {error.strerror or error}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return Skipped(name, f"invalid UTF-8 at byte {error.start}")
    if "\x00" in text:  # no text column takes it; in a Markdown file it means a binary or UTF-16 file
        return Skipped(name, f"{unstorable(text)}: not a text document")
    return text


def resolve_image(link: str, document_dir: Path, root: Path) -> Path | str:
    """The image file a link names, or the reason it cannot be used."""
    parsed = urlparse(link)
    if parsed.scheme in ("http", "https", "data", "ftp"):
        return f"remote image {link[:80]} is not fetched (only files of the corpus are ingested)"
    relative = unquote(parsed.path)
    candidates = [document_dir / relative, root / relative]
    root_resolved = root.resolve()
    for candidate in candidates:
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root_resolved):
            return f"{link} points outside the corpus folder"
        if resolved.is_file():
            return resolved
        if resolved.exists():
            return f"{link} is not a regular file"
    return f"missing image file {link}"


def link_images(markdown: str, document_dir: Path, root: Path, doc_key: str) -> tuple[list[LinkedImage], list[Skipped]]:
    images: list[LinkedImage] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for line in markdown.splitlines():
        _, refs = image_refs_in(line)
        for ref in refs:
            if ref.source in seen:
                continue
            seen.add(ref.source)
            found = resolve_image(ref.source, document_dir, root)
            if not isinstance(found, str) and unstorable(relative_name(found, root)):
                found = f"{ref.source} names a file whose name is not UTF-8 ({printable(relative_name(found, root))})"
            if isinstance(found, str):
                skipped.append(Skipped(f"{ref.source} (in {doc_key})", found, doc_key=doc_key))
            else:
                images.append(LinkedImage(link=ref.source, source_name=relative_name(found, root), path=found))
    return images, skipped


def empty(markdown: str) -> bool:
    parsed = parse_markdown(markdown)
    return not parsed.units and not parsed.images


# ------------------------------------------------------------------ Markdown corpus folder
def read_markdown_folder(root: Path) -> Iterator[Item]:
    meta_by_key: dict[str, dict[str, Any]] = {}
    meta_line: dict[str, int] = {}
    meta_file = root / "docs.jsonl"
    if meta_file.exists() or meta_file.is_symlink():
        for skipped_or_record in read_metadata(meta_file, root):
            if isinstance(skipped_or_record, Skipped):
                yield skipped_or_record
                continue
            line_number, doc_id, record = skipped_or_record
            if doc_id in meta_by_key:
                yield Skipped(
                    f"docs.jsonl line {line_number}", f"doc_id {doc_id!r} again (line {meta_line[doc_id]} kept)"
                )
                continue
            meta_by_key[doc_id], meta_line[doc_id] = record, line_number
    docs_dir = root / "docs" if (root / "docs").is_dir() else root
    keys: dict[str, str] = {}  # document key -> the file that took it
    for path in corpus_files(docs_dir):
        if isinstance(path, Skipped):
            yield path
            continue
        name = path.relative_to(root).as_posix()
        if path.suffix.lower() in HTML_SUFFIXES:
            yield Skipped(
                name, "an HTML file in a Markdown corpus is not read (ingest it on its own: m2io ingest FILE)"
            )
            continue
        if path.suffix.lower() not in MARKDOWN_SUFFIXES:
            continue
        if unstorable(name):
            yield Skipped(printable(name), "file name is not valid UTF-8 (rename it)")
            continue
        if path.name.lower() == "readme.md" and path.parent == docs_dir and "README" not in meta_by_key:
            # the corpus' own README is not one of its documents, unless the metadata lists it
            if path.stem not in meta_by_key:
                continue
        if not path.resolve().is_relative_to(root.resolve()):
            yield Skipped(name, "a symlink pointing outside the corpus folder (only files inside it are read)")
            continue
        doc_key = path.relative_to(docs_dir).with_suffix("").as_posix()
        if doc_key in keys:
            yield Skipped(name, f"same document key {doc_key!r} as {keys[doc_key]} (rename one of them)")
            continue
        keys[doc_key] = name
        yield from document_from_markdown_file(path, root, doc_key, meta_by_key.get(doc_key, {}))
    for doc_id, line_number in meta_line.items():
        if doc_id not in keys:
            yield Skipped(f"docs.jsonl line {line_number}", f"no document {doc_id!r} in the corpus")


def corpus_files(folder: Path) -> Iterator[Path | Skipped]:
    """Every file under `folder` in path order; hidden folders (`.git`, `.venv`) are not walked and a
    symlinked folder is not followed (it is reported)."""
    files: list[Path] = []
    for current, folders, names in os.walk(folder):
        here = Path(current)
        for child in sorted(folders):
            if not child.startswith(".") and (here / child).is_symlink():
                yield Skipped(
                    printable((here / child).relative_to(folder).as_posix()), "a symlinked folder is not followed"
                )
        folders[:] = sorted(child for child in folders if not child.startswith(".") and not (here / child).is_symlink())
        files += [here / name for name in names]
    yield from sorted(files)


def read_metadata(meta_file: Path, root: Path) -> Iterator[Skipped | tuple[int, str, dict[str, Any]]]:
    """docs.jsonl: (line number, doc_id, record) per good line; every other line skipped with why."""
    try:
        raw_lines = read_regular_file(meta_file).split(b"\n")
    except (FileRefused, OSError) as error:
        yield Skipped("docs.jsonl", f"cannot read: {getattr(error, 'strerror', None) or error}")
        return
    for line_number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        where = f"docs.jsonl line {line_number}"
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise TypeError(f"expected an object, got {type(record).__name__}")
            doc_id = record["doc_id"]
            if not isinstance(doc_id, str | int) or isinstance(doc_id, bool):
                raise TypeError("doc_id is not a string")
            if record.get("title") is not None and not isinstance(record["title"], str):
                raise TypeError("title is not a string")
            if problem := unstorable(record):
                raise ValueError(problem)
        except UnicodeDecodeError as error:
            yield Skipped(where, f"malformed metadata line: invalid UTF-8 at byte {error.start}")
        except (ValueError, KeyError, TypeError) as error:
            yield Skipped(where, f"malformed metadata line: {error}")
        else:
            yield line_number, str(doc_id), record


def document_from_markdown_file(path: Path, root: Path, doc_key: str, meta: dict[str, Any]) -> Iterator[Item]:
    text = read_text(path, root)
    if isinstance(text, Skipped):
        yield text
        return
    if empty(text):
        yield Skipped(relative_name(path, root), "empty document")
        return
    images, skipped = link_images(text, path.parent, root, doc_key)
    yield from skipped
    yield SourceDocument(
        doc_key=doc_key,
        markdown=text,
        source_path=relative_name(path, root),
        title=meta.get("title"),
        images=images,
        meta={k: v for k, v in meta.items() if k not in ("doc_id", "title")},
    )


# ------------------------------------------------------------------ single file
def read_single_file(path: Path, root: Path) -> Iterator[Item]:
    if unstorable(path.name):
        yield Skipped(printable(path.name), "file name is not valid UTF-8 (rename it)")
        return
    if path.suffix.lower() in HTML_SUFFIXES:
        text = read_text(path, root)
        if isinstance(text, Skipped):
            yield text
            return
        yield from document_from_markdown_text(html_to_markdown(text), path, root)
    else:
        yield from document_from_markdown_file(path, root, path.stem, {})


def document_from_markdown_text(markdown: str, path: Path, root: Path) -> Iterator[Item]:
    if empty(markdown):
        yield Skipped(relative_name(path, root), "empty document")
        return
    images, skipped = link_images(markdown, path.parent, root, path.stem)
    yield from skipped
    yield SourceDocument(doc_key=path.stem, markdown=markdown, source_path=relative_name(path, root), images=images)


def html_to_markdown(html: str) -> str:
    """Headings, paragraphs, list items, images (with figure captions), code and tables, in order."""
    from bs4 import BeautifulSoup, Tag

    soup = BeautifulSoup(html, "html.parser")
    for junk in soup(["script", "style", "nav", "noscript"]):
        junk.decompose()
    lines: list[str] = []

    def image_markdown(img: Tag, caption: str = "") -> str:
        alt = (img.get("alt") or "").replace("]", " ")
        title = (caption or img.get("title") or "").replace('"', "'")
        title_part = f' "{title}"' if title else ""
        return f"![{alt}]({img.get('src', '')}{title_part})"

    def inline_text(element: Tag) -> str:
        parts = []
        for child in element.descendants:
            if isinstance(child, Tag) and child.name == "img":
                parts.append(" " + image_markdown(child) + " ")
            elif isinstance(child, str) and not any(p.name == "img" for p in child.parents if isinstance(p, Tag)):
                parts.append(child)
        return " ".join("".join(parts).split())

    body = soup.body or soup
    for element in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "figure", "img", "pre", "table"]):
        if element.find_parent(["figure", "pre", "table", "li"]) and element.name != "li":
            continue
        if element.name == "li" and element.find_parent("li"):
            continue
        name = element.name
        if name.startswith("h") and len(name) == 2:
            lines += ["", "#" * int(name[1]) + " " + element.get_text(" ", strip=True), ""]
        elif name == "p":
            text = inline_text(element)
            if text:
                lines += [text, ""]
        elif name == "li":
            marker = "1." if element.find_parent("ol") else "-"
            lines.append(f"{marker} {inline_text(element)}")
        elif name == "figure":
            caption_tag = element.find("figcaption")
            caption = caption_tag.get_text(" ", strip=True) if caption_tag else ""
            for img in element.find_all("img"):
                lines += ["", image_markdown(img, caption), ""]
        elif name == "img" and not element.find_parent(["p", "li"]):
            lines += ["", image_markdown(element), ""]
        elif name == "pre":
            lines += ["```", element.get_text(), "```", ""]
        elif name == "table":
            for row in element.find_all("tr"):
                cells = [cell.get_text(" ", strip=True) for cell in row.find_all(["td", "th"])]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).strip() + "\n"


def parse_source(document: SourceDocument | StagedDocument) -> tuple[ParsedDocument, dict[str, Any]]:
    """Parse a document (as read, or as staged for indexing) into units and positioned images; images
    it does not hold (missing, rejected) are dropped from the parse but their text stays. Returns the
    parse and the document's images by link."""
    by_link = {image.link: image for image in document.images}
    if document.pic_images:
        refs = [
            ImageRef(source=link, caption=by_link[link].caption if link in by_link else "")
            for link in document.pic_images
        ]
        parsed = parse_markdown(document.markdown, pic_images=refs)
    else:
        parsed = parse_markdown(document.markdown)
    parsed.images = [ref for ref in parsed.images if ref.source in by_link]
    for ref in parsed.images:
        linked = by_link[ref.source]
        if linked.caption:
            ref.caption = linked.caption
    return parsed, by_link
