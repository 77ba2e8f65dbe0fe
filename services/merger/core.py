"""The merger: an answer's units and its insertion plan become one interleaved answer, as
Markdown (image links by source name), self-contained HTML (images embedded) and JSON blocks.

Text from documents is untrusted. The HTML renders it with markdown-it with raw HTML off (a `<script>`
shows as text) and links only to safe targets; the stored Markdown escapes it (`markdown_text`)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from functools import cache
from typing import Any
from urllib.parse import quote, unquote

from cachetools import LRUCache
from markdown_it import MarkdownIt

from services.common.answer_evidence import evidence_record, routing_record
from services.common.contracts import (
    AnswerBlock,
    AnswerUnit,
    CandidateImage,
    InsertionPlan,
    MergedAnswer,
    Retrieval,
    UnitSource,
)
from services.common.storage import ObjectMissing, ObjectStore
from services.common.text import FENCE, heading_of

BLOCK_KINDS = {"item": "item", "heading": "heading", "code": "code", "table": "table"}  # unit kind -> block kind
TOP_HEADING = 2  # the page's h1 is the question: an answer's headings start one level below


def heading_markdown(text: str, level: int | None) -> str:
    """A heading as Markdown, at least at level 2 (text that is already `## X` keeps its level
    unless one is given).

    >>> heading_markdown("Ingredients", 1), heading_markdown("### Tips", None), heading_markdown("Tips", 9)
    ('## Ingredients', '### Tips', '###### Tips')
    """
    found = heading_of(text.strip())
    if found:
        written, text = found
        level = level or written
    return "#" * min(6, max(TOP_HEADING, level or TOP_HEADING)) + " " + " ".join(text.split())


def follows(source: UnitSource | None, previous: UnitSource | None) -> bool:
    """Whether a sentence continues the previous one's paragraph: both without provenance (text an LM
    wrote), or the next unit of the same document."""
    if source is None or previous is None:
        return source is None and previous is None
    return source.document_id == previous.document_id and source.position == previous.position + 1


def interleave(units: list[AnswerUnit], plan: InsertionPlan, candidates: list[CandidateImage]) -> list[AnswerBlock]:
    """Text blocks with each planned image after its unit. Sentences in a row make one paragraph (when
    units carry provenance, only sentences that follow each other in their source do); an item, heading,
    code block or table is a block of its own kind. Images not among the candidates are dropped."""
    by_name = {candidate.source_name: candidate for candidate in candidates}
    after: dict[int, list[str]] = {}
    for placement in plan.placements:
        if placement.image in by_name and placement.after <= len(units):
            after.setdefault(placement.after, []).append(placement.image)
    blocks: list[AnswerBlock] = []
    paragraph: list[AnswerUnit] = []

    def flush() -> None:
        if paragraph:
            blocks.append(AnswerBlock(type="text", kind="paragraph", text=" ".join(u.text for u in paragraph)))
            paragraph.clear()

    def images_after(position: int) -> None:
        names = after.get(position, [])
        if names:
            flush()
        for name in names:
            blocks.append(AnswerBlock(type="image", source_name=name, caption=by_name[name].caption))

    images_after(0)
    for position, unit in enumerate(units, 1):
        if unit.kind == "sentence":
            if paragraph and not follows(unit.source, paragraph[-1].source):
                flush()
            paragraph.append(unit)
        else:
            flush()
            kind = BLOCK_KINDS.get(unit.kind, "paragraph")
            if kind == "heading":
                text = heading_markdown(unit.text, unit.level)
                blocks.append(AnswerBlock(type="text", kind=kind, level=len(text) - len(text.lstrip("#")), text=text))
            else:
                blocks.append(AnswerBlock(type="text", kind=kind, text=unit.text))
        images_after(position)
    flush()
    return blocks


# A list item's marker (`- `, `* `, `3. `, `3) `) after its indentation; the digits are CommonMark's nine.
STEP = re.compile(r"^([ \t]*)([-*+]|\d{1,9}[.)])[ \t]")
# Links a document's text may keep in an answer: web, mail, and relative (no scheme) targets. Others
# (`javascript:`, `data:`, `vbscript:`, `file:`) become `#`. Each pattern is linear: disjoint runs.
SAFE_SCHEMES = ("http", "https", "mailto")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
INLINE_TARGET = re.compile(r"(\]\([ \t]*)([^\s)]*)")  # [text](target) and ![alt](target)
REFERENCE_TARGET = re.compile(r"^( {0,3}\[[^\]\n]*\]:[ \t]*)(\S*)", re.MULTILINE)  # [label]: target


def is_safe_target(target: str) -> bool:
    r"""Whether a link may point there: no scheme (relative), or http, https, mailto.

    >>> [is_safe_target(t) for t in ["https://x.org", "pics/a.png", "JavaScript:alert(1", "\x01javascript:x"]]
    [True, True, False, False]
    """
    scheme = SCHEME.match("".join(ch for ch in target if ch > " "))  # browsers drop controls and spaces
    return scheme is None or scheme[1].lower() in SAFE_SCHEMES


def safe_target(target: str) -> str:
    r"""A link target as it may stay in an answer.

    >>> [safe_target(t) for t in ["https://x.org", "pics/a.png", "JavaScript:alert(1", "\x01javascript:x"]]
    ['https://x.org', 'pics/a.png', '#', '#']
    """
    return target if is_safe_target(target) else "#"


def markdown_text(text: str) -> str:
    r"""Document text as Markdown that renders as that text, as the HTML page escapes it: raw HTML
    (`<script>`, `<img onerror>`) and entities shown, not run; links only to safe targets.

    >>> markdown_text("<script>x</script> & [go](javascript:alert(1))")
    '&lt;script>x&lt;/script> &amp; [go](#))'
    >>> markdown_text("```html\n<b>kept</b>\n```")
    '```html\n<b>kept</b>\n```'
    """
    lines = text.split("\n")
    if len(lines) > 1 and [n for n, line in enumerate(lines) if FENCE.match(line)] == [0, len(lines) - 1]:
        return text  # one closed code block: shown as written, nothing in it runs
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    text = INLINE_TARGET.sub(lambda found: found[1] + safe_target(found[2]), text)
    return REFERENCE_TARGET.sub(lambda found: found[1] + safe_target(found[2]), text)


def is_item(block: AnswerBlock) -> bool:
    """A list item: a text block of kind `item` (or of no kind, as answers stored before blocks had
    one) that starts with a list marker."""
    return block.type == "text" and block.kind in (None, "item") and bool(STEP.match(block.text or ""))


def block_markdown(block: AnswerBlock) -> str:
    """A text block's Markdown as written (not yet escaped); a heading as `## text`."""
    if block.kind == "heading":
        return heading_markdown(block.text or "", block.level)
    return block.text or ""


def list_lines(items: list[str]) -> list[str]:
    """Items of one list, each re-indented to the content column of the item it nests under, so that
    nesting by indentation renders the same in every CommonMark viewer (a child of `10. x` needs four
    spaces, of `- x` two) and a first item never becomes an indented code block.

    >>> list_lines(["1. Mix", "  - flour", "  - eggs", "2. Fry", "      - hot"])
    ['1. Mix', '   - flour', '   - eggs', '2. Fry', '   - hot']
    """
    lines: list[str] = []
    parents: list[tuple[int, int]] = []  # (indentation in the source, content column here)
    for item in items:
        found = STEP.match(item)
        if found is None:
            lines.append(item)
            continue
        indent = len(found[1].expandtabs(4))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        column = parents[-1][1] if parents else 0
        lines.append(" " * column + found[2] + " " + item[found.end() :].lstrip(" \t"))
        parents.append((indent, column + len(found[2]) + 1))
    return lines


def to_markdown(blocks: list[AnswerBlock], image_path: Callable[[str], str] | None = None) -> str:
    """Each block a paragraph, except that consecutive list items stay a list (one per line). Text is
    escaped (`markdown_text`); an image links to `image_path(source name)`, by default its source name."""
    paragraphs: list[str] = []
    items: list[str] = []

    def end_list() -> None:
        if items:
            paragraphs.append("\n".join(list_lines(items)))
            items.clear()

    for block in blocks:
        if is_item(block):
            items.append(markdown_text(block.text or ""))
            continue
        end_list()
        if block.type == "image":
            alt = markdown_text(block.caption or block.source_name or "").replace("[", "(").replace("]", ")")
            name = block.source_name or ""
            paragraphs.append(f"![{alt}]({quote(image_path(name) if image_path else name, safe='/')})")
        else:
            paragraphs.append(markdown_text(block_markdown(block)))
    end_list()
    return "\n\n".join(paragraphs).strip() + "\n"


def allowed_link(url: str) -> bool:
    """markdown-it's link check (it hands over the target normalised: entities decoded, percent-encoded):
    only safe targets become an `href` or `src`; a link to any other stays text."""
    return is_safe_target(unquote(url))


@cache
def markdown_renderer() -> MarkdownIt:
    """CommonMark with tables; raw HTML off, so a document's `<script>` or `<img onerror>` is text."""
    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    renderer.validateLink = allowed_link
    return renderer


def render_markdown(source: str) -> str:
    """Markdown to HTML. An ordered item whose number skips ahead of the one before it (steps 1, 2, 5)
    keeps its number (`<li value="5">`); the list's first number is its `start`."""
    renderer = markdown_renderer()
    tokens = renderer.parse(source)
    expected: list[int | None] = []  # the next number of each open list, None for a bullet list
    for token in tokens:
        if token.type == "ordered_list_open":
            expected.append(int(str(token.attrs.get("start", 1))))
        elif token.type == "bullet_list_open":
            expected.append(None)
        elif token.type in ("ordered_list_close", "bullet_list_close"):
            expected.pop()
        elif token.type == "list_item_open" and expected and expected[-1] is not None and token.info.isdigit():
            number = int(token.info)
            if number > expected[-1]:
                token.attrSet("value", str(number))
            expected[-1] = max(number, expected[-1]) + 1
    return renderer.renderer.render(tokens, renderer.options, {})


# Images are stored under their sha256 (`ObjectStore.put_content`): a key's bytes never change, so the
# merger keeps the data URIs of the images it embedded last (the same few illustrate many answers)
# instead of reading and encoding them from S3 for every answer. Bounded by size, per process.
DATA_URI_CACHE_BYTES = 64 * 2**20
data_uris: LRUCache = LRUCache(maxsize=DATA_URI_CACHE_BYTES, getsizeof=len)


def data_uri(key: str, store: ObjectStore) -> str:
    """The image under `key` as a data URI (ObjectMissing when it is gone)."""
    uri = data_uris.get(key)
    if uri is None:
        data = store.get(key)
        mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        if len(uri) <= DATA_URI_CACHE_BYTES // 8:  # one large image must not push out all the others
            data_uris[key] = uri
    return uri


def figure_html(
    block: AnswerBlock, keys: dict[str, tuple[str, str | None]], store: ObjectStore | None
) -> tuple[str, str | None]:
    """An image block as a `<figure>` (the image embedded as a data URI, its caption as alt text and
    figcaption), or a visible placeholder and a warning when its bytes are gone."""
    key, caption = keys.get(block.source_name or "", (None, None))
    caption_html = html.escape(block.caption or caption or block.source_name or "")
    name_html = html.escape(block.source_name or "")
    uri, warning = None, None
    if key and store is not None:
        try:
            uri = data_uri(key, store)
        except ObjectMissing:
            warning = f"image {block.source_name} is missing from storage ({key})"
    if uri is None:
        return (
            f'<figure class="missing"><div>[image {name_html} unavailable]</div>'
            f"<figcaption>{caption_html}</figcaption></figure>",
            warning,
        )
    return (
        f'<figure><img src="{uri}" alt="{caption_html}" data-source-name="{name_html}">'
        f"<figcaption>{caption_html}</figcaption></figure>",
        warning,
    )


STYLE = (
    "body{font-family:sans-serif;max-width:46em;margin:2em auto;line-height:1.5}figure{margin:1em 0}"
    "img{max-width:100%}figcaption{color:#555;font-size:.9em}.missing div{padding:2em;background:#eee;color:#a00}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.2em .5em}"
    "pre{background:#f4f4f4;padding:.5em;overflow-x:auto}"
    "details.evidence{margin-top:2em;font-size:.9em}details.evidence td{vertical-align:top}"
)


def cell(value: Any) -> str:
    """A table cell: text escaped (it comes from documents, a model or a router), a number as given.

    >>> cell("<b>x</b>"), cell(0.25), cell(None)
    ('<td>&lt;b&gt;x&lt;/b&gt;</td>', '<td>0.25</td>', '<td></td>')
    """
    return f"<td>{'' if value is None else html.escape(str(value))}</td>"


def table_html(title: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return f"<h3>{html.escape(title)} ({len(rows)})</h3>" + (f"<table><tr>{head}</tr>{body}</table>" if rows else "")


def evidence_html(evidence: dict[str, Any], routing: dict[str, Any] | None = None) -> str:
    """The page's "Evidence" section (`services.common.answer_evidence`'s record): a closed
    `<details>`, every text in it escaped."""
    parts = []
    if routing is not None:
        parts.append(f"<p>answered from {html.escape(', '.join(routing['chosen']) or '(no collection)')}</p>")
        parts.append(
            table_html(
                "Collections considered",
                ["collection", "score", "dense", "full-text hits", "centroid"],
                [[c["name"], c["score"], c["dense"], c["text_hits"], c.get("centroid")] for c in routing["considered"]],
            )
        )
        parts.append(
            table_html(
                "Routing steps",
                ["query", "collections", "best", "why"],
                [[s["query"], ", ".join(s["collections"]), s["best"], s["reason"]] for s in routing["steps"]],
            )
        )
    parts.append(
        table_html(
            "Passages used",
            ["rank", "document", "heading", "dense", "full-text", "fused"],
            [
                [p["rank"], p["doc_key"], p["heading"], p["dense"], p["full_text"], p["fused"]]
                for p in evidence["passages"]
            ],
        )
    )
    parts.append(
        table_html(
            "Passages rejected",
            ["document", "heading", "dense", "full-text rank", "why"],
            [
                [r["doc_key"], r["heading"], r["dense"], r["text_rank"], r["reason"]]
                for r in evidence["rejected_passages"]
            ],
        )
    )
    parts.append(
        table_html(
            "Images placed",
            ["image", "after sentence", "placed by", "similarity", "sentence", "model's reason"],
            [
                [i["image"], i["after"], i["placed_by"], i["similarity"], i["sentence"], i["reason"]]
                for i in evidence["images"]
            ],
        )
    )
    parts.append(
        table_html(
            "Candidates not placed",
            ["image", "why"],
            [[r["image"], r["reason"]] for r in evidence["rejected_images"]],
        )
    )
    return f'<details class="evidence"><summary>Evidence</summary>{"".join(parts)}</details>'


def to_html(
    question: str,
    blocks: list[AnswerBlock],
    candidates: list[CandidateImage],
    store: ObjectStore | None,
    evidence: str = "",
) -> tuple[str, list[str]]:
    """A self-contained page: text blocks rendered from Markdown (the items of a list together, so that
    they make one `<ol>`/`<ul>`; an image between two items ends the list and the next part starts
    at its own number), images embedded as data URIs read from S3. An image that vanished from S3
    becomes a visible placeholder and a warning, never a crash. `evidence` (`evidence_html`) ends the page."""
    keys = {c.source_name: (c.s3_key, c.caption) for c in candidates}
    warnings: list[str] = []
    body: list[str] = []
    items: list[str] = []

    def end_list() -> None:
        if items:
            body.append(render_markdown("\n".join(list_lines(items))))
            items.clear()

    for block in blocks:
        if is_item(block):
            items.append(block.text or "")
            continue
        end_list()
        if block.type == "text":
            body.append(render_markdown(block_markdown(block)))
            continue
        figure, warning = figure_html(block, keys, store)
        body.append(figure)
        if warning:
            warnings.append(warning)
    end_list()
    title = html.escape(question)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body><h1>{title}</h1>{''.join(body)}{evidence}</body></html>"
    )
    return page, warnings


def merge(
    question: str,
    units: list[AnswerUnit],
    plan: InsertionPlan,
    candidates: list[CandidateImage],
    store: ObjectStore | None,
    retrieval: Retrieval | None = None,
) -> tuple[MergedAnswer, str]:
    """The merged answer and its HTML page (the caller stores both); with the retrieval, the page
    ends with the answer's evidence (and its routing, when the retriever routed)."""
    blocks = interleave(units, plan, candidates)
    evidence = ""
    if retrieval is not None:
        record = evidence_record(retrieval.passages, retrieval.rejected, units, plan)
        evidence = evidence_html(record, routing_record(retrieval.routing) if retrieval.routing else None)
    page, warnings = to_html(question, blocks, candidates, store, evidence)
    if not units:
        warnings.append("the answer has no sentences")
    return MergedAnswer(markdown=to_markdown(blocks), blocks=blocks, warnings=warnings), page
