"""Routing across collections (issue 16): one mixed job of every development question, routed among the
corpora's own collections, against the same questions sent to the right collection each and to one
collection holding every corpus.

Each corpus of ../shared/corpora is its own collection (`bench-<corpus>`, as bench/job_load makes them) and
all of them together are `bench-dev` (as bench/answer_quality makes it); missing ones are ingested here.
Three jobs through the local cluster's queues (extractive + rule):
- `routed`: every question, the job naming every corpus's collection: the router chooses per question;
- `pinned`: every question with its own corpus's collection (`collection` on its line): no routing;
- `merged`: every question against `bench-dev`.
Reported: routing accuracy (the chosen collection is the gold document's corpus), image F1 / ordering /
position per corpus and job, routing cost per question (the router's own seconds, and the retriever's p50 in
the routed and the pinned job), follow-up retrievals, questions found unanswerable.

Run against a local cluster (`m2io up`):
    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m bench.routing [--out bench/results/routing.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.job_load import collection_exists, ensure_collections, git_commit
from bench.retrieval_quality import DEFAULT_CORPORA, ingest_corpus
from services.client import Client
from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL
from services.common.models import Query
from services.common.queues import Stage
from services.common.stage_runs import outputs_of_job
from services.jobs.evaluate import score_job

METRICS = ("image_f1", "ordering", "position_accuracy", "rouge_l", "section_hit")
BACKENDS = {"generator": "extractive", "inserter": "rule"}
# Questions no development corpus answers (general knowledge, other trades), added to the routed job only:
# the router should find them unanswerable, while finding every corpus question answerable.
OFF_TOPIC = (
    "What is the capital of Australia?",
    "Who painted the Mona Lisa?",
    "How many moons does Jupiter have?",
    "What year did the Berlin Wall fall?",
    "How do I file a tax return?",
    "Who wrote War and Peace?",
    "How does a credit card interest rate work?",
    "What is the tallest mountain in Africa?",
    "How do I learn to play the violin?",
    "What causes the northern lights?",
)


def corpus_roots(corpora: Path) -> list[Path]:
    return sorted(p for p in corpora.iterdir() if (p / "questions.jsonl").exists())


def load_questions(roots: list[Path]) -> list[dict[str, Any]]:
    records = []
    for root in roots:
        for line in (root / "questions.jsonl").read_text().splitlines():
            if line.strip():
                records.append({**json.loads(line), "corpus": root.name})
    return records


def ensure_merged(roots: list[Path], name: str, model: str) -> None:
    if collection_exists(name):
        return
    for root in roots:
        print(f"ingesting {root} into {name} ...", flush=True)
        print(ingest_corpus(root, name, model), flush=True)


def run_job(client: Client, records: list[dict[str, Any]], collections: str | list[str], label: str) -> str:
    questions = [{k: v for k, v in r.items() if k != "corpus"} for r in records]  # off-topic ones have no gold
    job_id = client.submit(questions, collections, name=f"bench-routing-{label}", **BACKENDS)
    final = client.wait(job_id, stall_timeout=600)
    print(f"{label}: job {job_id} {final.state} in {final.elapsed_s} s", flush=True)
    return str(job_id)


def per_corpus(report: dict[str, Any], corpus_of: dict[str, str]) -> dict[str, dict[str, float]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in report["per_question"]:  # only questions with a gold answer are scored
        rows.setdefault(corpus_of[row["id"]], []).append(row)
    return {
        corpus: {metric: round(statistics.fmean(r.get(metric) or 0.0 for r in chosen), 4) for metric in METRICS}
        | {"questions": len(chosen)}
        for corpus, chosen in sorted(rows.items())
    }


def routing_record(job_id: str, gold_collection: dict[str, str]) -> dict[str, Any]:
    with session_scope() as session:
        external = dict(session.execute(select(Query.id, Query.external_id).where(Query.job_id == job_id)).all())
    outputs = outputs_of_job(job_id, [Stage.RETRIEVER])
    correct = follow_ups = unanswerable = off_topic_refused = 0
    seconds: list[float] = []
    misses = []
    for query_id, found in outputs.items():
        routing = found.retrieval.routing
        key = external[query_id]
        chosen = routing.chosen[0] if routing.chosen else None
        if key not in gold_collection:  # an off-topic question
            off_topic_refused += not routing.answerable
            continue
        correct += chosen == gold_collection[key]
        follow_ups += len(routing.steps) > 1
        unanswerable += not routing.answerable
        seconds.append(routing.seconds)
        if chosen != gold_collection[key]:
            misses.append({"id": key, "chosen": chosen, "gold": gold_collection[key], "reason": routing.reason})
    corpus_questions = len(outputs) - sum(key not in gold_collection for key in external.values())
    return {
        "questions": corpus_questions,
        "accuracy": round(correct / corpus_questions, 4),
        "off_topic_questions": len(external) - corpus_questions,
        "off_topic_found_unanswerable": off_topic_refused,
        "follow_ups": follow_ups,
        "unanswerable": unanswerable,
        "router_ms_p50": round(1000 * statistics.median(seconds), 2),
        "router_ms_mean": round(1000 * statistics.fmean(seconds), 2),
        "misses": misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--merged", default="bench-dev", help="the one collection holding every corpus")
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing.json"))
    args = parser.parse_args()

    roots = corpus_roots(args.corpora)
    ensure_collections(args.corpora, DEFAULT_EMBEDDING_MODEL)
    ensure_merged(roots, args.merged, DEFAULT_EMBEDDING_MODEL)
    records = load_questions(roots)
    own = {root.name: f"bench-{root.name}" for root in roots}
    corpus_of = {r["id"]: r["corpus"] for r in records}
    gold_collection = {r["id"]: own[r["corpus"]] for r in records}

    client = Client()
    # A few questions first, not measured: every worker process has taken a message before the jobs are timed.
    run_job(client, [{**r, "collection": own[r["corpus"]]} for r in records[::25]], own[roots[0].name], "warm-up")
    jobs = {
        "routed": run_job(
            client,
            records + [{"id": f"off-topic-{n}", "question": q} for n, q in enumerate(OFF_TOPIC, 1)],
            list(own.values()),
            "routed",
        ),
        # each line pins its own corpus's collection (the job's own is only a default)
        "pinned": run_job(
            client, [{**r, "collection": own[r["corpus"]]} for r in records], own[roots[0].name], "pinned"
        ),
        "merged": run_job(client, records, args.merged, "merged"),
    }
    result: dict[str, Any] = {"commit": git_commit(), "jobs": {}, "backends": BACKENDS}
    for label, job_id in jobs.items():
        report = score_job(job_id, record=False)
        status = client.status(job_id)
        retriever = next(s for s in status.stages if s.stage == Stage.RETRIEVER.value)
        result["jobs"][label] = {
            "job_id": job_id,
            "state": status.state,
            "questions_per_s": status.questions_per_s,
            "retriever_p50_ms": round(1000 * (retriever.p50_s or 0), 2),
            "retriever_p99_ms": round(1000 * (retriever.p99_s or 0), 2),
            "overall": {m: report["aggregate"].get(m) for m in METRICS},
            "per_corpus": per_corpus(report, corpus_of),
        }
    result["routing"] = routing_record(jobs["routed"], gold_collection)
    routed, pinned = result["jobs"]["routed"], result["jobs"]["pinned"]
    result["f1_gap_routed_vs_pinned"] = {
        corpus: round(routed["per_corpus"][corpus]["image_f1"] - pinned["per_corpus"][corpus]["image_f1"], 4)
        for corpus in routed["per_corpus"]
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "jobs"}
            | {
                "jobs": {
                    label: {
                        "overall": job["overall"],
                        "per_corpus": job["per_corpus"],
                        "retriever_p50_ms": job["retriever_p50_ms"],
                    }
                    for label, job in result["jobs"].items()
                }
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
