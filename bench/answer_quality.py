"""Answer quality on ../shared/corpora: the MRAMG metrics per pipeline, all corpora in one collection.

Every document of every development corpus is ingested into one collection (`bench-dev` by
default, so a question can be answered from the wrong corpus), then every question of each corpus
is answered in process with the stages' own functions. Two settings:
- `gold`: the gold answer's own text is given as plain units, without provenance (as an LM's answer
  would arrive), so only the inserter is measured: `rule` (text matching), `random` (as many random
  candidates as the gold has images, at random slots, seeded), `top-first` (the best candidate
  before the first unit);
- `e2e`: retrieval -> generator -> inserter:
  - `section+rule`: the default (the retriever's best section, whole, images where they stood);
  - `section+top-first`: the same answer text, the best candidate before it;
  - `best-section`: the naive baseline: the section of the top documents whose heading is most
    similar to the question, with its sub-sections, and all its images where they stood;
  - `previous`: the pipeline before sections (MMR sentence picks of the focused passages, images by
    text matching only).
Per corpus: image P/R/F1, ordering, position accuracy (aligned to the gold text), ROUGE-L,
section-hit rate (the gold section answered) and latency p50/p99 per answer.

    .venv/bin/python -m bench.answer_quality [--collection bench-dev] [--limit N] \
        [--label ocr-off] [--out bench/results/answer_quality.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from sqlalchemy import text

from bench.retrieval_quality import DEFAULT_CORPORA, ingest_corpus
from services.common.contracts import AnswerUnit, CandidateImage, InsertionPlan, Placement, Retrieval, TextAnswer
from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, Embedder, get_embedder
from services.common.metrics import aggregate, answer_metrics, parse_gold_answer
from services.common.vectors import QueryVectors
from services.generator.core import extractive_answer, generate
from services.inserter.core import insert, rule_plan, source_plan
from services.jobs.evaluate import section_hit
from services.retriever.search import UnknownCollection, get_collection, retrieve
from services.retriever.section_search import SECTION_DOCUMENTS, load_documents
from services.retriever.sections import answer_units, section_body

PIPELINES = ("section+rule", "section+top-first", "best-section", "previous")


def basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def baseline_plan(kind: str, units: list[AnswerUnit], retrieval: Retrieval, gold_count: int, seed: int):
    if kind == "top-first":
        placements = [Placement(image=retrieval.candidates[0].source_name, after=0)] if retrieval.candidates else []
    else:
        rng = random.Random(seed)
        chosen = rng.sample(retrieval.candidates, min(gold_count, len(retrieval.candidates)))
        placements = [Placement(image=c.source_name, after=rng.randint(0, len(units))) for c in chosen]
    return InsertionPlan(placements=sorted(placements, key=lambda p: p.after), backend=kind)


def score(answer: TextAnswer, plan: InsertionPlan, question: dict) -> dict:
    placements = sorted(plan.placements, key=lambda p: p.after)
    ordered = [basename(p.image) for p in placements]
    positions = {basename(p.image): p.after for p in placements}
    gold_images = [basename(name) for name in question.get("gold_images", [])]
    row = answer_metrics([u.text for u in answer.units], ordered, positions, question["gold_answer"], gold_images)
    row["section_hit"] = section_hit(answer, question) if answer.backend != "gold" else None
    return row


def best_heading_answer(session, retrieval: Retrieval, embedder: Embedder) -> tuple[TextAnswer, InsertionPlan]:
    """The naive baseline: the section of the top documents whose heading is most similar to the
    question, with its sub-sections, and every image standing in it, where it stood."""
    document_ids: list[int] = []
    for passage in retrieval.passages:
        if passage.document_id not in document_ids and len(document_ids) < SECTION_DOCUMENTS:
            document_ids.append(passage.document_id)
    entries = [
        (document.row, document.units, document.sections, section)
        for document in load_documents(session, document_ids)
        for section in document.sections
    ]
    if not entries:
        return TextAnswer(units=[], backend="best-section"), InsertionPlan(placements=[], backend="best-section")
    query = embedder.encode([retrieval.question])[0]
    similarity = embedder.encode([entry[3].path[-1] for entry in entries]) @ query
    row, units, sections, section = entries[int(similarity.argmax())]
    numbers, _ = section_body(section, units, subsections=True, max_words=10**9, sections=sections)
    answer = TextAnswer(
        units=answer_units(numbers, units, sections, row.id, row.doc_key),
        backend="best-section",
        mode="section",
        sections=[section.label],
    )
    images = session.execute(
        text(
            "SELECT id, source_name, position FROM images WHERE document_id = :d AND position BETWEEN :low AND :high "
            "ORDER BY position, id"
        ),
        {"d": row.id, "low": section.heading, "high": section.end},
    ).all()
    candidates = [
        CandidateImage(
            image_id=image.id,
            source_name=image.source_name,
            s3_key="",
            caption=None,
            context_before=None,
            context_after=None,
            doc_key=row.doc_key,
            score=0.0,
            reasons=["section"],
            document_id=row.id,
            position=image.position,
        )
        for image in images
    ]
    return answer, InsertionPlan(placements=source_plan(answer.units, candidates), backend="best-section")


def run_corpus(root: Path, collection_name: str, embedder: Embedder, limit: int) -> dict:
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines() if line.strip()]
    if limit:
        questions = questions[:limit]
    rows: dict[str, list[dict]] = {}
    latencies: dict[str, list[float]] = {}

    def record(key: str, seconds: float, row: dict) -> None:
        latencies.setdefault(key, []).append(seconds)
        rows.setdefault(key, []).append(row)

    with session_scope() as session:
        collection = get_collection(session, collection_name)
        for index, question in enumerate(questions):
            vectors = QueryVectors(embedder, session)  # the vectors stored at ingest, as the stages read them
            started = time.perf_counter()
            retrieval = retrieve(session, collection, question["question"], embedder)
            retrieved = time.perf_counter() - started
            # gold text, no provenance: the inserter alone
            gold_texts, _ = parse_gold_answer(question["gold_answer"], question.get("gold_images", []))
            gold_answer = TextAnswer(units=[AnswerUnit(text=t) for t in gold_texts], backend="gold")
            for inserter in ("rule", "random", "top-first"):
                started = time.perf_counter()
                if inserter == "rule":
                    plan = insert(gold_answer.units, retrieval.candidates, "rule", vectors)
                else:
                    gold_count = len(question.get("gold_images", []))
                    plan = baseline_plan(inserter, gold_answer.units, retrieval, gold_count, index)
                record(f"gold/{inserter}", time.perf_counter() - started, score(gold_answer, plan, question))
            # end to end
            started = time.perf_counter()
            answer = generate(retrieval, "extractive", vectors)
            generated = time.perf_counter() - started
            started = time.perf_counter()
            plan = insert(answer.units, retrieval.candidates, "rule", vectors)
            seconds = retrieved + generated + time.perf_counter() - started
            record("e2e/section+rule", seconds, score(answer, plan, question))
            plan = baseline_plan("top-first", answer.units, retrieval, 0, index)
            record("e2e/section+top-first", retrieved + generated, score(answer, plan, question))
            started = time.perf_counter()
            naive, naive_plan = best_heading_answer(session, retrieval, embedder)
            record("e2e/best-section", retrieved + time.perf_counter() - started, score(naive, naive_plan, question))
            started = time.perf_counter()
            units = extractive_answer(retrieval.question, retrieval.passages, embedder)
            previous = TextAnswer(units=units, backend="previous", mode="sentences")
            previous_plan = InsertionPlan(placements=rule_plan(units, retrieval.candidates, embedder), backend="rule")
            record("e2e/previous", retrieved + time.perf_counter() - started, score(previous, previous_plan, question))
    report = {}
    for key, values in rows.items():
        entry = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in aggregate(values).items()}
        times = sorted(latencies[key])
        entry["latency_p50_ms"] = round(statistics.median(times) * 1000, 1)
        entry["latency_p99_ms"] = round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 1)
        report[key] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--collection", default="bench-dev", help="one collection for every corpus")
    parser.add_argument("--label", default="default", help="names this run in the output (e.g. ocr-off)")
    parser.add_argument("--limit", type=int, default=0, help="questions per corpus (0 = all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    embedder = get_embedder(args.model)
    roots = sorted(p for p in args.corpora.iterdir() if (p / "questions.jsonl").exists())
    with session_scope() as session:
        try:
            get_collection(session, args.collection)
            missing = False
        except UnknownCollection:
            missing = True
    if missing:
        for root in roots:
            print("ingest", root.name, ingest_corpus(root, args.collection, args.model))
    report = {"collection": args.collection, "label": args.label, "corpora": {}}
    for root in roots:
        report["corpora"][root.name] = run_corpus(root, args.collection, embedder, args.limit)
        for key, entry in report["corpora"][root.name].items():
            print(root.name, key, json.dumps(entry))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
