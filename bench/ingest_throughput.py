"""Ingestion throughput against its bound, the embedding model, in one run.

1. Stage both corpora of ../shared/corpora (read, verify images, store them in S3): timed apart.
2. Index every document into a fresh collection in this process (chunking, embedding, Postgres
   writes), recording the exact texts sent to the model.
3. Embed those same texts again with the same (already loaded) model and batch size: the raw
   embedding throughput, the bound ingestion approaches.
4. The same documents through the queue: a fresh collection, `m2io ingest`'s path (stage, enqueue,
   retriever workers index), timed until the last item is done.

Run against a running local cluster (`m2io up`, its retriever worker(s) up):
    .venv/bin/python bench/ingest_throughput.py [--out bench/results/ingest.json] [--skip-queue]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import uuid
from pathlib import Path

from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, Embedder
from services.common.storage import get_store
from services.retriever.importers import read_corpus
from services.retriever.ingest import ensure_collection, index_documents, stage_document
from services.retriever.ingest_runs import BATCH_DOCUMENTS, enqueue, item_counts, stage_run
from services.retriever.sources import SourceDocument

DEFAULT_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


class RecordingEmbedder(Embedder):
    """The real embedder, keeping the texts it was asked to embed and the time it took."""

    def __init__(self, name: str):
        super().__init__(name)
        self.texts: list[str] = []
        self.seconds = 0.0

    def encode(self, texts, batch_size=64):
        started = time.perf_counter()
        vectors = super().encode(texts, batch_size)
        self.seconds += time.perf_counter() - started
        self.texts += texts
        return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-queue", action="store_true")
    parser.add_argument("--queue-timeout", type=float, default=900)
    args = parser.parse_args()
    roots = sorted(p for p in args.corpora.iterdir() if (p / "docs").is_dir())
    store = get_store()
    store.ensure_bucket()

    started = time.perf_counter()
    payloads = []
    for root in roots:
        for item in read_corpus(root):
            if isinstance(item, SourceDocument):
                payloads.append(stage_document(store, item)[0])
    staging_seconds = time.perf_counter() - started

    embedder = RecordingEmbedder(args.model)
    embedder.warm_up()
    embedder.encode(["warm-up sentence"])  # first-call overheads are not ingestion
    embedder.texts.clear()
    embedder.seconds = 0.0
    name = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    chunks = images = 0
    with session_scope() as session:
        collection = ensure_collection(session, name, args.model, embedder.dimension)
        for start in range(0, len(payloads), BATCH_DOCUMENTS):
            for outcome in index_documents(session, collection, payloads[start : start + BATCH_DOCUMENTS], embedder):
                chunks += outcome.chunks
                images += outcome.images
    index_seconds = time.perf_counter() - started

    texts = list(embedder.texts)
    raw = Embedder(args.model)
    raw._model = embedder._model  # the same loaded weights, no second load
    started = time.perf_counter()
    for start in range(0, len(texts), BATCH_DOCUMENTS * 8):
        raw.encode(texts[start : start + BATCH_DOCUMENTS * 8])
    raw_seconds = time.perf_counter() - started

    report = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "documents": len(payloads),
        "chunks": chunks,
        "images": images,
        "texts_embedded": len(texts),
        "staging_seconds": round(staging_seconds, 2),
        "index_seconds": round(index_seconds, 2),
        "index_docs_per_s": round(len(payloads) / index_seconds, 2),
        "index_texts_per_s": round(len(texts) / index_seconds, 1),
        "embedding_share_of_index_time": round(embedder.seconds / index_seconds, 3),
        "raw_embedding_seconds": round(raw_seconds, 2),
        "raw_texts_per_s": round(len(texts) / raw_seconds, 1),
        "index_over_raw_throughput": round(raw_seconds / index_seconds, 3),
    }
    if not args.skip_queue:
        queue_name = f"bench-queue-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        runs = [stage_run(root, queue_name, args.model, store) for root in roots]
        staged_at = time.perf_counter()
        for staged in runs:
            enqueue(staged)
        total = sum(staged.documents for staged in runs)
        deadline = time.monotonic() + args.queue_timeout
        while time.monotonic() < deadline:
            pending = sum(item_counts(staged.run_id).get("pending", 0) for staged in runs)
            if not pending:
                break
            time.sleep(0.2)
        finished = time.perf_counter()
        report.update(
            {
                "queue_documents": total,
                "queue_stage_seconds": round(staged_at - started, 2),
                "queue_index_seconds": round(finished - staged_at, 2),
                "queue_docs_per_s": round(total / (finished - staged_at), 2),
                "queue_over_in_process": round(index_seconds / (finished - staged_at), 3),
            }
        )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
