"""OCR at ingest, on and off, on ../shared/corpora: what reading the words inside images costs and buys.

For each corpus, three fresh collections are indexed through the worker's own functions (stage, then
`index_documents` in batches of 8 documents, as the retriever worker does):
- `bench-ocr-off-<corpus>`: no OCR;
- `bench-ocr-on-<corpus>`: OCR with a cold cache (the corpus's rows of `image_texts` deleted first);
- `bench-ocr-warm-<corpus>`: OCR again, the cache now full (what a re-ingest or a second collection costs).
Reported: (a) OCR seconds per image (S3 read, decode, tesseract) and ingest seconds; (b) candidate
image recall (the share of gold images among the retriever's candidates, as
services/jobs/evaluate.py's `retrieval_image_recall`) and doc recall@5; (c) the rule inserter's image
P/R/F1 given the gold answer text (bench/answer_quality.py's "gold text" setting), and which evidence
placed its images.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python -m bench.ocr [--corpora DIR] [--limit N] \
        [--out bench/results/ocr.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import delete

from bench.answer_quality import basename, score
from bench.retrieval_quality import DEFAULT_CORPORA
from services.common.contracts import DEFAULT_CANDIDATES, AnswerUnit, StagedDocument, StagedImage
from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, Embedder, get_embedder
from services.common.metrics import aggregate, parse_gold_answer
from services.common.models import Collection, ImageText
from services.common.settings import get_settings
from services.common.storage import get_store
from services.common.vectors import QueryVectors
from services.inserter.core import insert
from services.jobs.evaluate import retrieval_metrics
from services.retriever.importers import read_corpus
from services.retriever.ingest import ensure_collection, index_documents, stage_document
from services.retriever.ingest_runs import BATCH_DOCUMENTS
from services.retriever.ocr import ImageTextReader, Reading, clean_image_text, resolve_engine
from services.retriever.search import get_collection, retrieve
from services.retriever.sources import SourceDocument


class TimedReader(ImageTextReader):
    """The worker's reader, timing each image it reads (S3 read, decode, tesseract)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []
        self.readings: list[Reading] = []

    def read(self, image: StagedImage) -> Reading:
        started = time.perf_counter()
        reading = super().read(image)
        self.seconds.append(time.perf_counter() - started)
        self.readings.append(reading)
        return reading


def stage(root: Path) -> list[StagedDocument]:
    store = get_store()
    store.ensure_bucket()
    return [stage_document(store, item)[0] for item in read_corpus(root) if isinstance(item, SourceDocument)]


def ingest(name: str, payloads: list[StagedDocument], embedder: Embedder, reader: TimedReader | None) -> dict:
    with session_scope() as session:
        session.execute(delete(Collection).where(Collection.name == name))  # fresh: every document indexed
    started = time.perf_counter()
    warnings = 0
    for start in range(0, len(payloads), BATCH_DOCUMENTS):
        with session_scope() as session:
            collection = ensure_collection(session, name, embedder.name, embedder.dimension)
            outcomes = index_documents(session, collection, payloads[start : start + BATCH_DOCUMENTS], embedder, reader)
            warnings += sum(len(outcome.warnings) for outcome in outcomes)
    seconds = time.perf_counter() - started
    report = {"documents": len(payloads), "ingest_s": round(seconds, 1), "warnings": warnings}
    if reader is not None:
        times = sorted(reader.seconds)
        texts = [clean_image_text(r.text) for r in reader.readings]
        report.update(
            {
                "images_read": len(times),
                "ocr_s_total": round(sum(times), 1),
                "ocr_share_of_ingest": round(sum(times) / seconds, 3) if seconds else None,
                "ocr_s_per_image": {
                    "mean": round(statistics.mean(times), 3) if times else None,
                    "p50": round(times[len(times) // 2], 3) if times else None,
                    "p90": round(times[int(len(times) * 0.9)], 3) if times else None,
                    "max": round(times[-1], 3) if times else None,
                },
                "images_with_text": sum(bool(text) for text in texts),
                "mean_text_chars": round(statistics.mean(len(t) for t in texts if t), 1) if any(texts) else 0,
                "errors": sum(bool(r.error) for r in reader.readings),
            }
        )
    return report


def quality(root: Path, name: str, embedder: Embedder, limit: int) -> dict:
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines() if line.strip()]
    questions = questions[:limit] if limit else questions
    recalls, doc_hits, rows = [], [], []
    cutoffs = (1, 3, 5)
    recall_at: dict[int, list[float]] = {k: [] for k in cutoffs}
    evidence: Counter = Counter()
    evidence_right: Counter = Counter()
    with session_scope() as session:
        collection = get_collection(session, name)
        for question in questions:
            retrieval = retrieve(
                session, collection, question["question"], embedder, top_k=5, max_candidates=DEFAULT_CANDIDATES
            )
            found = retrieval_metrics(retrieval, question)
            gold = {basename(g) for g in question.get("gold_images", [])}
            if found["retrieval_image_recall"] is not None:
                recalls.append(found["retrieval_image_recall"])
                ranked = [basename(c.source_name) for c in retrieval.candidates]
                for k in cutoffs:  # the candidates come best first: how high the gold ones rank
                    recall_at[k].append(len(gold & set(ranked[:k])) / len(gold))
            doc_hits.append(found["retrieval_doc_hit"])
            texts, _ = parse_gold_answer(question["gold_answer"], question.get("gold_images", []))
            units = [AnswerUnit(text=text) for text in texts]
            plan = insert(units, retrieval.candidates, "rule", QueryVectors(embedder, session))
            rows.append(score(units, plan, question))
            for placement in plan.placements:
                evidence[placement.evidence] += 1
                evidence_right[placement.evidence] += basename(placement.image) in gold
    rule = aggregate(rows)
    return {
        "questions": len(questions),
        "candidate_image_recall": round(statistics.mean(recalls), 4) if recalls else None,
        "candidate_image_recall_at": {k: round(statistics.mean(v), 4) for k, v in recall_at.items() if v},
        "doc_recall@5": round(statistics.mean(h for h in doc_hits if h is not None), 4),
        "rule_gold_text": {k: round(v, 4) if isinstance(v, float) else v for k, v in rule.items()},
        "placements_by_evidence": dict(evidence),
        "gold_placements_by_evidence": dict(evidence_right),
    }


def run_corpus(root: Path, args) -> dict:
    embedder = get_embedder(args.model)
    embedder.warm_up()
    started = time.perf_counter()
    payloads = stage(root)
    report: dict = {"staging_s": round(time.perf_counter() - started, 1)}
    settings = get_settings()
    engine, reason = resolve_engine("on")
    if not engine:
        raise SystemExit(f"OCR cannot run here: {reason}")
    report["engine"] = engine
    shas = sorted({image.sha256 for payload in payloads for image in payload.images})
    with session_scope() as session:
        session.execute(delete(ImageText).where(ImageText.sha256.in_(shas)))  # a cold cache
    for mode in ("off", "on", "warm"):
        name = f"bench-ocr-{mode}-{root.name}"
        reader = None
        if mode != "off":
            reader = TimedReader(
                get_store(), engine, timeout_s=settings.ocr_timeout_s, budget_s=settings.visibility_timeout_s / 3
            )
        entry = {"ingest": ingest(name, payloads, embedder, reader)}
        if mode != "warm":
            entry.update(quality(root, name, embedder, args.limit))
        report[mode] = entry
        print(root.name, mode, json.dumps(entry), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--limit", type=int, default=0, help="questions per corpus (0 = all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {}
    for root in sorted(p for p in args.corpora.iterdir() if (p / "questions.jsonl").exists()):
        report[root.name] = run_corpus(root, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
