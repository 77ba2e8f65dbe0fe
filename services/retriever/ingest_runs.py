"""Ingest runs through the queue: the CLI reads the corpus, verifies and stores images, records one
item per document, and enqueues batches; retriever workers index them (this is what scales with
workers); the CLI follows progress from the item rows. Everything skipped keeps its reason."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from services.common.contracts import IngestBatch, StagedDocument
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.models import Collection, IngestItem, IngestRun
from services.common.stage_runs import now
from services.common.storage import ObjectStore
from services.retriever.importers import Skipped, SourceDocument, detect_layout, read_corpus
from services.retriever.ingest import CollectionModelMismatch, ensure_collection, index_documents, stage_document

BATCH_DOCUMENTS = 8  # documents per message: enough to batch embeddings, small enough to spread


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
    """Read the corpus, store its images, and record the run with one item per document."""
    layout = detect_layout(path)
    with session_scope() as session:
        run = IngestRun(collection_name=collection_name, embedding_model=model, source=str(path), layout=layout)
        session.add(run)
        session.flush()
        run_id = run.id
    staged = StagedRun(run_id=run_id, documents=0)
    image_warnings: dict[str, list[str]] = {}
    pending: list[tuple[SourceDocument, StagedDocument, list[Skipped]]] = []
    for item in read_corpus(path):
        if isinstance(item, Skipped):
            if item.doc_key is not None:
                image_warnings.setdefault(item.doc_key, []).append(f"{item.what}: {item.reason}")
            staged.skipped.append(item)
            continue
        payload, image_skips = stage_document(store, item)
        staged.skipped += image_skips
        pending.append((item, payload, image_skips))
        on_document(item.doc_key)
    with session_scope() as session:
        for skipped in staged.skipped:
            if skipped.doc_key is None:  # the input never became a document
                session.add(
                    IngestItem(
                        run_id=run_id, what=skipped.what, status="skipped", reason=skipped.reason, finished_at=now()
                    )
                )
        ids = []
        for document, payload, image_skips in pending:
            warnings = image_warnings.get(document.doc_key, []) + [f"{s.what}: {s.reason}" for s in image_skips]
            item = IngestItem(
                run_id=run_id,
                doc_key=document.doc_key,
                what=document.source_path,
                status="pending",
                payload=payload.model_dump(mode="json"),
                warnings=warnings,
            )
            session.add(item)
            session.flush()
            ids.append(item.id)
    staged.documents = len(ids)
    staged.batches = [ids[i : i + BATCH_DOCUMENTS] for i in range(0, len(ids), BATCH_DOCUMENTS)]
    return staged


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


def finish_run(run_id: uuid.UUID) -> IngestRun:
    counts = item_counts(run_id)
    with session_scope() as session:
        run = session.get(IngestRun, run_id)
        run.status = "done" if not counts.get("failed") else "done with failures"
        if counts.get("pending"):
            run.status = "incomplete"
        run.finished_at = now()
        return run


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
        return {"already_done": True}
    embedder = get_embedder(model)
    try:
        return {"documents": index_items(batch.run_id, list(pending), collection_name, embedder)}
    except CollectionModelMismatch as error:
        mark_failed(list(pending), str(error))
        return {"failed": str(error)}
    except SQLAlchemyError:
        raise  # transient ones are retried by the task policy
    except Exception:  # noqa: BLE001 - isolate the document that breaks the batch
        results = 0
        for item_id in pending:
            try:
                results += index_items(batch.run_id, [item_id], collection_name, embedder)
            except SQLAlchemyError:
                raise
            except Exception as error:  # noqa: BLE001 - recorded on the item, the rest goes on
                mark_failed([item_id], f"{type(error).__name__}: {error}")
        return {"documents": results, "isolated": True}


def index_items(run_id: uuid.UUID, item_ids: list[int], collection_name: str, embedder) -> int:
    with session_scope() as session:
        items = session.scalars(
            select(IngestItem)
            .where(IngestItem.id.in_(item_ids), IngestItem.status == "pending")
            .order_by(IngestItem.id)
            .with_for_update(skip_locked=True)
        ).all()
        if not items:
            return 0
        collection = ensure_collection(session, collection_name, embedder.name, embedder.dimension)
        session.execute(update(IngestRun).where(IngestRun.id == run_id).values(collection_id=collection.id))
        documents = [StagedDocument.model_validate(item.payload) for item in items]
        outcomes = index_documents(session, collection, documents, embedder)
        for item, outcome in zip(items, outcomes, strict=True):
            item.status = outcome.status
            item.chunks = outcome.chunks
            item.images = outcome.images
            item.finished_at = now()
        return len(items)


def mark_failed(item_ids: list[int], reason: str) -> None:
    with session_scope() as session:
        session.execute(
            update(IngestItem)
            .where(IngestItem.id.in_(item_ids), IngestItem.status == "pending")
            .values(status="failed", reason=reason[:4000], finished_at=now())
        )
