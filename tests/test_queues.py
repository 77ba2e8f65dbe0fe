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


def test_the_stage_table_names_each_answer_task_and_its_output():
    from services.common.contracts import InsertionPlan, MergeOutput, Retrieval, TextAnswer
    from services.common.queues import ANSWER_TASKS, STAGES
    from services.common.stage_runs import StageOutputs

    assert [(entry.stage, entry.task, entry.output) for entry in STAGES] == [
        (Stage.RETRIEVER, "retriever.retrieve", Retrieval),
        (Stage.GENERATOR, "generator.generate", TextAnswer),
        (Stage.INSERTER, "inserter.insert", InsertionPlan),
        (Stage.MERGER, "merger.merge", MergeOutput),
    ]
    assert set(ANSWER_TASKS.values()) <= set(EXPECTED_TASKS)
    # every answer task is registered under the stage's queue, and its output has a place in StageOutputs
    for entry in STAGES:
        assert EXPECTED_TASKS[entry.task] == entry.stage.queue
        assert StageOutputs.__dataclass_fields__[entry.field].type == f"{entry.output.__name__} | None"


def test_stage_outputs_decode_each_stored_output_as_its_contract():
    from services.common.stage_runs import StageOutputs

    outputs = StageOutputs.from_rows(
        [
            ("retriever", {"collection": "c", "question": "q?", "passages": [], "candidates": []}),
            ("inserter", {"placements": [{"image": "a.jpg", "after": 2}], "backend": "rule"}),
        ]
    )
    assert outputs.retrieval.question == "q?" and outputs.plan.placements[0].after == 2
    assert outputs.answer is None and outputs.merged is None
    assert outputs.has(Stage.RETRIEVER) and not outputs.has(Stage.GENERATOR)
    with pytest.raises(ValueError):  # a stored output that does not fit its contract is an error, not a dict
        StageOutputs.from_rows([("generator", {"units": "not a list", "backend": "x"})])


def test_stage_outputs_read_the_stored_json_text_a_stage_writes():
    """A stage's output travels as pydantic's JSON text (written by `model_dump_json`, read back from the
    attempt's row as text): the round trip gives the same contract, and a bad text is an error too."""
    from services.common.contracts import AnswerUnit, TextAnswer
    from services.common.stage_runs import StageOutputs

    answer = TextAnswer(
        units=[AnswerUnit(text="Fold the egg whites in."), AnswerUnit(text='Bake "25" min.')], backend="x"
    )
    outputs = StageOutputs.from_rows([("generator", answer.model_dump_json())])
    assert outputs.answer == answer
    with pytest.raises(ValueError):
        StageOutputs.from_rows([("generator", '{"units": "not a list", "backend": "x"}')])
    with pytest.raises(ValueError):
        StageOutputs.from_rows([("generator", "{not json")])


def test_job_config_is_validated_once_with_readable_errors():
    from services.common.contracts import JobConfig
    from services.jobs.commands import JobError, job_config

    config = job_config("recipes", inserter="checkpoint:mine", top_k=3)
    assert config == JobConfig(collection="recipes", inserter="checkpoint:mine", top_k=3)
    assert (config.candidates, config.generator) == (12, None)
    assert config.with_defaults("extractive", "rule") == config.model_copy(update={"generator": "extractive"})
    with pytest.raises(JobError, match=r"top_k=0: use 1\.\.100"):
        job_config("recipes", top_k=0)
    with pytest.raises(JobError, match="collection"):
        job_config("")
    with pytest.raises(ValueError):  # unknown fields are refused: a typo in a producer must not pass
        JobConfig.model_validate({"collection": "c", "top_kk": 3})


def test_celerys_per_task_lines_are_quiet_unless_asked_for(tmp_path):
    """The two INFO lines Celery logs per task repeat what the stage runs record; M2IO_TASK_LOG_LINES keeps them."""
    import logging

    from services.common.celery_app import TASK_LINE_LOGGERS, quiet_task_lines
    from services.common.settings import Settings

    loggers = [logging.getLogger(name) for name in TASK_LINE_LOGGERS]
    before = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)
        quiet_task_lines(Settings(state_dir=tmp_path, task_log_lines=True))
        assert [logger.level for logger in loggers] == [logging.NOTSET] * len(loggers)
        quiet_task_lines(Settings(state_dir=tmp_path))
        assert [logger.level for logger in loggers] == [logging.WARNING] * len(loggers)
        assert not loggers[1].isEnabledFor(logging.INFO) and loggers[1].isEnabledFor(logging.ERROR)
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)
