"""Stage-run bookkeeping: every attempt of a stage on a query is a row with start, end, worker, error.

The rules (DESIGN.md, reliability):
- a redelivered message finds the stage already succeeded and does nothing new;
- an attempt left `running` by a worker that died is marked `lost` when the message comes back;
- at most one attempt per (query, stage) succeeds: a unique partial index enforces it, and an
  attempt that loses that race is marked `superseded`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from services.common.contracts import InsertionPlan, JobConfig, MergeOutput, Retrieval, TextAnswer
from services.common.db import session_scope
from services.common.models import DeadLetter, Query, StageRun
from services.common.queues import STAGES, Stage, answer_stage
from services.common.settings import get_settings
from services.common.text import printable

MAX_RECORDED_PAYLOAD = 10_000  # characters of a refused message kept for the operator
MAX_ERROR_LENGTH = 4_000


def now() -> datetime:
    return datetime.now(UTC)


class QueryNotFound(LookupError):
    pass


class QueryCancelled(RuntimeError):
    """The query's job was cancelled: its remaining stages do not run."""


def begin_attempt(query_id: uuid.UUID, stage: str, worker: str) -> StageRun | None:
    """Record a new running attempt; None when this stage already succeeded for the query.
    QueryCancelled when its job was cancelled (the message is dropped, nothing runs)."""
    with session_scope() as session:
        # Serialise attempts of one query: a row lock on the query.
        query = session.execute(select(Query).where(Query.id == query_id).with_for_update()).scalar_one_or_none()
        if query is None:
            raise QueryNotFound(f"query {query_id} does not exist")
        if query.status == "cancelled":
            raise QueryCancelled(f"query {query_id} was cancelled")
        done = session.execute(
            select(StageRun.id).where(
                StageRun.query_id == query_id, StageRun.stage == stage, StageRun.status == "succeeded"
            )
        ).first()
        if done:
            return None
        session.execute(
            update(StageRun)
            .where(StageRun.query_id == query_id, StageRun.stage == stage, StageRun.status == "running")
            .values(status="lost", finished_at=now(), error="worker died or message was redelivered")
        )
        last = session.execute(
            select(func.max(StageRun.attempt)).where(StageRun.query_id == query_id, StageRun.stage == stage)
        ).scalar()
        run = StageRun(query_id=query_id, stage=stage, attempt=(last or 0) + 1, status="running", worker=worker)
        session.add(run)
        if query.status in ("queued", "running"):
            query.status = "running"
        session.flush()
        return run


def succeed_attempt(run_id: int, output: dict[str, Any]) -> bool:
    """Mark the attempt succeeded; False when another attempt of the same stage won the race."""
    try:
        with session_scope() as session:
            session.execute(
                update(StageRun)
                .where(StageRun.id == run_id)
                .values(status="succeeded", finished_at=now(), output=output, error=None)
            )
    except IntegrityError:
        with session_scope() as session:
            session.execute(
                update(StageRun)
                .where(StageRun.id == run_id)
                .values(
                    status="superseded",
                    finished_at=now(),
                    error="another attempt of this stage succeeded first",
                )
            )
        return False
    return True


def fail_attempt(run_id: int, error: str, *, retrying: bool) -> None:
    """A failed attempt. Unless it will be retried, the query fails with the same readable message."""
    with session_scope() as session:
        run = session.get(StageRun, run_id)
        if run is None:
            return
        run.status = "retrying" if retrying else "failed"
        run.finished_at = now()
        run.error = error[:MAX_ERROR_LENGTH]
        won = session.execute(
            select(StageRun.id).where(
                StageRun.query_id == run.query_id, StageRun.stage == run.stage, StageRun.status == "succeeded"
            )
        ).first()
        if not retrying and won is None:  # another attempt of this stage already succeeded: the query did not fail
            query = session.get(Query, run.query_id)
            if query is not None:
                query.status = "failed"
                query.error = error[:MAX_ERROR_LENGTH]
                query.error_stage = run.stage


def record_dead_letter(
    task_name: str, payload: Any, error: str, *, queue: str | None, task_id: str | None, worker: str | None
) -> int:
    """Record a refused message. `payload` is the message as received: a raw text is kept as it is, anything
    else as JSON. Every field is cut to its column and NUL escaped (Postgres text cannot hold it): a hostile
    message is recorded, never a second failure."""
    if isinstance(payload, str):
        text = payload
    else:
        try:
            text = json.dumps(payload, default=repr)
        except (TypeError, ValueError):
            text = repr(payload)
    with session_scope() as session:
        letter = DeadLetter(
            task_name=storable(task_name, 200),
            queue=storable(queue, 50),
            task_id=storable(task_id, 200),
            payload=storable(text, MAX_RECORDED_PAYLOAD),
            error=storable(error, MAX_ERROR_LENGTH),
            worker=storable(worker, 300),
        )
        session.add(letter)
        session.flush()
        return letter.id


def storable(value: str | None, limit: int) -> str | None:
    """`value` cut to `limit` characters, made storable by `text.printable` (NUL as `\\x00`, the bytes of
    a lone surrogate escaped)."""
    return None if value is None else printable(str(value)[:limit])[:limit]


class StageOutputMissing(LookupError):
    pass


@dataclass(frozen=True)
class StageOutputs:
    """The stored outputs of a query's succeeded stages, each as its contract (`queues.STAGES`)."""

    retrieval: Retrieval | None = None
    answer: TextAnswer | None = None
    plan: InsertionPlan | None = None
    merged: MergeOutput | None = None

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, dict[str, Any]]]) -> StageOutputs:
        """From (stage, output) pairs of succeeded stage runs."""
        found = {}
        for stage, output in rows:
            entry = answer_stage(stage)
            found[entry.field] = entry.output.model_validate(output)
        return cls(**found)

    def has(self, stage: Stage) -> bool:
        return getattr(self, answer_stage(stage).field) is not None


def outputs_of(query_id: uuid.UUID, *, require: Iterable[Stage] = ()) -> StageOutputs:
    """The outputs of a query's succeeded stages; StageOutputMissing if one in `require` has none."""
    with session_scope() as session:
        rows = session.execute(
            select(StageRun.stage, StageRun.output).where(
                StageRun.query_id == query_id,
                StageRun.status == "succeeded",
                StageRun.stage.in_([entry.stage.value for entry in STAGES]),
            )
        ).all()
    outputs = StageOutputs.from_rows(rows)
    for stage in require:
        if not outputs.has(stage):
            raise StageOutputMissing(f"query {query_id} has no succeeded {stage.value} stage")
    return outputs


def outputs_of_job(job_id: uuid.UUID, stages: Iterable[Stage] | None = None) -> dict[uuid.UUID, StageOutputs]:
    """The outputs of every query of a job (only `stages`, if given), keyed by query id. For a few
    queries at a time (a large job, streamed), `outputs_of_queries`."""
    return outputs_where(Query.job_id == job_id, stages)


def outputs_of_queries(
    query_ids: Iterable[uuid.UUID], stages: Iterable[Stage] | None = None
) -> dict[uuid.UUID, StageOutputs]:
    """The outputs of the given queries (only `stages`, if given), keyed by query id."""
    return outputs_where(StageRun.query_id.in_(list(query_ids)), stages)


def outputs_where(condition, stages: Iterable[Stage] | None) -> dict[uuid.UUID, StageOutputs]:
    wanted = [stage.value for stage in stages] if stages is not None else [entry.stage.value for entry in STAGES]
    rows: dict[uuid.UUID, list[tuple[str, dict[str, Any]]]] = {}
    with session_scope() as session:
        for query_id, stage, output in session.execute(
            select(StageRun.query_id, StageRun.stage, StageRun.output)
            .join(Query, Query.id == StageRun.query_id)
            .where(condition, StageRun.status == "succeeded", StageRun.stage.in_(wanted))
        ):
            rows.setdefault(query_id, []).append((stage, output))
    return {query_id: StageOutputs.from_rows(pairs) for query_id, pairs in rows.items()}


@dataclass(frozen=True)
class QueryContext:
    """What a stage needs to know of its query besides the earlier stages' outputs."""

    question: str
    collection: str  # the question's own collection, else the job's
    config: JobConfig  # backends filled in from the settings for jobs stored without them


def query_context(query_id: uuid.UUID) -> QueryContext:
    with session_scope() as session:
        query = session.get(Query, query_id)
        if query is None:
            raise QueryNotFound(f"query {query_id} does not exist")
        config = JobConfig.model_validate(query.job.config or {})
        question, collection = query.question, query.collection or config.collection
    return QueryContext(question=question, collection=collection, config=with_default_backends(config))


def with_default_backends(config: JobConfig) -> JobConfig:
    """The config with unset backends taken from the settings (M2IO_GENERATOR_BACKEND, M2IO_INSERTER_BACKEND):
    at submit, so the job stores what it runs, and for jobs stored before submit did that."""
    settings = get_settings()
    return config.with_defaults(settings.generator_backend, settings.inserter_backend)
