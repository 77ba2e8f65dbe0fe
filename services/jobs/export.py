"""Export a job's answers: per question `<id>.md`, `<id>.html`, `<id>.json`, the images the Markdown
links to, and an `index.html` that links everything.

The JSON of a question is `{"id", "question", "status", "blocks": [{"type": "text", "text": ...,
"kind": ..., "level"?}, {"type": "image", "source_name": ..., "caption": ...}], "answered_from": {"mode",
"sections", "reason", "truncated"}, "placements": [{"image", "after", "evidence", "similarity"}],
"evidence": {"passages", "rejected_passages", "images", "rejected_images"}, "routing"?, "error"}`:
text blocks keep their Markdown and unit kind (paragraph, item, heading, code, table), and the answer
says how it was made and what placed each image; `evidence` (services/common/answer_evidence.py) the
passages used with their rank and scores, those the filter rejected and why, each placed image with
what placed it and each candidate left out with why; `routing` ({"chosen": [collection names],
"considered": [...], "steps": [...]}) is there when the retriever routed the question. The HTML is
the merger's self-contained page (images embedded, the evidence at its end); the Markdown links
images by source name, and those files are written next to it, so both render offline. An image
whose name would overwrite a question's file or `index.html` (or another image, or stand where a
folder of them is) goes under `images/` instead, with a warning, and the Markdown links it there. A
question without an answer still gets its three files, saying why. Text in the Markdown is escaped
as the HTML page escapes it.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import literal_column, select

from services.common.answer_evidence import evidence_record, routing_record
from services.common.contracts import AnswerBlock, CandidateImage, Passage, RejectedPassage, Routing
from services.common.db import session_scope
from services.common.models import Answer, Query, StageRun
from services.common.queues import Stage
from services.common.stage_runs import StageOutputs, outputs_of_queries
from services.common.storage import ObjectMissing, ObjectStore, get_store
from services.jobs.status import job_status, parse_job_id
from services.merger.core import evidence_html, markdown_text, to_html, to_markdown

UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_stem(external_id: str, taken: set[str]) -> str:
    """A file name for a question id: unsafe characters become `_`, clashes get `-2`, `-3`...

    >>> taken = set(); [file_stem(i, taken) for i in ["a/b", "a_b", "..", "ok"]]
    ['a_b', 'a_b-2', 'question', 'ok']
    """
    stem = UNSAFE.sub("_", external_id).strip("._")[:120] or "question"
    candidate, n = stem, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}"
    taken.add(candidate.lower())
    return candidate


def export_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for block in blocks:
        if block.get("type") == "image":
            out.append({"type": "image", "source_name": block.get("source_name"), "caption": block.get("caption")})
        else:
            entry = {"type": "text", "text": block.get("text", ""), "kind": block.get("kind") or "paragraph"}
            if block.get("level"):
                entry["level"] = block["level"]
            out.append(entry)
    return out


@dataclass
class RetrievalEvidence:
    """What the export reads of a retrieval besides its candidates: the passages used, those rejected,
    the routing (not the question's vector, nor the sections)."""

    passages: list[Passage] = field(default_factory=list)
    rejected: list[RejectedPassage] = field(default_factory=list)
    routing: Routing | None = None


def answer_record(outputs: StageOutputs | None, retrieval: RetrievalEvidence | None = None) -> dict[str, Any]:
    """How the answer was made: the generator's mode, sections and reason; the inserter's placements;
    the evidence (passages used and rejected, images placed and not); the routing when there was one."""
    text_answer = outputs.answer if outputs else None
    plan = outputs.plan if outputs else None
    retrieval = retrieval or RetrievalEvidence()
    routing = {"routing": routing_record(retrieval.routing)} if retrieval.routing else {}
    return {
        "answered_from": {
            "mode": text_answer.mode,
            "sections": text_answer.sections,
            "reason": text_answer.reason,
            "truncated": text_answer.truncated,
        }
        if text_answer
        else None,
        "placements": [p.model_dump(mode="json") for p in plan.placements] if plan else [],
        "evidence": evidence_record(
            retrieval.passages, retrieval.rejected, text_answer.units if text_answer else [], plan
        ),
        **routing,
    }


def safe_relative(name: str) -> PurePosixPath | None:
    """An image source name as a path inside the export folder, or None if it would leave it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


class ImagePlaces:
    """Where each image of an export goes: its source name, unless that path (or a folder on it) is
    taken by a question's file, `index.html` or another image; then under `images/`, numbered if need
    be. Case-insensitive, as some file systems are.

    >>> places = ImagePlaces({"clash.json", "index.html"})
    >>> [places.place(n) for n in ["images/a.jpg", "clash.json", "images/clash.json", "index.html/x.png"]]
    ['images/a.jpg', 'images/clash.json', 'images/images/clash.json', 'images/index.html/x.png']
    """

    def __init__(self, question_files: set[str]):
        self.files = {name.lower() for name in question_files}
        self.folders: set[str] = set()
        self.of: dict[str, str] = {}  # source name -> path in the export

    def free(self, path: PurePosixPath) -> bool:
        parents = {parent.as_posix().lower() for parent in path.parents if parent.parts}
        return not (parents & self.files) and path.as_posix().lower() not in self.files | self.folders

    def place(self, name: str) -> str:
        source = PurePosixPath(name)
        path, n = source, 1
        while not self.free(path):
            n += 1
            relocated = PurePosixPath("images", *source.parts)
            path = relocated if n == 2 else relocated.with_stem(f"{relocated.stem}-{n - 1}")
        self.files.add(path.as_posix().lower())
        self.folders |= {parent.as_posix().lower() for parent in path.parents if parent.parts}
        self.of[name] = path.as_posix()
        return self.of[name]


@dataclass
class ExportResult:
    out_dir: Path
    index: Path
    questions: int = 0
    answered: int = 0
    images_written: int = 0
    warnings: list[str] = field(default_factory=list)


EXPORT_BATCH = 200  # questions read (and their stage outputs) at a time: the export's memory stays flat
FETCHERS = 8  # a batch's stored HTML pages are read from S3 this many at a time (each GET is a round trip)
CANDIDATES = TypeAdapter(list[CandidateImage])
PASSAGES = TypeAdapter(list[Passage])
REJECTED = TypeAdapter(list[RejectedPassage])


@dataclass
class BatchInputs:
    """What the questions of one batch need besides their rows: their text answers and plans, their
    retrievals' candidate images and evidence (not their question vectors, sections or passage texts)
    and their stored HTML pages (None when the object is missing)."""

    outputs: dict[uuid.UUID, StageOutputs]
    candidates: dict[uuid.UUID, list[CandidateImage]]
    evidence: dict[uuid.UUID, RetrievalEvidence]
    pages: dict[str, bytes | None]


def batch_inputs(batch, store: ObjectStore, pool: ThreadPoolExecutor) -> BatchInputs:
    ids = [query.id for query, _ in batch]
    candidates: dict[uuid.UUID, list[CandidateImage]] = {}
    evidence: dict[uuid.UUID, RetrievalEvidence] = {}
    # The passages without their text and units: the evidence shows their place and scores, and the
    # texts of a batch's passages would weigh more than everything else it reads.
    passages_only = literal_column(
        "(SELECT jsonb_agg(p - 'text' - 'units') FROM jsonb_array_elements(stage_runs.output->'passages') p)"
    )
    with session_scope() as session:
        for query_id, found, passages, rejected, routing in session.execute(
            select(
                StageRun.query_id,
                StageRun.output["candidates"],
                passages_only,
                StageRun.output["rejected"],
                StageRun.output["routing"],
            ).where(StageRun.query_id.in_(ids), StageRun.stage == Stage.RETRIEVER.value, StageRun.status == "succeeded")
        ):
            candidates[query_id] = CANDIDATES.validate_python(found or [])
            evidence[query_id] = RetrievalEvidence(
                passages=PASSAGES.validate_python([{**passage, "text": ""} for passage in passages or []]),
                rejected=REJECTED.validate_python(rejected or []),
                routing=Routing.model_validate(routing) if routing else None,
            )

    def fetch(key: str) -> bytes | None:
        try:
            return store.get(key)
        except ObjectMissing:
            return None

    keys = sorted({answer.html_key for _, answer in batch if answer is not None and answer.html_key})
    return BatchInputs(
        outputs=outputs_of_queries(ids, [Stage.GENERATOR, Stage.INSERTER]),
        candidates=candidates,
        evidence=evidence,
        pages=dict(zip(keys, pool.map(fetch, keys), strict=True)),
    )


def export_job(job_id: str | uuid.UUID, out_dir: Path, store: ObjectStore | None = None) -> ExportResult:
    """Write the job's files. The questions stream in file order, `EXPORT_BATCH` at a time (a
    server-side cursor), and each is written as it comes; only the file names (all of them first, so
    that no image takes a question's) and the index's rows are kept until the end."""
    job_id = parse_job_id(job_id)
    status = job_status(job_id, detail=False)
    store = store or get_store()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder: give --out a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out_dir=out_dir, index=out_dir / "index.html")
    order = (Query.line.nulls_last(), Query.created_at, Query.id)
    taken: set[str] = {"index"}
    with session_scope() as session:
        ids = session.scalars(select(Query.external_id).where(Query.job_id == job_id).order_by(*order))
        stems = [file_stem(external_id, taken) for external_id in ids]
    places = ImagePlaces({"index.html"} | {f"{stem}.{ext}" for stem in stems for ext in ("md", "html", "json")})
    rows = []
    with session_scope() as session:
        stream = session.execute(
            select(Query, Answer)
            .outerjoin(Answer, Answer.query_id == Query.id)
            .where(Query.job_id == job_id)
            .order_by(*order)
            .execution_options(yield_per=EXPORT_BATCH)
        )
        with ThreadPoolExecutor(FETCHERS) as pool:
            for batch in stream.partitions():
                inputs = batch_inputs(batch, store, pool)
                for query, answer in batch:
                    stem = stems[result.questions]
                    images = export_question(stem, query, answer, inputs, store, places, result)
                    rows.append(index_row(stem, query, "succeeded" if answer else query.status, images))
                    result.questions += 1
    result.index.write_text(index_head(status) + "".join(rows) + INDEX_TAIL, encoding="utf-8")
    return result


def export_question(stem: str, query: Query, answer: Answer | None, inputs: BatchInputs, store, places, result) -> int:
    """One question's `.json`, `.md` and `.html` (and the images its answer shows); how many images it shows."""
    out_dir = result.out_dir
    outputs = inputs.outputs.get(query.id)
    blocks = export_blocks(answer.blocks) if answer else []
    status_text = "succeeded" if answer else query.status
    record = {
        "id": query.external_id,
        "question": query.question,
        "status": status_text,
        "blocks": blocks,
        **answer_record(outputs, inputs.evidence.get(query.id)),
        "error": None if answer else query.described_error,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    candidates = inputs.candidates.get(query.id, [])
    if answer:
        result.answered += 1
        page = None
        if answer.html_key:
            stored = inputs.pages.get(answer.html_key)
            if stored is not None:
                page = stored.decode("utf-8")
            else:
                result.warnings.append(
                    f"{query.external_id}: the stored HTML {answer.html_key} is missing; re-rendered"
                )
        if page is None:
            page, warnings = to_html(
                query.question,
                [AnswerBlock.model_validate(b) for b in answer.blocks],
                candidates,
                store,
                evidence_html(record["evidence"], record.get("routing")),
            )
            result.warnings += [f"{query.external_id}: {w}" for w in warnings]
        result.images_written += write_images(blocks, candidates, store, out_dir, places, result)
        body = to_markdown([AnswerBlock.model_validate(b) for b in answer.blocks], places.of.get)
        markdown = f"# {heading(query.question)}\n\n{body}"
    else:
        reason = query.described_error or f"no answer yet ({query.status})"
        markdown = f"# {heading(query.question)}\n\n**No answer** ({query.status}): {markdown_text(reason)}\n"
        page = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(query.question or query.external_id)}</title></head><body>"
            f"<h1>{html.escape(query.question or query.external_id)}</h1>"
            f"<p class='error'><strong>No answer</strong> ({html.escape(query.status)}): {html.escape(reason)}</p>"
            "</body></html>"
        )
    (out_dir / f"{stem}.md").write_text(markdown, encoding="utf-8")
    (out_dir / f"{stem}.html").write_text(page, encoding="utf-8")
    return sum(1 for b in blocks if b["type"] == "image")


def heading(question: str) -> str:
    return markdown_text(" ".join(question.split()))


def write_images(blocks, candidates, store, out_dir: Path, places: ImagePlaces, result: ExportResult) -> int:
    keys = {c.source_name: c.s3_key for c in candidates}
    count = 0
    for block in blocks:
        name = block.get("source_name") if block["type"] == "image" else None
        if not name or name in places.of:
            continue
        relative = safe_relative(name)
        if relative is None or name not in keys:
            result.warnings.append(f"image {name!r} not written (outside the export folder or unknown)")
            continue
        try:
            data = store.get(keys[name])
        except ObjectMissing:
            result.warnings.append(f"image {name} is missing from storage ({keys[name]})")
            continue
        placed = places.place(relative.as_posix())
        if placed != relative.as_posix():
            result.warnings.append(f"image {name!r} would overwrite another file of the export; written as {placed}")
        places.of[name] = placed
        target = out_dir / Path(*PurePosixPath(placed).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        count += 1
    return count


def index_row(stem: str, query: Query, state: str, images: int) -> str:
    error = html.escape(query.described_error or "") if state != "succeeded" else ""
    return (
        f"<tr class='{html.escape(state)}'><td>{html.escape(query.external_id)}</td>"
        f"<td><a href='{stem}.html'>{html.escape(query.question[:200] or '(no question)')}</a></td>"
        f"<td>{html.escape(state)}</td><td>{images}</td>"
        f"<td><a href='{stem}.md'>md</a> · <a href='{stem}.json'>json</a></td><td>{error}</td></tr>"
    )


def index_head(status) -> str:
    title = html.escape(f"m2io job {status.name or status.id}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}"
        "td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}"
        "tr.failed td,tr.cancelled td{color:#a00}</style></head><body>"
        f"<h1>{title}</h1><p>job {status.id} · collection {html.escape(status.collection or '?')} · "
        f"{status.state} · {status.counts.get('succeeded', 0)} of {status.total} answered</p>"
        "<table><tr><th>id</th><th>question</th><th>status</th><th>images</th><th>files</th><th>error</th></tr>"
    )


INDEX_TAIL = "</table></body></html>"
