"""Celery entry points of the generator stage: thin wrappers (validate, call core, persist, enqueue next)."""

from __future__ import annotations

from typing import Any

from celery import Task

from services.common.contracts import QueryRef, Retrieval
from services.common.embedding import get_embedder
from services.common.queues import Stage
from services.common.settings import get_settings
from services.common.smoke import smoke_task
from services.common.stage_runs import query_and_config, stage_output
from services.common.tasks import send_to, stage_task
from services.generator.core import generate

smoke = smoke_task(Stage.GENERATOR)


@stage_task(Stage.GENERATOR, "generate", QueryRef, then=send_to("inserter.insert"))
def generate_for_query(ref: QueryRef, task: Task) -> dict[str, Any]:
    _, config = query_and_config(ref.query_id)
    retrieval = Retrieval.model_validate(stage_output(ref.query_id, Stage.RETRIEVER.value))
    backend = config.get("generator") or get_settings().generator_backend
    return generate(retrieval, backend, get_embedder()).model_dump(mode="json")
