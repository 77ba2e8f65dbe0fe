"""Importers: turn a corpus on disk into source documents (text + linked image files).

Three layouts:
- a Markdown corpus folder: `docs/*.md` with relative image links, `images/`, optional
  `docs.jsonl` metadata (as in ../shared/corpora);
- the MRAMG-Bench release: `doc_*.jsonl` lines `[id, content with <PIC> markers, images_list]`,
  `images_info/*_imgs_collection.json` mapping image id to `image_path` and `image_caption`,
  image files under `IMAGE/images/...`;
- a single Markdown or HTML file.

Importers never raise on bad input: they yield a `Skipped` with the reason and go on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from services.common.contracts import StagedDocument
from services.common.text import ImageRef, ParsedDocument, image_refs_in, parse_markdown

MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}


@dataclass
class LinkedImage:
    link: str  # the reference as the document writes it (path, or MRAMG image id)
    source_name: str  # path relative to the corpus root: the image's name in answers and evaluations
    path: Path
    caption: str = ""


@dataclass
class SourceDocument:
    doc_key: str
    markdown: str  # Markdown; `pic` documents use <PIC> markers that stand for `pic_images` in order
    source_path: str
    title: str | None = None
    images: list[LinkedImage] = field(default_factory=list)
    pic_images: list[str] = field(default_factory=list)  # links, in marker order (MRAMG)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    what: str  # the file, line or image concerned
    reason: str
    doc_key: str | None = None  # set when the document itself still goes in (a bad image of it)


Item = SourceDocument | Skipped


def detect_layout(path: Path) -> str:
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
        yield from read_single_file(path, root=path.parent)
    elif layout == "mramg":
        yield from read_mramg(path)
    else:
        yield from read_markdown_folder(path)


def read_text(path: Path, root: Path) -> str | Skipped:
    name = relative_name(path, root)
    try:
        data = path.read_bytes()
    except OSError as error:
        return Skipped(name, f"cannot read: {error.strerror or error}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return Skipped(name, f"invalid UTF-8 at byte {error.start}")
    return text


def relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


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
    meta_file = root / "docs.jsonl"
    if meta_file.exists():
        for line_number, line in enumerate(meta_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                meta_by_key[str(record["doc_id"])] = record
            except (ValueError, KeyError, TypeError) as error:
                yield Skipped(f"docs.jsonl line {line_number}", f"malformed metadata line: {error}")
    docs_dir = root / "docs" if (root / "docs").is_dir() else root
    for path in sorted(p for p in docs_dir.rglob("*") if p.suffix.lower() in MARKDOWN_SUFFIXES):
        if path.name.lower() == "readme.md" and path.parent == docs_dir and "README" not in meta_by_key:
            # the corpus' own README is not one of its documents, unless the metadata lists it
            if path.stem not in meta_by_key:
                continue
        doc_key = path.relative_to(docs_dir).with_suffix("").as_posix()
        yield from document_from_markdown_file(path, root, doc_key, meta_by_key.get(doc_key, {}))


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


# ------------------------------------------------------------------ MRAMG-Bench release
def read_mramg(root: Path) -> Iterator[Item]:
    catalogue: dict[str, dict[str, Any]] = {}
    for info_file in sorted((root / "images_info").glob("*.json")):
        try:
            entries = json.loads(info_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            yield Skipped(relative_name(info_file, root), f"malformed image catalogue: {error}")
            continue
        if not isinstance(entries, dict):
            yield Skipped(relative_name(info_file, root), "image catalogue is not an object of image id -> info")
            continue
        for image_id, info in entries.items():
            if isinstance(info, dict):
                catalogue[str(image_id)] = info
    for doc_file in sorted(root.glob("doc_*.jsonl")):
        subset = doc_file.stem.removeprefix("doc_")
        try:
            raw_lines = doc_file.read_bytes().split(b"\n")
        except OSError as error:
            yield Skipped(doc_file.name, f"cannot read: {error}")
            continue
        for line_number, raw in enumerate(raw_lines, 1):
            if not raw.strip():
                continue
            where = f"{doc_file.name} line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Skipped(where, f"invalid UTF-8 at byte {error.start}")
                continue
            try:
                record = json.loads(line)
                doc_id, content, image_ids = record[0], record[1], record[2]
                if not isinstance(content, str) or not isinstance(image_ids, list):
                    raise TypeError("expected [id, text, [image ids]]")
            except (ValueError, IndexError, TypeError, KeyError) as error:
                yield Skipped(where, f"malformed line: {error}")
                continue
            doc_key = f"{subset}/{doc_id}"
            if not content.strip() and not image_ids:
                yield Skipped(where, "empty document")
                continue
            images: list[LinkedImage] = []
            pic_links: list[str] = []
            for image_id in image_ids:
                image_id = str(image_id)
                info = catalogue.get(image_id)
                if info is None or not info.get("image_path"):
                    yield Skipped(f"image {image_id} (in {doc_key})", "image id not in images_info", doc_key=doc_key)
                    pic_links.append(image_id)  # keeps the markers aligned; no file, so it is left out
                    continue
                found = resolve_mramg_image(str(info["image_path"]), root)
                pic_links.append(image_id)
                if isinstance(found, str):
                    yield Skipped(f"image {image_id} (in {doc_key})", found, doc_key=doc_key)
                    continue
                images.append(
                    LinkedImage(
                        link=image_id,
                        source_name=relative_name(found, root),
                        path=found,
                        caption=str(info.get("image_caption") or ""),
                    )
                )
            yield SourceDocument(
                doc_key=doc_key,
                markdown=content,
                source_path=where,
                title=None,
                images=images,
                pic_images=pic_links,
                meta={"subset": subset},
            )


def resolve_mramg_image(image_path: str, root: Path) -> Path | str:
    relative = image_path.lstrip("/")
    for base in (root, root / "IMAGE", root / "IMAGE" / "images"):
        candidate = (base / relative).resolve()
        if candidate.is_relative_to(root.resolve()) and candidate.is_file():
            return candidate
    return f"missing image file {image_path}"


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
