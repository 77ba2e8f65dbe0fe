"""The read model of jobs: a job's status computed from its job -> query -> stage-run rows every time it
is asked for (DESIGN.md: nothing is inferred from logs). A query is `queued` until a stage starts it,
`running` while stages run, then `succeeded` (the merger stored its answer), `failed` (a stage failed
permanently, its message could not be sent, or its line in the questions file was not a question) or
`cancelled`. The writes (submit, retry, cancel) are `services.jobs.commands`.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import func, select

from services.common.contracts import JobConfig
from services.common.db import session_scope
from services.common.health import worker_heartbeats
from services.common.models import Collection, Job, Query, StageRun
from services.common.queues import PIPELINE
from services.common.settings import get_settings
from services.common.stage_runs import now

TERMINAL = ("succeeded", "failed", "cancelled")
INPUT_STAGE = "input"  # the failure of a line that never became a question (no stage ran)
ENQUEUE_STAGE = "enqueue"  # the failure to send a query's message (the broker was down)


class UnknownJob(LookupError):
    pass


def parse_job_id(job_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id).strip())
    except ValueError as error:
        raise UnknownJob(f"{job_id!r} is not a job id") from error


class StageSummary(BaseModel):
    stage: str
    succeeded: int = 0
    running: int = 0
    waiting: int = 0  # running attempts whose worker is gone: waiting for their message's redelivery
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
    config: JobConfig
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
            config=JobConfig.model_validate(job.config or {}),
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
            select(
                Query.id, Query.external_id, Query.status, Query.error, Query.error_stage, Query.line, Query.created_at
            ).where(Query.job_id == job_id)
        ).all()
        runs = session.execute(
            select(
                StageRun.query_id,
                StageRun.stage,
                StageRun.status,
                StageRun.started_at,
                StageRun.finished_at,
                StageRun.worker,
            )
            .join(Query, Query.id == StageRun.query_id)
            .where(Query.job_id == job_id)
            .order_by(StageRun.attempt)
        ).all()
    gone = worker_gone() if any(run.status == "running" for run in runs) else None
    status.stages, latencies = stage_summaries(queries, runs, gone)
    status.end_to_end_p50_s = percentile(latencies, 0.5)
    status.end_to_end_p99_s = percentile(latencies, 0.99)
    status.failures = failures_of(queries, runs)
    return status


def worker_gone() -> Callable[[str | None, datetime], bool]:
    """A test of running attempts: has the worker that started it (name, start time) stopped? True when no
    live incarnation of that worker started before the attempt: the worker died, or was restarted since.
    Reads the workers' heartbeats once; when Redis does not answer, no attempt is said to be gone."""
    alive = worker_heartbeats(get_settings().redis_url)

    def gone(worker: str | None, started_at: datetime) -> bool:
        if alive is None or worker is None:
            return False
        return not any(since <= started_at.timestamp() for since in alive.get(worker, ()))

    return gone


def stage_summaries(
    queries, runs, gone: Callable[[str | None, datetime], bool] | None = None
) -> tuple[list[StageSummary], list[float]]:
    """Per-stage counts and timings, and each answered query's end-to-end latency. `gone` (`worker_gone`)
    tells a running attempt whose worker stopped (`waiting`) from one that runs."""
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
            if last == "running" and gone is not None and gone(attempts[-1].worker, attempts[-1].started_at):
                summary.waiting += 1
            elif last == "running":
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
        stage = query.error_stage or failed_stage.get(query.id) or INPUT_STAGE
        failures.append(
            QueryFailure(
                query_id=query.id,
                id=query.external_id,
                stage=stage,
                error=query.error or "failed without a message",
                line=query.line,
            )
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
