"""Celery entry points of the inserter stage: thin wrappers (validate, call core, persist, enqueue next).

LM backends run on a GPU when the worker has one (the model loader picks the device)."""

from __future__ import annotations

from typing import Any

from celery import Task

from services.common.contracts import QueryRef, Retrieval, TextAnswer
from services.common.embedding import get_embedder
from services.common.queues import Stage
from services.common.settings import get_settings
from services.common.smoke import smoke_task
from services.common.stage_runs import query_and_config, stage_output
from services.common.tasks import send_to, stage_task
from services.inserter.core import insert

smoke = smoke_task(Stage.INSERTER)


@stage_task(Stage.INSERTER, "insert", QueryRef, then=send_to("merger.merge"))
def insert_for_query(ref: QueryRef, task: Task) -> dict[str, Any]:
    _, config = query_and_config(ref.query_id)
    retrieval = Retrieval.model_validate(stage_output(ref.query_id, Stage.RETRIEVER.value))
    answer = TextAnswer.model_validate(stage_output(ref.query_id, Stage.GENERATOR.value))
    backend = config.get("inserter") or get_settings().inserter_backend
    return insert(answer.units, retrieval.candidates, backend, get_embedder()).model_dump(mode="json")
