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
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text, update
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


class AttemptLost(ConnectionError):
    """The attempt's own record vanished (a Postgres crash lost its unflushed start): run it again."""


class QueryCancelled(RuntimeError):
    """The query's job was cancelled: its remaining stages do not run."""


@dataclass(frozen=True)
class Attempt:
    """A running attempt, with what its stage reads of the query, read under the query's lock when it
    began: the question and config, and the outputs of the stages that already succeeded."""

    id: int
    query_id: uuid.UUID
    question: str
    collection: str | None  # the question's own
    config: dict[str, Any]  # the job's, as stored (a smoke probe's is no JobConfig)
    # (stage, output) of the stages done, the output as its stored JSON text (parsed by pydantic's own JSON
    # parser when a stage reads it: a Retrieval is some 30 KB, and each later stage reads it)
    succeeded: tuple[tuple[str, str], ...]

    def context(self) -> QueryContext:
        return context_of(self.question, self.collection, self.config)

    def outputs(self) -> StageOutputs:
        return StageOutputs.from_rows(self.succeeded)


# The attempt the current task is running (set by the stage task around its work): `query_context`
# and `outputs_of` answer from it instead of reading again what `begin_attempt` just read.
current_attempt: ContextVar[Attempt | None] = ContextVar("current_attempt", default=None)


def begin_attempt(query_id: uuid.UUID, stage: str, worker: str) -> Attempt | None:
    """Record a new running attempt; None when this stage already succeeded for the query.
    QueryCancelled when its job was cancelled (the message is dropped, nothing runs).
    One transaction, three statements in the common case: the query locked with its job's config,
    its stage runs (with the succeeded ones' outputs), the new attempt.

    Its commit does not wait for the disk (synchronous_commit off, this transaction only): the
    attempt's success, committed durably later, flushes it too (the WAL is written in order). If
    Postgres crashed in between, the success finds no attempt to mark and the task is retried
    (`AttemptLost`), so nothing is handed on from an attempt that was never recorded."""
    with session_scope() as session:
        query = session.execute(BEGIN_READ, {"id": query_id}).one_or_none()
        if query is None:
            raise QueryNotFound(f"query {query_id} does not exist")
        if query.status == "cancelled":
            raise QueryCancelled(f"query {query_id} was cancelled")
        runs = [(run_stage, status, attempt, output) for run_stage, status, attempt, output in query.runs]
        mine = [run for run in runs if run[0] == stage]
        if any(status == "succeeded" for _, status, _, _ in mine):
            return None
        if any(status == "running" for _, status, _, _ in mine):
            session.execute(
                update(StageRun)
                .where(StageRun.query_id == query_id, StageRun.stage == stage, StageRun.status == "running")
                .values(status="lost", finished_at=now(), error="worker died or message was redelivered")
            )
        attempt = max((number for _, _, number, _ in mine), default=0) + 1
        run_id = session.execute(
            BEGIN_WRITE, {"id": query_id, "stage": stage, "attempt": attempt, "worker": worker}
        ).scalar_one()
    known = {entry.stage.value for entry in STAGES}
    succeeded = tuple((name, output) for name, status, _, output in runs if status == "succeeded" and name in known)
    return Attempt(run_id, query_id, query.question, query.collection, query.config or {}, succeeded)


# The hot path of every hop, written out (no ORM statement built per task). BEGIN_READ: this transaction's
# commit does not wait for the disk (see begin_attempt), the query locked (attempts of one query are
# serialised) with its job's config and its stage runs, the succeeded ones with their outputs.
BEGIN_READ = text(
    "SELECT set_config('synchronous_commit', 'off', true) AS commit_mode, q.status, q.question, q.collection, "
    "j.config, (SELECT coalesce(jsonb_agg(jsonb_build_array(r.stage, r.status, r.attempt, "
    "CASE WHEN r.status = 'succeeded' THEN r.output::text END) ORDER BY r.id), '[]'::jsonb) "
    "FROM stage_runs r WHERE r.query_id = q.id) AS runs "
    "FROM queries q JOIN jobs j ON j.id = q.job_id WHERE q.id = :id FOR UPDATE OF q"
)
# The output arrives as JSON text (pydantic's `model_dump_json`): Postgres parses it, not Python's json module.
SUCCEED = text(
    "UPDATE stage_runs SET status = 'succeeded', finished_at = :finished, output = CAST(:output AS jsonb), "
    "error = NULL WHERE id = :id"
)
# The new attempt, and the query running if it was only queued.
BEGIN_WRITE = text(
    "WITH started AS (UPDATE queries SET status = 'running', updated_at = now() "
    "WHERE id = :id AND status = 'queued') "
    "INSERT INTO stage_runs (query_id, stage, attempt, status, worker) "
    "VALUES (:id, :stage, :attempt, 'running', :worker) RETURNING id"
)


def succeed_attempt(run_id: int, output: str | dict[str, Any]) -> bool:
    """Mark the attempt succeeded with its output (JSON text, or a dict to be written as JSON); False when
    another attempt of the same stage won the race."""
    stored = output if isinstance(output, str) else json.dumps(output)
    try:
        with session_scope() as session:
            marked = session.execute(SUCCEED, {"id": run_id, "finished": now(), "output": stored}).rowcount
            if marked != 1:
                raise AttemptLost(f"stage run {run_id} is not recorded (Postgres restarted since it began)")
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
    def from_rows(cls, rows: Iterable[tuple[str, str | dict[str, Any]]]) -> StageOutputs:
        """From (stage, output) pairs of succeeded stage runs, the output as JSON text or as decoded JSON."""
        found = {}
        for stage, output in rows:
            entry = answer_stage(stage)
            if isinstance(output, str):
                found[entry.field] = entry.output.model_validate_json(output)
            else:
                found[entry.field] = entry.output.model_validate(output)
        return cls(**found)

    def has(self, stage: Stage) -> bool:
        return getattr(self, answer_stage(stage).field) is not None


def outputs_of(query_id: uuid.UUID, *, require: Iterable[Stage] = ()) -> StageOutputs:
    """The outputs of a query's succeeded stages; StageOutputMissing if one in `require` has none.
    Inside a stage's attempt on that query, those its attempt read when it began."""
    attempt = current_attempt.get()
    if attempt is not None and attempt.query_id == query_id:
        outputs = attempt.outputs()
    else:
        outputs = read_outputs(query_id)
    for stage in require:
        if not outputs.has(stage):
            raise StageOutputMissing(f"query {query_id} has no succeeded {stage.value} stage")
    return outputs


def read_outputs(query_id: uuid.UUID) -> StageOutputs:
    with session_scope() as session:
        rows = session.execute(
            select(StageRun.stage, StageRun.output).where(
                StageRun.query_id == query_id,
                StageRun.status == "succeeded",
                StageRun.stage.in_([entry.stage.value for entry in STAGES]),
            )
        ).all()
    return StageOutputs.from_rows(rows)


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
    collection: str | None  # the question's own collection, else the job's one; None: the router chooses
    config: JobConfig  # backends filled in from the settings for jobs stored without them


def query_context(query_id: uuid.UUID) -> QueryContext:
    """The question and config of a query (inside a stage's attempt on it: as its attempt read them)."""
    attempt = current_attempt.get()
    if attempt is not None and attempt.query_id == query_id:
        return attempt.context()
    with session_scope() as session:
        query = session.get(Query, query_id)
        if query is None:
            raise QueryNotFound(f"query {query_id} does not exist")
        return context_of(query.question, query.collection, query.job.config or {})


def context_of(question: str, collection: str | None, raw_config: dict[str, Any]) -> QueryContext:
    config = with_default_backends(JobConfig.model_validate(raw_config))
    searched = config.searched
    return QueryContext(
        question=question, collection=collection or (searched[0] if len(searched) == 1 else None), config=config
    )


def with_default_backends(config: JobConfig) -> JobConfig:
    """The config with unset backends taken from the settings (M2IO_GENERATOR_BACKEND, M2IO_INSERTER_BACKEND):
    at submit, so the job stores what it runs, and for jobs stored before submit did that."""
    settings = get_settings()
    return config.with_defaults(settings.generator_backend, settings.inserter_backend)
