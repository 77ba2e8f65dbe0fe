"""Text of documents and answers: Markdown parsed into units, sentences, image references.

A document becomes a list of **units**: headings, sentences of paragraphs, whole list items (a
step is never cut), code blocks and tables. Units are numbered from 1; an image's **position** is
the number of units before it, so `position = 3` means "after the third unit" and 0 means
"before the first" — the same convention as the inserter's `after`.

Shared by the retriever (indexing), the generator and inserter (answers), the trainer and the metrics.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

CONTEXT_CHARS = 300  # text kept on each side of an image as its context

# Every pattern here runs on text from documents and gold answers, so each is linear in its input:
# no two quantifiers compete for the same characters, and a scan that fails is not started again
# from every later position (tests/test_text_linear.py, bench/text_parsing.py). The heading and
# image syntax are read by hand (`heading_of`, `markdown_images`) for that reason.
LIST_ITEM = re.compile(r"^(\s*)([-*+]|\d{1,3}[.)])\s+(.*)$")
FENCE = re.compile(r"^\s*(```|~~~)")
# ![alt](target "title"); the target may be wrapped in <>. After the `](`, read by `markdown_images`:
IMAGE_TARGET = re.compile(r"\s*+<?(?P<src>[^)\s>]++)")
IMAGE_END = re.compile(r">?+(?:\s++\"(?P<title>[^\"]*+)\")?+\s*+\)")
HTML_IMAGE_START = re.compile(r"<img\s", re.IGNORECASE)
HTML_ATTR = re.compile(r"(?<!\w)(\w++)\s*+=\s*+(\"[^\"]*+\"|'[^']*+')")
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
    level: int = 0  # a heading's level (1-6); 0 for every other kind


@dataclass
class ParsedDocument:
    units: list[Unit]
    images: list[ImageRef]
    title: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(unit.text for unit in self.units)


def unstorable(value: object) -> str | None:
    """Why a text, or a JSON value holding texts, cannot go into Postgres as it is (a NUL character,
    which no text column takes, or a lone surrogate, which is not UTF-8); None when it can."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            stack += item
        elif isinstance(item, str):
            if "\x00" in item:
                return f"contains a NUL character (at character {item.index(chr(0))})"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                return f"holds a character that is not UTF-8 (a lone surrogate at character {error.start})"
    return None


def printable(text: str) -> str:
    """A name or message safe to store and show: bytes of a file name that are not UTF-8 as `\\xff`, NUL
    as `\\x00` (what is reported about a bad input must not fail the way the input did)."""
    try:
        data = text.encode("utf-8", "surrogateescape")  # a file name's bytes, as os.fsdecode kept them
    except UnicodeEncodeError:  # a lone surrogate from elsewhere (a JSON escape)
        data = text.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def split_sentences(paragraph: str) -> list[str]:
    """Split prose at sentence ends, not after common abbreviations or inside decimals."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    pieces: list[str] = []
    start = 0
    for match in SENTENCE_END.finditer(text):
        # the last word before the break, read without copying the sentence so far (an abbreviation
        # keeps `start` where it is, and a copy per match would make a paragraph of them quadratic)
        end = match.start()
        last_word = text[max(start, text.rfind(" ", start, end) + 1) : end].rstrip(".!?\"')]").lower()
        if last_word in ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
            continue
        pieces.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces


CLAUSE_END = re.compile(r"(?<=[.!?:])\s+")  # cruder than SENTENCE_END: what an image's context is cut at


def last_sentence(text: str | None) -> str:
    """The last sentence of an image's text before it: what the image followed."""
    if not text:
        return ""
    pieces = CLAUSE_END.split(text.strip())
    return pieces[-1] if pieces else ""


def first_sentence(text: str | None) -> str:
    """The first sentence of an image's text after it: what the image preceded."""
    if not text:
        return ""
    return CLAUSE_END.split(text.strip())[0]


def heading_of(line: str) -> tuple[int, str] | None:
    """An ATX heading's level and text (`## Title ##` -> (2, "Title")), or None: what
    `^(#{1,6})\\s+(.*?)\\s*#*\\s*$` matched, read in one pass (that pattern is cubic in a run of spaces)."""
    level = len(line) - len(line.lstrip("#"))
    if not 1 <= level <= 6 or not line[level : level + 1].isspace():
        return None
    return level, line[level:].rstrip().rstrip("#").strip()


def markdown_images(line: str) -> list[tuple[int, int, ImageRef]]:
    """The Markdown images of a line as (start, end, ref), leftmost first, as `re.finditer` would find
    `!\\[([^\\]]*)\\]\\(\\s*<?([^)\\s>]+)>?(?:\\s+"([^"]*)")?\\s*\\)` — in linear time.

    The alt text holds no `]`, so every `![` between two `]` ends at the second one: each `]` is tried
    once, from the leftmost `![` before it. A target that failed leaves the run of target characters it
    read; a later try starting inside that run reaches the same end and fails the same way.
    """
    found: list[tuple[int, int, ImageRef]] = []
    low = 0  # no image starts before this
    failed_run_end = -1  # a target starting before this fails (it ends where a failed one ended)
    close = line.find("]")
    while close != -1:
        start = line.find("![", low, close) if close >= low and line.startswith("(", close + 1) else -1
        end = -1
        if start != -1 and close + 2 >= failed_run_end:
            target = IMAGE_TARGET.match(line, close + 2)
            rest = IMAGE_END.match(line, target.end()) if target else None
            if rest:
                end = rest.end()
                title = (rest["title"] or "").strip()
                found.append(
                    (start, end, ImageRef(source=target["src"], alt=line[start + 2 : close].strip(), title=title))
                )
            elif target:
                failed_run_end = target.end()
        low = end if end != -1 else close + 1
        close = line.find("]", low)
    return found


def html_images(line: str) -> list[tuple[int, int, ImageRef | None]]:
    """The `<img ...>` tags of a line as (start, end, ref); ref is None for a tag without `src`."""
    found: list[tuple[int, int, ImageRef | None]] = []
    position = 0
    while (start := HTML_IMAGE_START.search(line, position)) is not None:
        end = line.find(">", start.end())
        if end == -1:  # no tag closes after this one: none of the later ones closes either
            break
        tag = line[start.start() : end + 1]
        attrs = {key.lower(): value[1:-1] for key, value in HTML_ATTR.findall(tag)}
        ref = None
        if "src" in attrs:
            ref = ImageRef(source=attrs["src"], alt=attrs.get("alt", "").strip(), title=attrs.get("title", "").strip())
        found.append((start.start(), end + 1, ref))
        position = end + 1
    return found


def without_spans(line: str, spans: list[tuple[int, int, object]]) -> str:
    """The line with each (start, end) span replaced by one space."""
    pieces, position = [], 0
    for start, end, _ in spans:
        pieces += [line[position:start], " "]
        position = end
    return "".join(pieces) + line[position:]


def image_refs_in(line: str) -> tuple[str, list[ImageRef]]:
    """The line without its images, and the images it held (Markdown and HTML `<img>`)."""
    markdown = markdown_images(line)
    found = [(start, ref) for start, _, ref in markdown]
    found += [(start, ref) for start, _, ref in html_images(line) if ref is not None]
    without_markdown = without_spans(line, markdown)
    stripped = without_spans(without_markdown, html_images(without_markdown))
    return stripped, [ref for _, ref in sorted(found, key=lambda pair: pair[0])]


def parse_markdown(markdown: str, *, pic_images: list[ImageRef] | None = None) -> ParsedDocument:
    """Parse Markdown into units and positioned images.

    `pic_images`: for MRAMG-style text, the images that the `<PIC>` markers stand for, in order.
    """
    units: list[Unit] = []
    images: list[ImageRef] = []
    headings: list[tuple[int, str]] = []
    paragraph: list[str] = []
    pending_pics = deque(pic_images or [])
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
        if PIC_MARKER in line and not LIST_ITEM.match(line):
            before, *rest = line.split(PIC_MARKER)
            segments = [before, *rest]
            for number, segment in enumerate(segments):
                if segment.strip():
                    paragraph.append(segment.strip())
                if number < len(segments) - 1:
                    if pending_pics:
                        place(pending_pics.popleft())
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
        heading = heading_of(line)
        if heading:
            flush_paragraph()
            level, text = heading
            headings[:] = [(lvl, txt) for lvl, txt in headings if lvl < level] + [(level, text)]
            if title is None and level == 1:
                title = text
            units.append(Unit("heading", text, path(), level))
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
            item_refs = list(refs)
            first = pics_out(item[3], pending_pics, item_refs)
            text_parts = [first] if first else []
            indent = len(item[1])
            # continuation lines: indented deeper, not a new item of the same or outer level
            while index < len(lines) and lines[index].strip():
                nxt = lines[index]
                nested = LIST_ITEM.match(nxt)
                if nested or heading_of(nxt) or FENCE.match(nxt):
                    break
                if len(nxt) - len(nxt.lstrip()) <= indent and not nxt.startswith(" "):
                    break
                more, more_refs = image_refs_in(nxt)
                item_refs += more_refs
                more = pics_out(more, pending_pics, item_refs)
                if more:
                    text_parts.append(more)
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


def pics_out(text: str, pending: deque[ImageRef], refs: list[ImageRef]) -> str:
    """An item's text without its <PIC> markers; each marker's image joins `refs` (it stands after the
    item, as an image link inside an item does). A marker without an image left is dropped."""
    for _ in range(text.count(PIC_MARKER)):
        if pending:
            refs.append(pending.popleft())
    return " ".join(text.replace(PIC_MARKER, " ").split())


def add_context(units: list[Unit], images: list[ImageRef]) -> None:
    for ref in images:
        # each unit cut to the context length first: the same context, and images in a row after one
        # huge unit do not copy it once each
        before = " ".join(unit.text[-CONTEXT_CHARS:] for unit in units[max(0, ref.position - 3) : ref.position])
        after = " ".join(unit.text[:CONTEXT_CHARS] for unit in units[ref.position : ref.position + 3])
        ref.context_before = before[-CONTEXT_CHARS:]
        ref.context_after = after[:CONTEXT_CHARS]
        if not ref.caption:
            ref.caption = ref.title or ref.alt
