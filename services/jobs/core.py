"""Jobs on the job -> query -> stage-run rows: submit, status, retry, cancel.

A job's status is computed from those rows every time it is asked for (DESIGN.md: nothing is
inferred from logs). A query is `queued` until a stage starts it, `running` while stages run,
then `succeeded` (the merger stored its answer), `failed` (a stage failed permanently, or its
line in the questions file was not a question) or `cancelled`.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select, update

from services.common.db import session_scope
from services.common.models import Collection, Job, Query, StageRun
from services.common.queues import ANSWER_TASKS, PIPELINE, Stage
from services.common.stage_runs import now
from services.jobs.questions import QuestionLine

GENERATOR_BACKENDS = ("extractive", "local", "openai")
INSERTER_BACKENDS = ("rule", "llm", "checkpoint")
TERMINAL = ("succeeded", "failed", "cancelled")
INPUT_STAGE = "input"  # the failure of a line that never became a question (no stage ran)


class JobError(ValueError):
    """A submission that cannot run at all (unknown collection or backend); nothing was stored."""


class UnknownJob(LookupError):
    pass


class EnqueueError(JobError):
    """The job is stored but its messages could not be sent (the broker is down): `retry` sends them."""

    def __init__(self, job_id: uuid.UUID, count: int, error: BaseException):
        self.job_id = job_id
        super().__init__(
            f"job {job_id} is stored, but {count} queries could not be enqueued ({type(error).__name__}: {error}); "
            f"they are marked failed: `m2io retry {job_id}` sends them once the broker is back"
        )


ENQUEUE_STAGE = "enqueue"


def parse_job_id(job_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id).strip())
    except ValueError as error:
        raise UnknownJob(f"{job_id!r} is not a job id") from error


def check_backend(kind: str, backend: str | None, known: tuple[str, ...]) -> None:
    if backend is None:
        return
    prefix, _, spec = backend.partition(":")
    if prefix not in known or (prefix == "checkpoint" and not spec):
        raise JobError(f"unknown {kind} backend {backend!r}; use one of: {', '.join(known)} (checkpoint:<name>)")


def check_collection(session, name: str) -> Collection:
    collection = session.execute(select(Collection).where(Collection.name == name)).scalar_one_or_none()
    if collection is None:
        names = session.scalars(select(Collection.name).order_by(Collection.name)).all()
        known = ", ".join(names) if names else "none yet: run `m2io ingest` first"
        raise JobError(f"no collection named {name!r} (collections: {known})")
    return collection


def submit_job(
    questions: list[QuestionLine],
    collection: str,
    *,
    generator: str | None = None,
    inserter: str | None = None,
    top_k: int | None = None,
    candidates: int | None = None,
    name: str | None = None,
    enqueue: bool = True,
) -> uuid.UUID:
    """Store the job and its queries, then enqueue each valid question at the retriever.

    Lines that are not questions are stored as failed queries with their reason, so that the job
    shows them; the rest of the batch runs. Unset options fall back to the workers' settings.
    """
    check_backend("generator", generator, GENERATOR_BACKENDS)
    check_backend("inserter", inserter, INSERTER_BACKENDS)
    if top_k is not None and not 1 <= top_k <= 100:
        raise JobError(f"top_k={top_k}: use 1..100")
    if candidates is not None and not 1 <= candidates <= 100:
        raise JobError(f"candidates={candidates}: use 1..100")
    if not questions:
        raise JobError("no questions to submit")
    config: dict[str, Any] = {"collection": collection}
    for key, value in (("generator", generator), ("inserter", inserter), ("top_k", top_k), ("candidates", candidates)):
        if value is not None:
            config[key] = value
    with session_scope() as session:
        stored = check_collection(session, collection)
        job = Job(kind="answer", name=name, collection_id=stored.id, config=config)
        session.add(job)
        session.flush()
        rows = [
            Query(
                job_id=job.id,
                external_id=entry.external_id,
                question=entry.question,
                line=entry.line,
                collection=entry.collection,
                gold=entry.gold,
                status="failed" if entry.error else "queued",
                error=f"{INPUT_STAGE}: {entry.error}" if entry.error else None,
            )
            for entry in questions
        ]
        session.add_all(rows)
        session.flush()
        job_id = job.id
        runnable = [row.id for row in rows if row.status == "queued"]
    if enqueue:
        send_or_mark_failed(job_id, [(query_id, Stage.RETRIEVER) for query_id in runnable])
    return job_id


def send_or_mark_failed(
    job_id: uuid.UUID,
    entries: list[tuple[uuid.UUID, Stage]],
    enqueue: Callable[[list[tuple[uuid.UUID, Stage]]], None] | None = None,
) -> None:
    """Enqueue; if the broker cannot be reached, no query may be left `queued` with no message
    (it would wait forever): they are marked failed, retryable, and EnqueueError says so."""
    try:
        (enqueue or enqueue_queries)(entries)
    except Exception as error:
        from kombu.exceptions import OperationalError as BrokerError

        if not isinstance(error, BrokerError | ConnectionError | OSError):
            raise
        message = f"{ENQUEUE_STAGE}: could not reach the broker ({type(error).__name__}: {error})"
        with session_scope() as session:
            session.execute(
                update(Query)
                .where(Query.id.in_([query_id for query_id, _ in entries]), Query.status == "queued")
                .values(status="failed", error=message[:4000], updated_at=now())
            )
        raise EnqueueError(job_id, len(entries), error) from error


def enqueue_queries(entries: list[tuple[uuid.UUID, Stage]]) -> None:
    """One message per query, to the task of the stage it (re)starts at, over one broker connection."""
    from services.common.celery_app import app

    if not entries:
        return
    with app.producer_or_acquire() as producer:
        for query_id, stage in entries:
            app.send_task(ANSWER_TASKS[stage], args=[{"query_id": str(query_id)}], producer=producer)


class StageSummary(BaseModel):
    stage: str
    succeeded: int = 0
    running: int = 0
    retrying: int = 0
    failed: int = 0
    pending: int = 0  # not started (or waiting for an earlier stage)
    attempts: int = 0  # all attempts, lost and superseded ones included
    lost: int = 0  # attempts whose worker died (redelivered)
    p50_s: float | None = None  # duration of succeeded attempts
    p99_s: float | None = None
    mean_s: float | None = None
    wait_p50_s: float | None = None  # time in the queue: previous stage's end (or submission) to start
    wait_p99_s: float | None = None


class QueryFailure(BaseModel):
    query_id: uuid.UUID
    id: str
    stage: str
    error: str
    line: int | None = None


class JobStatus(BaseModel):
    id: uuid.UUID
    name: str | None
    state: str  # queued | running | succeeded | partial | failed | cancelled
    config: dict[str, Any]
    collection: str | None
    created_at: datetime
    cancelled_at: datetime | None
    finished_at: datetime | None  # when the last query ended (computed)
    total: int
    counts: dict[str, int]  # queries per status
    stages: list[StageSummary] = []
    failures: list[QueryFailure] = []
    elapsed_s: float | None = None
    questions_per_s: float | None = None
    end_to_end_p50_s: float | None = None
    end_to_end_p99_s: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "partial", "failed", "cancelled")

    @property
    def progress(self) -> float:
        return sum(self.counts.get(s, 0) for s in TERMINAL) / self.total if self.total else 1.0


def job_state(counts: dict[str, int], total: int, cancelled: bool) -> str:
    active = counts.get("queued", 0) + counts.get("running", 0)
    if cancelled and not counts.get("running", 0):
        return "cancelled"
    if active:
        return "running" if counts.get("running", 0) or sum(counts.get(s, 0) for s in TERMINAL) else "queued"
    if counts.get("succeeded", 0) == total:
        return "succeeded"
    if counts.get("succeeded", 0) == 0 and counts.get("cancelled", 0) == 0:
        return "failed"
    return "cancelled" if cancelled else "partial"


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p50 of [1, 2, 3, 4] is 2; p99 of 100 values is the 99th)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(round(fraction * len(ordered), 9))))
    return round(ordered[rank - 1], 4)


def job_status(job_id: str | uuid.UUID, *, detail: bool = True) -> JobStatus:
    """The job's state from its rows. `detail=False` skips the per-stage tables (for listings)."""
    job_id = parse_job_id(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        collection = session.get(Collection, job.collection_id).name if job.collection_id else None
        counts = dict(
            session.execute(
                select(Query.status, func.count()).where(Query.job_id == job_id).group_by(Query.status)
            ).all()
        )
        total = sum(counts.values())
        last_end = session.execute(
            select(func.max(Query.updated_at)).where(Query.job_id == job_id, Query.status.in_(TERMINAL))
        ).scalar()
        status = JobStatus(
            id=job.id,
            name=job.name,
            state=job_state(counts, total, job.cancelled_at is not None),
            config=dict(job.config or {}),
            collection=collection,
            created_at=job.created_at,
            cancelled_at=job.cancelled_at,
            finished_at=None,
            total=total,
            counts=counts,
        )
        if status.done and last_end is not None:
            status.finished_at = max(last_end, job.cancelled_at or last_end)
        end = status.finished_at or now()
        status.elapsed_s = round((end - job.created_at).total_seconds(), 3)
        if status.elapsed_s and counts.get("succeeded"):
            status.questions_per_s = round(counts["succeeded"] / status.elapsed_s, 3)
        if not detail:
            return status
        queries = session.execute(
            select(Query.id, Query.external_id, Query.status, Query.error, Query.line, Query.created_at).where(
                Query.job_id == job_id
            )
        ).all()
        runs = session.execute(
            select(StageRun.query_id, StageRun.stage, StageRun.status, StageRun.started_at, StageRun.finished_at)
            .join(Query, Query.id == StageRun.query_id)
            .where(Query.job_id == job_id)
            .order_by(StageRun.attempt)
        ).all()
    status.stages, latencies = stage_summaries(queries, runs)
    status.end_to_end_p50_s = percentile(latencies, 0.5)
    status.end_to_end_p99_s = percentile(latencies, 0.99)
    status.failures = failures_of(queries, runs)
    return status


def stage_summaries(queries, runs) -> tuple[list[StageSummary], list[float]]:
    """Per-stage counts and timings, and each answered query's end-to-end latency."""
    by_query: dict[uuid.UUID, dict[str, list]] = {}
    for run in runs:
        by_query.setdefault(run.query_id, {}).setdefault(run.stage, []).append(run)
    summaries = {stage.value: StageSummary(stage=stage.value) for stage in PIPELINE}
    durations: dict[str, list[float]] = {stage.value: [] for stage in PIPELINE}
    waits: dict[str, list[float]] = {stage.value: [] for stage in PIPELINE}
    latencies: list[float] = []
    for query in queries:
        stages = by_query.get(query.id, {})
        previous_end = query.created_at
        for stage in PIPELINE:
            summary = summaries[stage.value]
            attempts = stages.get(stage.value, [])
            summary.attempts += len(attempts)
            summary.lost += sum(run.status == "lost" for run in attempts)
            won = next((run for run in attempts if run.status == "succeeded"), None)
            if won is not None:
                summary.succeeded += 1
                durations[stage.value].append((won.finished_at - won.started_at).total_seconds())
                first_start = min(run.started_at for run in attempts)
                if previous_end is not None:
                    waits[stage.value].append(max(0.0, (first_start - previous_end).total_seconds()))
                previous_end = won.finished_at
                if stage == PIPELINE[-1]:
                    latencies.append((won.finished_at - query.created_at).total_seconds())
                continue
            last = attempts[-1].status if attempts else None
            if last == "running":
                summary.running += 1
            elif last == "retrying" and query.status not in TERMINAL:
                summary.retrying += 1
            elif last == "failed":
                summary.failed += 1
            elif query.status not in ("failed", "cancelled") or last is not None:
                summary.pending += 1
            previous_end = None
    for stage in PIPELINE:
        summary, values = summaries[stage.value], durations[stage.value]
        summary.p50_s = percentile(values, 0.5)
        summary.p99_s = percentile(values, 0.99)
        summary.mean_s = round(statistics.fmean(values), 4) if values else None
        summary.wait_p50_s = percentile(waits[stage.value], 0.5)
        summary.wait_p99_s = percentile(waits[stage.value], 0.99)
    return list(summaries.values()), latencies


def failures_of(queries, runs) -> list[QueryFailure]:
    failed_stage: dict[uuid.UUID, str] = {}
    for run in runs:
        if run.status == "failed":
            failed_stage[run.query_id] = run.stage
    failures = []
    for query in queries:
        if query.status != "failed":
            continue
        error = query.error or "failed without a message"
        stage = failed_stage.get(query.id) or (ENQUEUE_STAGE if error.startswith(f"{ENQUEUE_STAGE}: ") else INPUT_STAGE)
        if error.startswith(f"{stage}: "):
            error = error[len(stage) + 2 :]
        failures.append(
            QueryFailure(query_id=query.id, id=query.external_id, stage=stage, error=error, line=query.line)
        )
    return sorted(failures, key=lambda f: (f.line or 0, f.id))


def list_jobs(limit: int = 50, state: str | None = None, search: str | None = None) -> list[JobStatus]:
    """The newest jobs first (answer jobs only), each with counts but no stage tables."""
    with session_scope() as session:
        ids = session.scalars(
            select(Job.id).where(Job.kind == "answer").order_by(Job.created_at.desc()).limit(max(limit, 1) * 4)
        ).all()
    statuses = [job_status(job_id, detail=False) for job_id in ids]
    if state:
        statuses = [s for s in statuses if s.state == state]
    if search:
        needle = search.lower()
        statuses = [
            s
            for s in statuses
            if needle in str(s.id) or needle in (s.name or "").lower() or needle in (s.collection or "").lower()
        ]
    return statuses[:limit]


class RetryReport(BaseModel):
    job_id: uuid.UUID
    requeued: dict[str, int]  # stage -> queries re-entering there
    not_retryable: list[QueryFailure]  # input errors: fix the questions file and submit again


def resume_stage(succeeded: set[str]) -> Stage:
    return next(stage for stage in PIPELINE if stage.value not in succeeded)


def retry_job(job_id: str | uuid.UUID) -> RetryReport:
    """Re-run the failed (and cancelled) queries of a job, each from the first stage that has not
    succeeded for it: the stage that failed. Earlier stages' outputs are kept. A cancelled job is
    resumed. Queries whose line was not a question cannot be retried."""
    job_id = parse_job_id(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        queries = session.scalars(
            select(Query).where(Query.job_id == job_id, Query.status.in_(("failed", "cancelled")))
        ).all()
        succeeded: dict[uuid.UUID, set[str]] = {}
        for query_id, stage in session.execute(
            select(StageRun.query_id, StageRun.stage)
            .join(Query, Query.id == StageRun.query_id)
            .where(Query.job_id == job_id, StageRun.status == "succeeded")
        ):
            succeeded.setdefault(query_id, set()).add(stage)
        entries: list[tuple[uuid.UUID, Stage]] = []
        not_retryable: list[QueryFailure] = []
        for query in queries:
            if query.status == "failed" and (query.error or "").startswith(f"{INPUT_STAGE}: "):
                not_retryable.append(
                    QueryFailure(
                        query_id=query.id,
                        id=query.external_id,
                        stage=INPUT_STAGE,
                        error=query.error[len(INPUT_STAGE) + 2 :],
                        line=query.line,
                    )
                )
                continue
            done = succeeded.get(query.id, set())
            if len(done) == len(PIPELINE):  # answered before the cancel landed
                query.status = "succeeded"
                continue
            query.status, query.error = "queued", None
            entries.append((query.id, resume_stage(done)))
        job.cancelled_at = None
        job.finished_at = None
    send_or_mark_failed(job_id, entries)
    requeued: dict[str, int] = {}
    for _, stage in entries:
        requeued[stage.value] = requeued.get(stage.value, 0) + 1
    return RetryReport(job_id=job_id, requeued=requeued, not_retryable=not_retryable)


def cancel_job(job_id: str | uuid.UUID) -> int:
    """Cancel what has not finished: queued and running queries become `cancelled` and their next
    stage does not run (a stage already running finishes its own step). Returns how many."""
    job_id = parse_job_id(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        if job.cancelled_at is None:
            job.cancelled_at = now()
        result = session.execute(
            update(Query)
            .where(Query.job_id == job_id, Query.status.in_(("queued", "running")))
            .values(status="cancelled", error="cancelled by the user", updated_at=now())
        )
        return result.rowcount or 0
