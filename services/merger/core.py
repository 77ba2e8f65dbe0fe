"""The merger: an answer's units and its insertion plan become one interleaved answer, as
Markdown (image links by source name), self-contained HTML (images embedded) and JSON blocks."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from urllib.parse import quote

from services.common.contracts import (
    AnswerBlock,
    AnswerUnit,
    CandidateImage,
    InsertionPlan,
    MergedAnswer,
)
from services.common.storage import ObjectMissing, ObjectStore
from services.common.text import FENCE


def interleave(units: list[AnswerUnit], plan: InsertionPlan, candidates: list[CandidateImage]) -> list[AnswerBlock]:
    """Text blocks (consecutive sentences make one paragraph; steps, headings, code stand alone)
    with each planned image after its unit. Images not among the candidates are dropped."""
    by_name = {candidate.source_name: candidate for candidate in candidates}
    after: dict[int, list[str]] = {}
    for placement in plan.placements:
        if placement.image in by_name and placement.after <= len(units):
            after.setdefault(placement.after, []).append(placement.image)
    blocks: list[AnswerBlock] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(AnswerBlock(type="text", text=" ".join(paragraph)))
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
            paragraph.append(unit.text)
        else:
            flush()
            blocks.append(AnswerBlock(type="text", text=unit.text))
        images_after(position)
    flush()
    return blocks


STEP = re.compile(r"^\s*([-*+]|\d{1,3}[.)])\s")
# Links a document's text may keep in an answer: web, mail, and relative (no scheme) targets. Others
# (`javascript:`, `data:`, `vbscript:`, `file:`) become `#`. Each pattern is linear: disjoint runs.
SAFE_SCHEMES = ("http", "https", "mailto")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
INLINE_TARGET = re.compile(r"(\]\([ \t]*)([^\s)]*)")  # [text](target) and ![alt](target)
REFERENCE_TARGET = re.compile(r"^( {0,3}\[[^\]\n]*\]:[ \t]*)(\S*)", re.MULTILINE)  # [label]: target


def safe_target(target: str) -> str:
    r"""A link target as it may stay in an answer.

    >>> [safe_target(t) for t in ["https://x.org", "pics/a.png", "JavaScript:alert(1", "\x01javascript:x"]]
    ['https://x.org', 'pics/a.png', '#', '#']
    """
    scheme = SCHEME.match("".join(ch for ch in target if ch > " "))  # browsers drop controls and spaces
    return target if scheme is None or scheme[1].lower() in SAFE_SCHEMES else "#"


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


def to_markdown(blocks: list[AnswerBlock], image_path: Callable[[str], str] | None = None) -> str:
    """Each block a paragraph, except that consecutive list steps stay a list (one per line). Text is
    escaped (`markdown_text`); an image links to `image_path(source name)`, by default its source name."""
    paragraphs: list[str] = []
    previous_step = False
    for block in blocks:
        if block.type == "image":
            alt = markdown_text(block.caption or block.source_name or "").replace("[", "(").replace("]", ")")
            name = block.source_name or ""
            paragraphs.append(f"![{alt}]({quote(image_path(name) if image_path else name, safe='/')})")
            previous_step = False
            continue
        text = markdown_text(block.text or "")
        is_step = bool(STEP.match(text))
        if is_step and previous_step:
            paragraphs[-1] += "\n" + text
        else:
            paragraphs.append(text)
        previous_step = is_step
    return "\n\n".join(paragraphs).strip() + "\n"


def to_html(
    question: str, blocks: list[AnswerBlock], candidates: list[CandidateImage], store: ObjectStore | None
) -> tuple[str, list[str]]:
    """A self-contained page: images are embedded as data URIs read from S3. An image that vanished
    from S3 becomes a visible placeholder and a warning, never a crash."""
    keys = {c.source_name: (c.s3_key, c.caption) for c in candidates}
    warnings: list[str] = []
    body: list[str] = []
    for block in blocks:
        if block.type == "text":
            body.append(f"<p>{html.escape(block.text or '')}</p>")
            continue
        key, caption = keys.get(block.source_name or "", (None, None))
        caption_html = html.escape(block.caption or caption or block.source_name or "")
        data = None
        if key and store is not None:
            try:
                data = store.get(key)
            except ObjectMissing:
                warnings.append(f"image {block.source_name} is missing from storage ({key})")
        if data is None:
            body.append(
                f'<figure class="missing"><div>[image {html.escape(block.source_name or "")} '
                f"unavailable]</div><figcaption>{caption_html}</figcaption></figure>"
            )
            continue
        mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        body.append(
            f'<figure><img src="{uri}" alt="{caption_html}" data-source-name="'
            f'{html.escape(block.source_name or "")}"><figcaption>{caption_html}</figcaption></figure>'
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(question)}</title><style>body{{font-family:sans-serif;max-width:46em;margin:2em auto;"
        "line-height:1.5}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}"
        ".missing div{padding:2em;background:#eee;color:#a00}</style></head><body>"
        f"<h1>{html.escape(question)}</h1>{''.join(body)}</body></html>"
    )
    return page, warnings


def merge(
    question: str,
    units: list[AnswerUnit],
    plan: InsertionPlan,
    candidates: list[CandidateImage],
    store: ObjectStore | None,
) -> tuple[MergedAnswer, str]:
    """The merged answer and its HTML page (the caller stores both)."""
    blocks = interleave(units, plan, candidates)
    page, warnings = to_html(question, blocks, candidates, store)
    if not units:
        warnings.append("the answer has no sentences")
    return MergedAnswer(markdown=to_markdown(blocks), blocks=blocks, warnings=warnings), page
