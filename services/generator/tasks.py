"""Celery entry points of the generator stage: thin wrappers (validate, call core, persist, enqueue next)."""

from __future__ import annotations

from celery import Task

from services.common.contracts import QueryRef, TextAnswer
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.queues import Stage
from services.common.smoke import smoke_task
from services.common.stage_runs import outputs_of, query_context
from services.common.tasks import answer_task
from services.common.vectors import QueryVectors
from services.generator.core import generate

smoke = smoke_task(Stage.GENERATOR)


@answer_task(Stage.GENERATOR)
def generate_for_query(ref: QueryRef, task: Task) -> TextAnswer:
    context = query_context(ref.query_id)
    outputs = outputs_of(ref.query_id, require=[Stage.RETRIEVER])
    with session_scope() as session:  # the stored vectors of the passages' units, if a backend needs them
        return generate(outputs.retrieval, context.config.generator, QueryVectors(get_embedder(), session))
