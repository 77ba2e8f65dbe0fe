"""Ingest runs through the queue: the CLI reads the corpus, verifies and stores images, records one
item per document, and enqueues batches; retriever workers index them (this is what scales with
workers); the CLI follows progress from the item rows. Everything skipped keeps its reason.

A run is `staging` while the CLI reads the corpus (`failed`, with its error, if that stops), then
`running`. Its state is computed from its items (`run_state`): once none is pending it is done,
whatever became of the CLI or of a worker. A worker writes each document in its own short
transaction and locks the run row never for longer than that; the CLI never waits on a lock."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from services.common.contracts import IngestBatch, StagedDocument
from services.common.db import get_engine, session_scope
from services.common.embedding import get_embedder
from services.common.models import Collection, IngestItem, IngestRun
from services.common.stage_runs import now
from services.common.storage import ObjectStore, get_store
from services.common.text import printable, unstorable
from services.retriever.importers import detect_layout, read_corpus
from services.retriever.ingest import (
    CollectionModelMismatch,
    IndexOutcome,
    embed,
    ensure_collection,
    prepare,
    read_image_texts,
    stage_document,
    write,
)
from services.retriever.ocr import ImageTextReader
from services.retriever.sources import Skipped, SourceDocument
from services.retriever.vector_index import refresh_vector_indexes

log = logging.getLogger(__name__)

BATCH_DOCUMENTS = 8  # documents per message: enough to batch embeddings, small enough to spread
# ...and at most this much Markdown per message (one bigger document goes alone), so one message's
# work stays far inside the visibility timeout and a redelivery finds most of it done.
BATCH_BYTES = 1024 * 1024
MAX_DOC_KEY = 1000  # ingest_items.doc_key, documents.doc_key
LOCK_NOT_AVAILABLE = "55P03"  # Postgres' error for lock_timeout and NOWAIT


@dataclass
class StagedRun:
    run_id: uuid.UUID
    documents: int
    skipped: list[Skipped] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)


def check_collection_model(collection_name: str, model: str) -> None:
    """Fail before any work when the collection exists with another model."""
    with session_scope() as session:
        existing = session.execute(select(Collection).where(Collection.name == collection_name)).scalar_one_or_none()
        if existing is not None and existing.embedding_model != model:
            raise CollectionModelMismatch(
                f"collection {collection_name!r} was built with {existing.embedding_model!r} "
                f"({existing.embedding_dim}-d); it cannot take vectors of {model!r}. Use --model "
                f"{existing.embedding_model} or another collection name."
            )


def stage_run(
    path: Path,
    collection_name: str,
    model: str,
    store: ObjectStore,
    on_document: Callable[[str], None] = lambda _: None,
) -> StagedRun:
    """Read the corpus, store its images, and record the run with one item per document. Should
    reading stop (an error, Ctrl-C), the run is marked `failed` with the error, never left `running`."""
    layout = detect_layout(path)
    with session_scope() as session:
        run = IngestRun(
            collection_name=collection_name,
            embedding_model=model,
            source=printable(str(path)),
            layout=layout,
            status="staging",
        )
        session.add(run)
        session.flush()
        run_id = run.id
    try:
        return record_items(run_id, path, store, on_document)
    except BaseException as error:
        with contextlib.suppress(SQLAlchemyError), session_scope() as session:
            session.execute(
                update(IngestRun)
                .where(IngestRun.id == run_id)
                .values(status="failed", error=printable(f"{type(error).__name__}: {error}"), finished_at=now())
            )
        raise


def record_items(run_id: uuid.UUID, path: Path, store: ObjectStore, on_document: Callable[[str], None]) -> StagedRun:
    staged = StagedRun(run_id=run_id, documents=0)
    image_warnings: dict[str, list[str]] = {}
    pending: list[tuple[SourceDocument, dict[str, Any], list[Skipped]]] = []
    for item in read_corpus(path):
        if isinstance(item, Skipped):
            if item.doc_key is not None:
                image_warnings.setdefault(item.doc_key, []).append(f"{item.what}: {item.reason}")
            staged.skipped.append(item)
            continue
        payload, image_skips = stage_document(store, item)
        record = payload.model_dump(mode="json")
        # the importers refuse such text already; this is the last check before Postgres
        problem = unstorable(record) or (len(item.doc_key) > MAX_DOC_KEY and f"key over {MAX_DOC_KEY} characters")
        if problem:
            staged.skipped.append(Skipped(item.source_path, f"document {problem}"))
            continue
        staged.skipped += image_skips
        pending.append((item, record, image_skips))
        on_document(item.doc_key)
    with session_scope() as session:
        for skipped in staged.skipped:
            if skipped.doc_key is None:  # the input never became a document
                session.add(
                    IngestItem(
                        run_id=run_id,
                        what=printable(skipped.what),
                        status="skipped",
                        reason=printable(skipped.reason),
                        finished_at=now(),
                    )
                )
        ids, sizes = [], []
        for document, record, image_skips in pending:
            warnings = image_warnings.get(document.doc_key, []) + [f"{s.what}: {s.reason}" for s in image_skips]
            item = IngestItem(
                run_id=run_id,
                doc_key=document.doc_key,
                what=document.source_path,
                status="pending",
                payload=record,
                warnings=[printable(warning) for warning in warnings],
            )
            session.add(item)
            session.flush()
            ids.append(item.id)
            sizes.append(len(document.markdown.encode()))
        session.execute(update(IngestRun).where(IngestRun.id == run_id).values(status="running"))
    staged.documents = len(ids)
    staged.batches = batches(ids, sizes)
    return staged


def batches(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """Consecutive items, up to BATCH_DOCUMENTS and BATCH_BYTES of Markdown per message.

    >>> batches([1, 2, 3, 4], [600_000, 600_000, 10, 3_000_000])
    [[1], [2, 3], [4]]
    """
    grouped: list[list[int]] = []
    total = 0
    for item_id, size in zip(ids, sizes, strict=True):
        if not grouped or len(grouped[-1]) >= BATCH_DOCUMENTS or total + size > BATCH_BYTES:
            grouped.append([])
            total = 0
        grouped[-1].append(item_id)
        total += size
    return grouped


def enqueue(staged: StagedRun) -> None:
    from services.common.celery_app import app

    for batch in staged.batches:
        message = IngestBatch(run_id=staged.run_id, item_ids=batch)
        app.send_task("retriever.ingest", args=[message.model_dump(mode="json")])


def item_counts(run_id: uuid.UUID) -> Counter:
    with session_scope() as session:
        rows = session.execute(
            select(IngestItem.status, func.count()).where(IngestItem.run_id == run_id).group_by(IngestItem.status)
        ).all()
    return Counter(dict(rows))


def run_state(stored: str, counts: Counter | dict[str, int]) -> str:
    """A run's state from its items: `staging` and `failed` (reading the corpus never finished) stay;
    with documents pending it is `running` (`incomplete` once the CLI stopped waiting); else `done`,
    or `done with failures` when a document failed.

    >>> run_state("incomplete", {"ingested": 3}), run_state("running", {"pending": 1, "failed": 1})
    ('done', 'running')
    """
    if stored in ("staging", "failed"):
        return stored
    if counts.get("pending"):
        return "incomplete" if stored == "incomplete" else "running"
    return "done with failures" if counts.get("failed") else "done"


def finish_run(run_id: uuid.UUID) -> IngestRun:
    """Close a run from the CLI: its state from its items (`incomplete` while documents are still
    pending). Never waits on a worker's lock: if the row is locked, the state is returned unwritten
    (it is computed from the items anyway, and the worker closes the run itself)."""
    counts = item_counts(run_id)
    with session_scope() as session:
        run = session.get(IngestRun, run_id)
        status = run_state(run.status, counts)
        status = "incomplete" if status == "running" else status
    try:
        with session_scope() as session:
            session.execute(text("SET LOCAL lock_timeout = '2s'"))
            session.execute(update(IngestRun).where(IngestRun.id == run_id).values(status=status, finished_at=now()))
    except OperationalError as error:
        if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        # a worker holds the row for a moment: the state stands unwritten (computed from the items)
    return IngestRun(id=run_id, collection_name=run.collection_name, status=status, error=run.error)


def close_if_finished(run_id: uuid.UUID) -> None:
    """The worker's side of closing: once no document of the run is pending, the run is done. Skips a
    row locked by someone else (who is closing it)."""
    counts = item_counts(run_id)
    if counts.get("pending"):
        return
    with session_scope() as session:
        run = session.execute(
            select(IngestRun)
            .where(IngestRun.id == run_id, IngestRun.status.in_(("running", "incomplete")))
            .with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if run is None:
            return
        run.status, run.finished_at = run_state(run.status, counts), now()
    # After the commit: the run is done whatever the indexes do. An index whose lists were fitted to far
    # fewer (or more) rows is rebuilt, concurrently (services/retriever/vector_index.py).
    try:
        refresh_vector_indexes(get_engine())
    except SQLAlchemyError as error:  # the next run's close tries again
        log.warning("vector index refresh after ingest run %s failed: %s", run_id, error)


# ------------------------------------------------------------------ worker side
def index_batch(batch: IngestBatch) -> dict[str, Any]:
    """Index the pending items of a batch. Idempotent: items already done are not touched again.
    A permanent error in one document fails that item only, with its reason."""
    with session_scope() as session:
        run = session.get(IngestRun, batch.run_id)
        if run is None:
            raise LookupError(f"ingest run {batch.run_id} does not exist")
        model = run.embedding_model
        collection_name = run.collection_name
        pending = session.scalars(
            select(IngestItem.id).where(
                IngestItem.id.in_(batch.item_ids), IngestItem.run_id == batch.run_id, IngestItem.status == "pending"
            )
        ).all()
    if not pending:
        close_if_finished(batch.run_id)  # a redelivery after the last document: the run is closed
        return {"already_done": True}
    embedder = get_embedder(model)
    reader = ImageTextReader.from_settings(get_store())
    try:
        result: dict[str, Any] = {
            "documents": index_items(batch.run_id, list(pending), collection_name, embedder, reader)
        }
    except CollectionModelMismatch as error:
        mark_failed(list(pending), str(error))
        result = {"failed": str(error)}
    except SQLAlchemyError:
        raise  # transient ones are retried by the task policy
    except Exception:  # noqa: BLE001 - isolate the document that breaks the batch
        results = 0
        for item_id in pending:
            try:
                results += index_items(batch.run_id, [item_id], collection_name, embedder, reader)
            except SQLAlchemyError:
                raise
            except Exception as error:  # noqa: BLE001 - recorded on the item, the rest goes on
                mark_failed([item_id], f"{type(error).__name__}: {error}")
        result = {"documents": results, "isolated": True}
    close_if_finished(batch.run_id)
    return result


def index_items(
    run_id: uuid.UUID, item_ids: list[int], collection_name: str, embedder, reader: ImageTextReader | None = None
) -> int:
    """Parse, chunk, read image texts and embed the pending items (no lock held meanwhile), then write
    each document in its own transaction: a redelivered message finds the written ones done, and two
    deliveries of one item write it once (the row lock is taken with SKIP LOCKED, and the status is read
    again under it)."""
    with session_scope() as session:
        rows = session.execute(
            select(IngestItem.id, IngestItem.payload)
            .where(IngestItem.id.in_(item_ids), IngestItem.status == "pending")
            .order_by(IngestItem.id)
        ).all()
        if not rows:
            return 0
        collection = ensure_collection(session, collection_name, embedder.name, embedder.dimension)
        session.execute(
            update(IngestRun)
            .where(IngestRun.id == run_id, IngestRun.collection_id.is_(None))
            .values(collection_id=collection.id)
        )
        documents = [StagedDocument.model_validate(row.payload) for row in rows]
        prepared, outcomes = prepare(session, collection, documents, reader.engine if reader else None)
    read_image_texts(prepared, reader, session_scope)
    embed(prepared, embedder)
    by_position = {entry.position: entry for entry in prepared}
    written = 0
    for position, row in enumerate(rows):
        with session_scope() as session:
            item = session.execute(
                select(IngestItem)
                .where(IngestItem.id == row.id, IngestItem.status == "pending")
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if item is None:  # another delivery holds it or has written it
                continue
            outcome: IndexOutcome = outcomes.get(position) or write(session, collection, by_position[position])
            item.status = outcome.status
            item.chunks = outcome.chunks
            item.images = outcome.images
            if outcome.warnings:
                item.warnings = [*item.warnings, *(printable(warning) for warning in outcome.warnings)]
            item.finished_at = now()
            written += 1
    return written


def mark_failed(item_ids: list[int], reason: str) -> None:
    with session_scope() as session:
        session.execute(
            update(IngestItem)
            .where(IngestItem.id.in_(item_ids), IngestItem.status == "pending")
            .values(status="failed", reason=reason[:4000], finished_at=now())
        )
