"""Celery entry points of the retriever stage: thin wrappers (validate, call core, persist, enqueue next)."""

from __future__ import annotations

from typing import Any

from celery import Task

from services.common.contracts import IngestBatch, QueryRef
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.models import Job, Query
from services.common.queues import Stage
from services.common.smoke import smoke_task
from services.common.tasks import RefusedMessage, queue_task, send_to, stage_task
from services.retriever.ingest_runs import index_batch
from services.retriever.search import DEFAULT_CANDIDATES, DEFAULT_TOP_K, get_collection, retrieve

smoke = smoke_task(Stage.RETRIEVER)


@queue_task(Stage.RETRIEVER, "ingest", IngestBatch)
def ingest(batch: IngestBatch, task: Task) -> dict[str, Any]:
    try:
        return index_batch(batch)
    except LookupError as error:
        raise RefusedMessage(str(error)) from error


@stage_task(Stage.RETRIEVER, "retrieve", QueryRef, then=send_to("generator.generate"))
def retrieve_for_query(ref: QueryRef, task: Task) -> dict[str, Any]:
    with session_scope() as session:
        query = session.get(Query, ref.query_id)
        job = session.get(Job, query.job_id)
        config = job.config or {}
        collection_name = query.collection or config.get("collection")
        if not collection_name:
            raise ValueError("neither the question nor its job names a collection")
        collection = get_collection(session, collection_name)
        embedder = get_embedder(collection.embedding_model)
        retrieval = retrieve(
            session,
            collection,
            query.question,
            embedder,
            top_k=int(config.get("top_k", DEFAULT_TOP_K)),
            max_candidates=int(config.get("candidates", DEFAULT_CANDIDATES)),
        )
    return retrieval.model_dump(mode="json")
