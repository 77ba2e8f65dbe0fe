"""Celery entry points of the inserter stage: thin wrappers (validate, call core, persist, enqueue next).

LM backends run on a GPU when the worker has one (the model loader picks the device)."""

from __future__ import annotations

from celery import Task

from services.common.contracts import InsertionPlan, QueryRef
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.queues import Stage
from services.common.smoke import smoke_task
from services.common.stage_runs import outputs_of, query_context
from services.common.tasks import answer_task
from services.common.vectors import QueryVectors
from services.inserter.core import insert

smoke = smoke_task(Stage.INSERTER)


@answer_task(Stage.INSERTER)
def insert_for_query(ref: QueryRef, task: Task) -> InsertionPlan:
    context = query_context(ref.query_id)
    outputs = outputs_of(ref.query_id, require=[Stage.RETRIEVER, Stage.GENERATOR])
    with session_scope() as session:  # the stored vectors of the answer's units and the candidates
        vectors = QueryVectors(get_embedder(), session)
        return insert(outputs.answer.units, outputs.retrieval.candidates, context.config.inserter, vectors)
