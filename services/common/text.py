"""Text of documents and answers: Markdown parsed into units, sentences, image references.

A document becomes a list of **units**: headings, sentences of paragraphs, whole list items (a
step is never cut), code blocks and tables. Units are numbered from 1; an image's **position** is
the number of units before it, so `position = 3` means "after the third unit" and 0 means
"before the first" — the same convention as the inserter's `after`.

Shared by the retriever (indexing), the generator and inserter (answers), the trainer and the metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTEXT_CHARS = 300  # text kept on each side of an image as its context

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LIST_ITEM = re.compile(r"^(\s*)([-*+]|\d{1,3}[.)])\s+(.*)$")
FENCE = re.compile(r"^\s*(```|~~~)")
# ![alt](target "title") ; the target may be wrapped in <>.
MD_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\(\s*<?(?P<src>[^)\s>]+)>?(?:\s+\"(?P<title>[^\"]*)\")?\s*\)")
HTML_IMAGE = re.compile(r"<img\s[^>]*>", re.IGNORECASE)
HTML_ATTR = re.compile(r"(\w+)\s*=\s*(\"[^\"]*\"|'[^']*')")
PIC_MARKER = "<PIC>"

# Abbreviations after which a period does not end a sentence.
ABBREVIATIONS = {
    "e.g",
    "i.e",
    "etc",
    "vs",
    "dr",
    "mr",
    "mrs",
    "ms",
    "no",
    "fig",
    "approx",
    "min",
    "max",
    "st",
    "jr",
    "sr",
    "inc",
    "ltd",
    "cf",
    "al",
    "tbsp",
    "tsp",
    "oz",
    "lb",
    "lbs",
}
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9*_`])")


@dataclass
class ImageRef:
    """An image as the document names it, before its file is read."""

    source: str  # the link target as written (relative path, MRAMG image id, URL)
    alt: str = ""
    title: str = ""
    caption: str = ""
    position: int = 0  # units before it
    context_before: str = ""
    context_after: str = ""


@dataclass
class Unit:
    kind: str  # heading | sentence | item | code | table
    text: str
    heading_path: tuple[str, ...] = ()


@dataclass
class ParsedDocument:
    units: list[Unit]
    images: list[ImageRef]
    title: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(unit.text for unit in self.units)


def split_sentences(paragraph: str) -> list[str]:
    """Split prose at sentence ends, not after common abbreviations or inside decimals."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    pieces: list[str] = []
    start = 0
    for match in SENTENCE_END.finditer(text):
        candidate = text[start : match.start()].strip()
        last_word = candidate.rsplit(" ", 1)[-1].rstrip(".!?\"')]").lower()
        if last_word in ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
            continue
        pieces.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces


def image_refs_in(line: str) -> tuple[str, list[ImageRef]]:
    """The line without its images, and the images it held (Markdown and HTML `<img>`)."""
    found: list[tuple[int, ImageRef]] = []
    for match in MD_IMAGE.finditer(line):
        found.append(
            (
                match.start(),
                ImageRef(source=match["src"], alt=match["alt"].strip(), title=(match["title"] or "").strip()),
            )
        )
    for match in HTML_IMAGE.finditer(line):
        attrs = {key.lower(): value[1:-1] for key, value in HTML_ATTR.findall(match.group(0))}
        if "src" in attrs:
            found.append(
                (
                    match.start(),
                    ImageRef(
                        source=attrs["src"],
                        alt=attrs.get("alt", "").strip(),
                        title=attrs.get("title", "").strip(),
                    ),
                )
            )
    stripped = HTML_IMAGE.sub(" ", MD_IMAGE.sub(" ", line))
    return stripped, [ref for _, ref in sorted(found, key=lambda pair: pair[0])]


def parse_markdown(markdown: str, *, pic_images: list[ImageRef] | None = None) -> ParsedDocument:
    """Parse Markdown into units and positioned images.

    `pic_images`: for MRAMG-style text, the images that the `<PIC>` markers stand for, in order.
    """
    units: list[Unit] = []
    images: list[ImageRef] = []
    headings: list[tuple[int, str]] = []
    paragraph: list[str] = []
    pending_pics = list(pic_images or [])
    title = None

    def path() -> tuple[str, ...]:
        return tuple(text for _, text in headings)

    def flush_paragraph() -> None:
        if paragraph:
            for sentence in split_sentences(" ".join(paragraph)):
                units.append(Unit("sentence", sentence, path()))
            paragraph.clear()

    def place(ref: ImageRef) -> None:
        flush_paragraph()
        ref.position = len(units)
        images.append(ref)

    lines = markdown.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if FENCE.match(line):
            flush_paragraph()
            block = [line]
            while index < len(lines):
                block.append(lines[index])
                index += 1
                if FENCE.match(block[-1]):
                    break
            units.append(Unit("code", "\n".join(block), path()))
            continue
        if PIC_MARKER in line:
            before, *rest = line.split(PIC_MARKER)
            segments = [before, *rest]
            for number, segment in enumerate(segments):
                if segment.strip():
                    paragraph.append(segment.strip())
                if number < len(segments) - 1:
                    if pending_pics:
                        place(pending_pics.pop(0))
                    # a marker without an image is dropped: nothing to show there
            continue
        stripped, refs = image_refs_in(line)
        if refs and not stripped.strip():
            for ref in refs:
                place(ref)
            continue
        if not line.strip():
            flush_paragraph()
            continue
        heading = HEADING.match(line)
        if heading:
            flush_paragraph()
            level, text = len(heading[1]), heading[2].strip()
            headings[:] = [(lvl, txt) for lvl, txt in headings if lvl < level] + [(level, text)]
            if title is None and level == 1:
                title = text
            units.append(Unit("heading", text, path()))
            for ref in refs:
                place(ref)
            continue
        if line.lstrip().startswith("|"):
            flush_paragraph()
            block = [line]
            while index < len(lines) and lines[index].lstrip().startswith("|"):
                block.append(lines[index])
                index += 1
            units.append(Unit("table", "\n".join(block), path()))
            continue
        item = LIST_ITEM.match(stripped)
        if item:
            flush_paragraph()
            text_parts = [item[3].strip()] if item[3].strip() else []
            indent = len(item[1])
            item_refs = list(refs)
            # continuation lines: indented deeper, not a new item of the same or outer level
            while index < len(lines) and lines[index].strip():
                nxt = lines[index]
                nested = LIST_ITEM.match(nxt)
                if nested or HEADING.match(nxt) or FENCE.match(nxt):
                    break
                if len(nxt) - len(nxt.lstrip()) <= indent and not nxt.startswith(" "):
                    break
                more, more_refs = image_refs_in(nxt)
                if more.strip():
                    text_parts.append(more.strip())
                item_refs += more_refs
                index += 1
            marker = item[2]
            text = " ".join(text_parts)
            if text:
                prefix = f"{marker} " if marker[0].isdigit() else "- "
                units.append(Unit("item", (" " * indent) + prefix + text, path()))
            for ref in item_refs:
                place(ref)
            continue
        if stripped.strip():
            paragraph.append(stripped.strip())
        for ref in refs:
            # an image inside a paragraph stands after the sentences written before it
            place(ref)
    flush_paragraph()
    for ref in pending_pics:  # more images than markers: they go at the end
        ref.position = len(units)
        images.append(ref)
    add_context(units, images)
    return ParsedDocument(units=units, images=images, title=title)


def add_context(units: list[Unit], images: list[ImageRef]) -> None:
    for ref in images:
        before = " ".join(unit.text for unit in units[max(0, ref.position - 3) : ref.position])
        after = " ".join(unit.text for unit in units[ref.position : ref.position + 3])
        ref.context_before = before[-CONTEXT_CHARS:]
        ref.context_after = after[:CONTEXT_CHARS]
        if not ref.caption:
            ref.caption = ref.title or ref.alt
