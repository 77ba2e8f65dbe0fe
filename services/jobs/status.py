"""The read model of jobs: a job's status computed from its job -> query -> stage-run rows every time it
is asked for (DESIGN.md: nothing is inferred from logs). A query is `queued` until a stage starts it,
`running` while stages run, then `succeeded` (the merger stored its answer), `failed` (a stage failed
permanently, its message could not be sent, or its line in the questions file was not a question) or
`cancelled`. The writes (submit, retry, cancel) are `services.jobs.commands`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import bindparam, func, select, text

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
    # jobs over several collections: answered questions per chosen collection ("(none)": no collection
    # answers), and how many took a follow-up retrieval
    routing: dict[str, int] | None = None
    follow_ups: int | None = None

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


def job_status(job_id: str | uuid.UUID, *, detail: bool = True, failure_limit: int | None = None) -> JobStatus:
    """The job's state from its rows. `detail=False` skips the per-stage tables (for listings);
    `failure_limit` lists only the first failures (in file order; `counts["failed"]` counts them all)."""
    job_id = parse_job_id(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        config = JobConfig.model_validate(job.config or {})
        collection = session.get(Collection, job.collection_id).name if job.collection_id else None
        collection = collection or ", ".join(config.searched)
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
            config=config,
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
        summaries, running, latency = stage_aggregates(session, job_id)
        if len(config.searched) > 1:
            status.routing, status.follow_ups = routing_counts(session, job_id)
        status.failures = failed_queries(session, job_id, failure_limit)
    if running:
        gone = worker_gone()
        for stage, worker, started_at in running:
            if gone(worker, started_at):
                summaries[stage].waiting += 1
            else:
                summaries[stage].running += 1
    status.stages = list(summaries.values())
    status.end_to_end_p50_s, status.end_to_end_p99_s = latency
    return status


# Jobs over several collections: the router's choices, from the retriever's stored outputs, in SQL.
ROUTING_COUNTS = text(
    "SELECT coalesce(r.output->'routing'->'chosen'->>0, '(none)') AS chosen, count(*) AS questions, "
    "count(*) FILTER (WHERE jsonb_array_length(r.output->'routing'->'steps') > 1) AS follow_ups "
    "FROM stage_runs r JOIN queries q ON q.id = r.query_id "
    "WHERE q.job_id = :job_id AND r.stage = 'retriever' AND r.status = 'succeeded' "
    "AND jsonb_typeof(r.output->'routing') = 'object' GROUP BY 1 ORDER BY 2 DESC, 1"
)


def routing_counts(session, job_id: uuid.UUID) -> tuple[dict[str, int], int]:
    rows = session.execute(ROUTING_COUNTS, {"job_id": job_id}).all()
    return {row.chosen: row.questions for row in rows}, sum(row.follow_ups for row in rows)


def seconds_of(value) -> float | None:
    """A duration from SQL (`extract(epoch ...)`: exact microseconds, as a numeric) as the status shows it."""
    return None if value is None else round(float(value), 4)


# One statement over a job's stage runs, read once (`runs`, narrow: what the three parts need): attempts
# per stage; the winning attempts (at most one per query and stage: uq_stage_runs_one_success) with their
# durations, queue waits (from the previous stage's winner, or the query's submission, to the stage's
# first attempt) and end-to-end latency; the last attempt of each (query, stage) with no winner (few: the
# failed and the in-flight). Percentiles are nearest-rank, as `percentile` computes them: percentile_disc
# takes the value at rank ceil(fraction * n).
STAGE_AGGREGATES = """
WITH runs AS MATERIALIZED (
    SELECT r.query_id, r.stage, r.attempt, r.status, r.worker, r.started_at, r.finished_at,
           q.created_at AS query_created, q.status AS query_status
    FROM stage_runs r JOIN queries q ON q.id = r.query_id
    WHERE q.job_id = :job_id AND r.stage IN :stages
), won AS (
    SELECT * FROM runs WHERE status = 'succeeded'
), timed AS (
    SELECT won.stage, won.query_status NOT IN ('failed', 'cancelled') AS live,
           extract(epoch FROM won.finished_at - won.started_at) AS duration,
           extract(epoch FROM won.finished_at - won.query_created) AS end_to_end,
           extract(epoch FROM
               CASE WHEN won.attempt = 1 THEN won.started_at
                    ELSE (SELECT min(f.started_at) FROM stage_runs f  -- redelivered: by the index, for these only
                          WHERE f.query_id = won.query_id AND f.stage = won.stage)
               END
               - CASE WHEN won.stage = :first THEN won.query_created ELSE previous.finished_at END
           ) AS wait
    FROM won LEFT JOIN won previous ON previous.query_id = won.query_id AND previous.stage = ({previous_stage})
), winners AS (
    SELECT stage,
           count(*) AS succeeded,
           count(*) FILTER (WHERE live) AS live_won,
           percentile_disc(0.5) WITHIN GROUP (ORDER BY duration) AS p50,
           percentile_disc(0.99) WITHIN GROUP (ORDER BY duration) AS p99,
           avg(duration) AS mean,
           percentile_disc(0.5) WITHIN GROUP (ORDER BY greatest(0, wait)) FILTER (WHERE wait IS NOT NULL) AS wait_p50,
           percentile_disc(0.99) WITHIN GROUP (ORDER BY greatest(0, wait)) FILTER (WHERE wait IS NOT NULL) AS wait_p99,
           percentile_disc(0.5) WITHIN GROUP (ORDER BY end_to_end) AS end_to_end_p50,
           percentile_disc(0.99) WITHIN GROUP (ORDER BY end_to_end) AS end_to_end_p99
    FROM timed GROUP BY stage
), last AS (
    SELECT DISTINCT ON (r.query_id, r.stage) r.stage, r.status, r.worker, r.started_at, r.query_status
    FROM runs r
    WHERE NOT EXISTS (SELECT 1 FROM won w WHERE w.query_id = r.query_id AND w.stage = r.stage)
    ORDER BY r.query_id, r.stage, r.attempt DESC
), unfinished AS (
    SELECT stage,
           count(*) FILTER (WHERE query_status NOT IN ('failed', 'cancelled')) AS live_unfinished,
           count(*) FILTER (WHERE status = 'retrying' AND query_status NOT IN :terminal) AS retrying,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (
               WHERE status NOT IN ('running', 'failed') AND NOT (status = 'retrying' AND query_status NOT IN :terminal)
           ) AS pending_unfinished,
           json_agg(json_build_array(worker, started_at)) FILTER (WHERE status = 'running') AS running
    FROM last GROUP BY stage
), attempts AS (
    SELECT stage, count(*) AS attempts, count(*) FILTER (WHERE status = 'lost') AS lost FROM runs GROUP BY stage
)
SELECT * FROM attempts LEFT JOIN winners USING (stage) LEFT JOIN unfinished USING (stage)
"""


def stage_sql():
    previous = " ".join(
        f"WHEN '{later.value}' THEN '{earlier.value}'"
        for earlier, later in zip(PIPELINE[:-1], PIPELINE[1:], strict=True)
    )
    statement = text(STAGE_AGGREGATES.replace("{previous_stage}", f"CASE won.stage {previous} END"))
    return statement.bindparams(bindparam("stages", expanding=True), bindparam("terminal", expanding=True))


def stage_aggregates(
    session, job_id: uuid.UUID
) -> tuple[dict[str, StageSummary], list[tuple[str, str | None, datetime]], tuple[float | None, float | None]]:
    """Per-stage counts and timings of a job, aggregated in Postgres; the running attempts (stage, worker,
    start: `worker_gone` tells which wait for redelivery; one per query in flight at most); the end-to-end
    p50 and p99 of the answered queries. A query not started at a stage is pending there unless it
    failed or was cancelled."""
    params = {
        "job_id": job_id,
        "stages": [stage.value for stage in PIPELINE],
        "terminal": list(TERMINAL),
        "first": PIPELINE[0].value,
    }
    live = session.scalar(
        select(func.count()).where(Query.job_id == job_id, Query.status.not_in(("failed", "cancelled")))
    )
    summaries = {stage.value: StageSummary(stage=stage.value, pending=live) for stage in PIPELINE}
    latency: tuple[float | None, float | None] = (None, None)
    running: list[tuple[str, str | None, datetime]] = []
    # The sorts of 10,000s of durations per stage stay in memory (the default 4 MB spills them to disk).
    session.execute(text("SET LOCAL work_mem = '32MB'"))
    for row in session.execute(stage_sql(), params).mappings():
        summary = summaries[row["stage"]]
        summary.attempts, summary.lost = row["attempts"], row["lost"]
        summary.succeeded, summary.retrying, summary.failed = (
            row["succeeded"] or 0,
            row["retrying"] or 0,
            row["failed"] or 0,
        )
        summary.pending = (
            live - (row["live_won"] or 0) - (row["live_unfinished"] or 0) + (row["pending_unfinished"] or 0)
        )
        summary.p50_s, summary.p99_s = seconds_of(row["p50"]), seconds_of(row["p99"])
        summary.mean_s = seconds_of(row["mean"])
        summary.wait_p50_s, summary.wait_p99_s = seconds_of(row["wait_p50"]), seconds_of(row["wait_p99"])
        if row["stage"] == PIPELINE[-1].value:
            latency = (seconds_of(row["end_to_end_p50"]), seconds_of(row["end_to_end_p99"]))
        running += [(row["stage"], worker, datetime.fromisoformat(start)) for worker, start in row["running"] or ()]
    return summaries, running, latency


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


def failed_queries(session, job_id: uuid.UUID, limit: int | None = None) -> list[QueryFailure]:
    """The failed queries of a job in the order of the questions file (line, then id), each with the
    stage it failed at: the one it recorded, else that of its last failed attempt, else `input`."""
    last_failed = (
        select(StageRun.stage)
        .where(StageRun.query_id == Query.id, StageRun.status == "failed")
        .order_by(StageRun.attempt.desc(), StageRun.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Query.id, Query.external_id, Query.error, Query.line, func.coalesce(Query.error_stage, last_failed))
        .where(Query.job_id == job_id, Query.status == "failed")
        .order_by(func.coalesce(Query.line, 0), Query.external_id.collate("C"))
        .limit(limit)
    )
    return [
        QueryFailure(
            query_id=query_id,
            id=external_id,
            stage=stage or INPUT_STAGE,
            error=error or "failed without a message",
            line=line,
        )
        for query_id, external_id, error, line, stage in rows
    ]


def stage_successes(job_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """For each job, how many of its queries each stage has done: one grouped count for a whole listing."""
    done: dict[uuid.UUID, dict[str, int]] = {job_id: {stage.value: 0 for stage in PIPELINE} for job_id in job_ids}
    with session_scope() as session:
        for job_id, stage, count in session.execute(
            select(Query.job_id, StageRun.stage, func.count())
            .join(Query, Query.id == StageRun.query_id)
            .where(Query.job_id.in_(job_ids), StageRun.status == "succeeded", StageRun.stage.in_(list(PIPELINE)))
            .group_by(Query.job_id, StageRun.stage)
        ):
            done[job_id][stage] = count
    return done


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
