"""Celery entry points of the retriever stage: thin wrappers (validate, call core, persist, enqueue next)."""

from __future__ import annotations

from typing import Any

from celery import Task

from services.common.contracts import IngestBatch, QueryRef, Retrieval
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.queues import Stage
from services.common.smoke import smoke_task
from services.common.stage_runs import query_context
from services.common.tasks import RefusedMessage, answer_task, queue_task
from services.retriever.ingest_runs import index_batch
from services.retriever.routing import route
from services.retriever.search import get_collection, retrieve

smoke = smoke_task(Stage.RETRIEVER)


@queue_task(Stage.RETRIEVER, "ingest", IngestBatch)
def ingest(batch: IngestBatch, task: Task) -> dict[str, Any]:
    try:
        return index_batch(batch)
    except LookupError as error:
        raise RefusedMessage(str(error)) from error


@answer_task(Stage.RETRIEVER)
def retrieve_for_query(ref: QueryRef, task: Task) -> Retrieval:
    context = query_context(ref.query_id)
    with session_scope() as session:
        if context.collection is None:  # the job names several collections: the router chooses
            collections = [get_collection(session, name) for name in context.config.searched]
            return route(
                session,
                collections,
                context.question,
                get_embedder(collections[0].embedding_model),  # submit checked that they share one model
                top_k=context.config.top_k,
                max_candidates=context.config.candidates,
            )
        collection = get_collection(session, context.collection)
        return retrieve(
            session,
            collection,
            context.question,
            get_embedder(collection.embedding_model),
            top_k=context.config.top_k,
            max_candidates=context.config.candidates,
        )
