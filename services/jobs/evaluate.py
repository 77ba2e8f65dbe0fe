"""Score finished jobs against the gold fields of their questions (MRAMG-Bench's metrics).

Per question: image precision / recall / F1, ordering, position accuracy, ROUGE-L (all from
`services.common.metrics`), and the retrieval's own recall: the share of gold images among the
candidates the inserter was offered (`retrieval_image_recall`) and whether the gold document was
among the retrieved passages (`retrieval_doc_hit`). Images are compared by file name (the gold
lists names, answers carry source paths). A question that failed scores 0 on every answer metric:
the user got nothing. Questions without `gold_answer` are not scored.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from services.common.contracts import JobConfig, Retrieval, TextAnswer
from services.common.db import session_scope
from services.common.metrics import aggregate, answer_metrics
from services.common.models import EvalRun, Query
from services.common.stage_runs import StageOutputs, outputs_of_queries
from services.jobs.status import job_status, parse_job_id

ANSWER_METRICS = (
    "image_precision",
    "image_recall",
    "image_f1",
    "ordering",
    "position_accuracy",
    "rouge_l",
    "section_hit",
)
RETRIEVAL_METRICS = ("retrieval_image_recall", "retrieval_doc_hit")
PLOTTED = ("image_f1", "ordering", "position_accuracy", "rouge_l", "section_hit", "retrieval_image_recall")


def basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def retrieval_metrics(retrieval: Retrieval | None, gold: dict[str, Any]) -> dict[str, float | None]:
    gold_images = [basename(name) for name in gold.get("gold_images", [])]
    if retrieval is None:
        return {
            "retrieval_image_recall": 0.0 if gold_images else None,
            "retrieval_doc_hit": 0.0 if gold.get("doc_id") else None,
        }
    offered = {basename(c.source_name) for c in retrieval.candidates}
    image_recall = sum(name in offered for name in gold_images) / len(gold_images) if gold_images else None
    doc_hit = None
    if gold.get("doc_id"):
        doc_hit = float(any(p.doc_key == gold["doc_id"] for p in retrieval.passages))
    return {"retrieval_image_recall": image_recall, "retrieval_doc_hit": doc_hit}


def section_hit(answer: TextAnswer | None, gold: dict[str, Any]) -> float | None:
    """1.0 when the answer was cut from the gold section (`section`: its heading path, `doc_id`: its
    document), 0.0 otherwise (another section, or no section: sentences or an LM's text); None when
    the gold names no section. Heading paths are compared with their whitespace collapsed.

    >>> from services.common.contracts import AnswerUnit, UnitSource
    >>> unit = AnswerUnit(text="Mix.", source=UnitSource(document_id=1, doc_key="pie", position=2))
    >>> answer = TextAnswer(units=[unit], backend="extractive", mode="section", sections=["Pie  > Steps"])
    >>> section_hit(answer, {"section": "Pie > Steps", "doc_id": "pie"}), section_hit(answer, {"doc_id": "pie"})
    (1.0, None)
    """
    if not gold.get("section"):
        return None
    if answer is None or answer.mode != "section" or not answer.sections:
        return 0.0
    documents = {unit.source.doc_key for unit in answer.units if unit.source is not None}
    same_document = not gold.get("doc_id") or gold["doc_id"] in documents
    same_path = " ".join(answer.sections[0].split()) == " ".join(str(gold["section"]).split())
    return float(same_document and same_path)


def score_query(question: str, gold: dict[str, Any], outputs: StageOutputs, status: str) -> dict[str, Any]:
    retrieval, answer, plan = outputs.retrieval, outputs.answer, outputs.plan
    row: dict[str, Any] = {}
    if status == "succeeded" and answer is not None and plan is not None:
        placements = sorted(plan.placements, key=lambda p: p.after)
        ordered = [basename(p.image) for p in placements]
        positions = {basename(p.image): p.after for p in placements}
        units = [unit.text for unit in answer.units]
        gold_images = [basename(name) for name in gold.get("gold_images", [])]
        row.update(answer_metrics(units, ordered, positions, gold["gold_answer"], gold_images))
        row["section_hit"] = section_hit(answer, gold)
        row["images_placed"] = len(placements)
        row["fallback"] = bool(plan.fallback_reason)
    else:
        row.update({key: 0.0 for key in ANSWER_METRICS})
        if not gold.get("gold_images"):
            row["position_accuracy"] = None
        if not gold.get("section"):
            row["section_hit"] = None
        row["images_placed"] = 0
    row.update(retrieval_metrics(retrieval, gold))
    return row


def backend_label(config: JobConfig, outputs: list[StageOutputs]) -> str:
    """`generator+inserter` as the stages actually ran them (jobs stored before submit filled in the
    backends have none in their config)."""
    generator, inserter = config.generator, config.inserter
    for output in outputs:
        generator = generator or (output.answer.backend if output.answer else None)
        inserter = inserter or (output.plan.backend if output.plan else None)
        if generator and inserter:
            break
    return f"{generator or '?'}+{inserter or '?'}"


SCORE_BATCH = 500


def score_job(job_id: str | uuid.UUID, *, record: bool = True) -> dict[str, Any]:
    """The evaluation of one job: per-question rows and their aggregate (stored as an eval run)."""
    job_id = parse_job_id(job_id)
    status = job_status(job_id, detail=False)
    rows = []
    questions = 0
    seen: list[StageOutputs] = []  # the first outputs that name each backend, for the label
    with session_scope() as session:
        # A batch of questions and their stage outputs at a time: a job of 10,000 is never held whole.
        stream = session.execute(
            select(Query)
            .where(Query.job_id == job_id)
            .order_by(Query.line.nulls_last(), Query.created_at, Query.id)
            .execution_options(yield_per=SCORE_BATCH)
        ).scalars()
        for batch in stream.partitions():
            outputs = outputs_of_queries([query.id for query in batch])
            for output in outputs.values():
                if (output.answer and not any(o.answer for o in seen)) or (
                    output.plan and not any(o.plan for o in seen)
                ):
                    seen.append(output)
            for query in batch:
                questions += 1
                gold = query.gold or {}
                if not gold.get("gold_answer"):
                    continue
                row = {"id": query.external_id, "status": query.status}
                row.update(score_query(query.question, gold, outputs.get(query.id, StageOutputs()), query.status))
                if query.status != "succeeded":
                    row["error"] = query.described_error
                rows.append(row)
    numeric = [{k: v for k, v in row.items() if k in ANSWER_METRICS + RETRIEVAL_METRICS} for row in rows]
    summary = aggregate(numeric)
    summary["failed"] = sum(row["status"] != "succeeded" for row in rows)
    summary["images_placed"] = sum(row["images_placed"] for row in rows)
    summary["fallbacks"] = sum(bool(row.get("fallback")) for row in rows)
    report = {
        "job_id": str(job_id),
        "collection": status.collection,
        "backends": backend_label(status.config, seen),
        "config": status.config.model_dump(mode="json"),
        "state": status.state,
        "questions": questions,
        "scored": len(rows),
        "aggregate": summary,
        "per_question": rows,
    }
    if record:
        with session_scope() as session:
            run = EvalRun(
                job_id=job_id,
                config={"collection": status.collection, "backends": report["backends"], **report["config"]},
                metrics=summary,
                score=summary.get("image_f1"),
            )
            session.add(run)
            session.flush()
            report["eval_run_id"] = str(run.id)
    return report


def write_report(reports: list[dict[str, Any]], out: Path) -> tuple[Path, Path | None]:
    """REPORT.json (every job's per-question and aggregate metrics) and REPORT.png next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"jobs": reports}, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    plot = out.with_suffix(".png")
    plot_reports(reports, plot)
    return out, plot


def plot_reports(reports: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one panel per collection, one group per metric, one bar per backend pair."""
    import matplotlib

    matplotlib.use("Agg")  # no display: workers, CI, the dashboard's server
    import matplotlib.pyplot as plt

    collections = sorted({r["collection"] or "?" for r in reports})
    figure, axes = plt.subplots(1, len(collections), figsize=(6 * len(collections), 4.2), squeeze=False)
    for axis, collection in zip(axes[0], collections, strict=True):
        chosen = [r for r in reports if (r["collection"] or "?") == collection]
        width = 0.8 / max(1, len(chosen))
        for index, report in enumerate(chosen):
            values = [report["aggregate"].get(metric) or 0.0 for metric in PLOTTED]
            offsets = [m + index * width - 0.4 + width / 2 for m in range(len(PLOTTED))]
            axis.bar(offsets, values, width, label=f"{report['backends']} ({report['job_id'][:8]})")
        axis.set_xticks(range(len(PLOTTED)), [m.replace("_", "\n") for m in PLOTTED], fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_title(f"{collection} ({chosen[0]['scored']} questions)")
        axis.legend(fontsize=7, loc="upper right")
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
