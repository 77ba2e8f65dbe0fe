"""The one source of truth for queues: Celery routes, worker `-Q` flags and compose.yaml derive from it."""

from __future__ import annotations

from enum import StrEnum


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


# The answer pipeline, in order; the trainer stands apart (it is fed by `m2io train`).
PIPELINE: tuple[Stage, ...] = (Stage.RETRIEVER, Stage.GENERATOR, Stage.INSERTER, Stage.MERGER)


def next_stage(stage: Stage) -> Stage | None:
    if stage not in PIPELINE:
        return None
    position = PIPELINE.index(stage)
    return PIPELINE[position + 1] if position + 1 < len(PIPELINE) else None


def task_routes() -> dict[str, dict[str, str]]:
    """Task names are `<stage>.<operation>`; every task of a stage goes to that stage's queue."""
    return {f"{stage.value}.*": {"queue": stage.queue} for stage in Stage}


# The task that runs each answer stage on one query (`{"query_id": ...}`); a job enters at the
# retriever, and a retry re-enters at the stage that failed.
ANSWER_TASKS: dict[Stage, str] = {
    Stage.RETRIEVER: "retriever.retrieve",
    Stage.GENERATOR: "generator.generate",
    Stage.INSERTER: "inserter.insert",
    Stage.MERGER: "merger.merge",
}
