"""Answer quality on ../shared/corpora: the MRAMG metrics for each inserter and generator backend.

Two settings, on every question of each corpus (collections `bench-<corpus>` from
bench/retrieval_quality.py are ingested first if missing):
- gold text: the gold answer's own sentences are given, so only the inserter is measured;
- end to end: retrieved passages -> generator -> inserter.
Baselines: `random` (as many random candidates as the gold has images, at random slots, seeded)
and `top-first` (the best-scored candidate before the first sentence).
Latency per answer is measured per backend, and tokens/s for LM backends.

    .venv/bin/python bench/answer_quality.py [--inserters rule llm random top-first] \
        [--generators extractive local] [--limit N] [--lm-limit 20] [--out bench/results/answers.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from bench.retrieval_quality import DEFAULT_CORPORA, ingest_corpus
from services.common.contracts import AnswerUnit, InsertionPlan, Placement, Retrieval
from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, get_embedder
from services.common.metrics import aggregate, answer_metrics, parse_gold_answer
from services.generator.core import generate
from services.inserter.core import insert
from services.retriever.search import UnknownCollection, get_collection, retrieve


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


def score(units: list[AnswerUnit], plan: InsertionPlan, question: dict) -> dict:
    ordered = [basename(p.image) for p in sorted(plan.placements, key=lambda p: p.after)]
    positions = {basename(p.image): p.after for p in plan.placements}
    texts = [unit.text for unit in units]
    return answer_metrics(texts, ordered, positions, question["gold_answer"], question.get("gold_images", []))


def run_corpus(root: Path, args) -> dict:
    name = f"bench-{root.name}"
    embedder = get_embedder(args.model)
    with session_scope() as session:
        try:
            get_collection(session, name)
        except UnknownCollection:
            ingest_corpus(root, name, args.model)
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines() if line.strip()]
    if args.limit:
        questions = questions[: args.limit]
    rows: dict[str, list[dict]] = {}
    latencies: dict[str, list[float]] = {}
    tokens: dict[str, list[tuple[int, float]]] = {}
    fallbacks: dict[str, int] = {}
    with session_scope() as session:
        collection = get_collection(session, name)
        retrievals = [retrieve(session, collection, q["question"], embedder) for q in questions]
    for index, (question, retrieval) in enumerate(zip(questions, retrievals, strict=True)):
        gold_units_text, _ = parse_gold_answer(question["gold_answer"], question.get("gold_images", []))
        gold_units = [AnswerUnit(text=text) for text in gold_units_text]
        for inserter in args.inserters:
            if inserter in ("llm",) and index >= args.lm_limit:
                continue
            started = time.perf_counter()
            if inserter in ("random", "top-first"):
                plan = baseline_plan(inserter, gold_units, retrieval, len(question.get("gold_images", [])), index)
            else:
                plan = insert(gold_units, retrieval.candidates, inserter, embedder)
                if plan.fallback_reason:
                    fallbacks[f"gold/{inserter}"] = fallbacks.get(f"gold/{inserter}", 0) + 1
            latencies.setdefault(f"gold/{inserter}", []).append(time.perf_counter() - started)
            rows.setdefault(f"gold/{inserter}", []).append(score(gold_units, plan, question))
        for generator in args.generators:
            if generator.startswith(("local", "openai")) and index >= args.lm_limit:
                continue
            started = time.perf_counter()
            answer = generate(retrieval, generator, embedder)
            generated = time.perf_counter() - started
            if answer.completion_tokens:
                tokens.setdefault(generator, []).append((answer.completion_tokens, generated))
            for inserter in ("rule", "top-first"):
                started = time.perf_counter()
                if inserter == "rule":
                    plan = insert(answer.units, retrieval.candidates, "rule", embedder)
                else:
                    plan = baseline_plan(inserter, answer.units, retrieval, 0, index)
                key = f"e2e/{generator}+{inserter}"
                latencies.setdefault(key, []).append(generated + time.perf_counter() - started)
                rows.setdefault(key, []).append(score(answer.units, plan, question))
    report = {}
    for key, values in rows.items():
        entry = aggregate(values)
        times = sorted(latencies[key])
        entry["latency_p50_ms"] = round(statistics.median(times) * 1000, 1)
        entry["latency_p99_ms"] = round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 1)
        if key in fallbacks:
            entry["fallbacks"] = fallbacks[key]
        report[key] = entry
    for generator, pairs in tokens.items():
        report.setdefault("tokens_per_s", {})[generator] = round(sum(t for t, _ in pairs) / sum(s for _, s in pairs), 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--inserters", nargs="+", default=["rule", "random", "top-first"])
    parser.add_argument("--generators", nargs="+", default=["extractive"])
    parser.add_argument("--limit", type=int, default=0, help="questions per corpus (0 = all)")
    parser.add_argument("--lm-limit", type=int, default=20, help="questions per corpus for LM backends")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {}
    for root in sorted(p for p in args.corpora.iterdir() if (p / "questions.jsonl").exists()):
        report[root.name] = run_corpus(root, args)
        for key, entry in report[root.name].items():
            print(root.name, key, json.dumps(entry))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
