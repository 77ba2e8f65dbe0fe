"""The task-name -> queue map is a contract with messages already queued: a rename would orphan them."""

import pytest

from services.common.celery_app import app
from services.common.queues import PIPELINE, Stage, next_stage, task_routes

pytestmark = pytest.mark.unit

# Snapshot. Changing it means queued messages of the old name are never consumed: migrate them first.
EXPECTED_TASKS = {
    "retriever.smoke": "retriever",
    "retriever.ingest": "retriever",
    "retriever.retrieve": "retriever",
    "generator.smoke": "generator",
    "generator.generate": "generator",
    "inserter.smoke": "inserter",
    "inserter.insert": "inserter",
    "merger.smoke": "merger",
    "merger.merge": "merger",
    "trainer.smoke": "trainer",
    "trainer.train": "trainer",
}


def registered_tasks() -> dict[str, str]:
    app.loader.import_default_modules()
    return {name: task.queue for name, task in app.tasks.items() if not name.startswith("celery.")}


def test_task_names_and_queues_match_the_snapshot():
    assert registered_tasks() == EXPECTED_TASKS


def test_router_sends_every_task_to_its_stage_queue():
    for name, queue in EXPECTED_TASKS.items():
        route = app.amqp.router.route({}, name)
        assert route["queue"].name == queue, name


def test_queues_are_declared_from_the_enum_only():
    declared = {queue.name for queue in app.conf.task_queues}
    assert declared == {stage.queue for stage in Stage}
    assert app.conf.task_create_missing_queues is False
    assert set(task_routes()) == {f"{stage.value}.*" for stage in Stage}


def test_reliability_policy_is_set():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json"


def test_pipeline_order():
    assert [stage.value for stage in PIPELINE] == ["retriever", "generator", "inserter", "merger"]
    assert next_stage(Stage.RETRIEVER) is Stage.GENERATOR
    assert next_stage(Stage.MERGER) is None
    assert next_stage(Stage.TRAINER) is None
