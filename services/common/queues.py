"""The one source of truth for queues and stages: Celery routes, worker `-Q` flags, compose.yaml, the
next hop of each answer stage and the loader of a query's stored outputs all derive from it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel

from services.common.contracts import InsertionPlan, MergeOutput, Retrieval, TextAnswer


class Stage(StrEnum):
    """Each stage is a Celery worker consuming the queue of the same name."""

    RETRIEVER = "retriever"
    GENERATOR = "generator"
    INSERTER = "inserter"
    MERGER = "merger"
    TRAINER = "trainer"

    @property
    def queue(self) -> str:
        return self.value


@dataclass(frozen=True)
class AnswerStage:
    """A stage of the answer pipeline: the task that runs it on one query (`{"query_id": ...}`) and
    the contract of the output it stores (`stage_runs.output`), which later stages read."""

    stage: Stage
    task: str  # `<stage>.<operation>`: a stable name (tests/test_queues.py snapshots it)
    output: type[BaseModel]
    field: str  # the attribute of `StageOutputs` that holds it

    @property
    def operation(self) -> str:
        return self.task.split(".", 1)[1]


# The answer pipeline, in order; the trainer stands apart (it is fed by `m2io train`). A job enters at
# the first stage, a retry re-enters at the stage that failed.
STAGES: tuple[AnswerStage, ...] = (
    AnswerStage(Stage.RETRIEVER, "retriever.retrieve", Retrieval, "retrieval"),
    AnswerStage(Stage.GENERATOR, "generator.generate", TextAnswer, "answer"),
    AnswerStage(Stage.INSERTER, "inserter.insert", InsertionPlan, "plan"),
    AnswerStage(Stage.MERGER, "merger.merge", MergeOutput, "merged"),
)
PIPELINE: tuple[Stage, ...] = tuple(entry.stage for entry in STAGES)
ANSWER_TASKS: dict[Stage, str] = {entry.stage: entry.task for entry in STAGES}


def answer_stage(stage: Stage | str) -> AnswerStage:
    return next(entry for entry in STAGES if entry.stage == stage)


def next_stage(stage: Stage) -> Stage | None:
    if stage not in PIPELINE:
        return None
    position = PIPELINE.index(stage)
    return PIPELINE[position + 1] if position + 1 < len(PIPELINE) else None


def task_routes() -> dict[str, dict[str, str]]:
    """Task names are `<stage>.<operation>`; every task of a stage goes to that stage's queue."""
    return {f"{stage.value}.*": {"queue": stage.queue} for stage in Stage}
