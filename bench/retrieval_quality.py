"""Retrieval quality on ../shared/corpora: gold-document recall@1/@5 and gold-image coverage.

Ingests each corpus into its own collection (in this process, through the same functions the
worker runs), then retrieves every question and scores it against the gold fields:
- doc recall@k: the question's `doc_id` is among the documents of the top-k passages;
- image coverage: the share of the question's gold images found among the candidate images.

Run against a running local cluster (`m2io up`):
    .venv/bin/python bench/retrieval_quality.py [--corpora DIR] [--top-k 5] [--out bench/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from services.common.contracts import DEFAULT_CANDIDATES
from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, get_embedder
from services.common.storage import get_store
from services.retriever.importers import read_corpus
from services.retriever.ingest import ensure_collection, index_documents, stage_document
from services.retriever.ocr import ImageTextReader
from services.retriever.search import get_collection, retrieve
from services.retriever.sources import SourceDocument

DEFAULT_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def ingest_corpus(root: Path, collection_name: str, model: str) -> dict:
    store = get_store()
    store.ensure_bucket()
    embedder = get_embedder(model)
    payloads = []
    for item in read_corpus(root):
        if isinstance(item, SourceDocument):
            payload, _ = stage_document(store, item)
            payloads.append(payload)
    reader = ImageTextReader.from_settings(store)  # M2IO_OCR decides, as in the retriever worker
    started = time.perf_counter()
    with session_scope() as session:
        collection = ensure_collection(session, collection_name, model, embedder.dimension)
        outcomes = []
        for start in range(0, len(payloads), 16):
            outcomes += index_documents(session, collection, payloads[start : start + 16], embedder, reader)
    return {
        "documents": len(payloads),
        "seconds": round(time.perf_counter() - started, 2),
        "ingested": sum(o.status == "ingested" for o in outcomes),
    }


def image_name(source_name: str) -> str:
    return source_name.rsplit("/", 1)[-1]


def score_corpus(root: Path, collection_name: str, model: str, top_k: int, candidates: int) -> dict:
    embedder = get_embedder(model)
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines() if line.strip()]
    hits1 = hits5 = 0
    covered = total_gold = 0
    cutoffs = [k for k in (3, 5, 8) if k < candidates] + [candidates]
    covered_at = dict.fromkeys(cutoffs, 0)
    gold_among_candidates = []
    candidate_counts = []
    misses = []
    latencies = []
    with session_scope() as session:
        collection = get_collection(session, collection_name)
        for question in questions:
            started = time.perf_counter()
            result = retrieve(
                session, collection, question["question"], embedder, top_k=top_k, max_candidates=candidates
            )
            latencies.append(time.perf_counter() - started)
            docs = [p.doc_key for p in result.passages]
            hits1 += bool(docs[:1] and docs[0] == question["doc_id"])
            hits5 += question["doc_id"] in docs[:5]
            ranked = [image_name(c.source_name) for c in result.candidates]
            found = set(ranked)
            gold = [image_name(g) for g in question.get("gold_images", [])]
            covered += sum(g in found for g in gold)
            for k in cutoffs:
                covered_at[k] += sum(g in ranked[:k] for g in gold)
            if ranked:
                gold_among_candidates.append(sum(name in gold for name in ranked) / len(ranked))
            total_gold += len(gold)
            candidate_counts.append(len(result.candidates))
            if question["doc_id"] not in docs[:5] or any(g not in found for g in gold):
                misses.append(
                    {
                        "id": question["id"],
                        "question": question["question"],
                        "top_docs": docs,
                        "missing_images": [g for g in gold if g not in found],
                    }
                )
    latencies.sort()
    return {
        "questions": len(questions),
        "doc_recall@1": round(hits1 / len(questions), 3),
        "doc_recall@5": round(hits5 / len(questions), 3),
        "gold_image_coverage": round(covered / total_gold, 3) if total_gold else None,
        "gold_images": total_gold,
        "gold_image_coverage_at": {k: round(v / total_gold, 3) for k, v in covered_at.items()} if total_gold else {},
        "gold_share_of_candidates": round(sum(gold_among_candidates) / len(gold_among_candidates), 3)
        if gold_among_candidates
        else None,
        "mean_candidates": round(sum(candidate_counts) / len(candidate_counts), 1),
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "misses": misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    report = {}
    for root in sorted(p for p in args.corpora.iterdir() if (p / "questions.jsonl").exists()):
        name = f"bench-{root.name}"
        entry = {} if args.skip_ingest else {"ingest": ingest_corpus(root, name, args.model)}
        entry.update(score_corpus(root, name, args.model, args.top_k, args.candidates))
        report[root.name] = entry
        summary = {k: v for k, v in entry.items() if k != "misses"}
        print(root.name, json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
