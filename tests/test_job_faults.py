"""Faults during batch jobs, with real processes: worker processes killed with SIGKILL, the tests' Redis
stopped and started again, Postgres made unavailable for a few seconds, and poison questions. Nothing is
mocked: the job goes through the real queues, workers, Postgres and S3 of the session fixtures.

What must hold after every fault: every query completes, each answer is stored exactly once, each stage
succeeds exactly once per query, and no attempt is left `running`.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from services.common.db import get_engine, session_scope
from services.common.models import Answer, Query, StageRun
from services.common.queues import PIPELINE
from services.jobs.status import JobStatus, job_status
from tests.test_jobs import m2io
from tests.test_workers import wait_for

pytestmark = pytest.mark.slow

QUESTIONS = [
    "How do I fry pancakes?",
    "What goes into the pancake batter?",
    "What do I serve pancakes with?",
    "How do I make tomato soup?",
    "What do I roast for the tomato soup?",
    "How is the tomato soup blended?",
    "What is a good breakfast?",
    "How are pancakes cooked?",
    "Is the soup warm?",
    "What are the directions for pancakes?",
    "What makes the soup smooth?",
    "What syrup goes on pancakes?",
]
BACKENDS = {"generator": "extractive", "inserter": "rule"}  # fast and deterministic: the faults are the subject


def ingest_fault_corpus(tmp_path_factory, prefix: str = "faults") -> str:
    """A small Markdown corpus ingested in this process into a fresh collection; returns its name."""
    from tests.corpus_fixtures import write_markdown_corpus
    from tests.test_ingest import ingest_in_process

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path_factory.mktemp(prefix) / "corpus"), name)
    return name


@pytest.fixture(scope="module")
def collection(servers, tmp_path_factory) -> str:
    return ingest_fault_corpus(tmp_path_factory)


def submit(collection: str, count: int, label: str) -> uuid.UUID:
    from services.client import Client

    records = [{"id": f"{label}-{n}", "question": QUESTIONS[n % len(QUESTIONS)]} for n in range(count)]
    return Client().submit(records, collection, name=label, **BACKENDS)


def status_or_none(job_id: uuid.UUID) -> JobStatus | None:
    """The job's status, or None while Postgres does not answer (it is being restarted)."""
    try:
        return job_status(job_id)
    except OperationalError:
        return None


def describe(status: JobStatus | None) -> str:
    if status is None:
        return "no status (database unreachable)"
    stages = ", ".join(
        f"{s.stage}: {s.succeeded} done/{s.running} running/{s.retrying} retrying/{s.pending} pending/{s.lost} lost"
        for s in status.stages
    )
    return f"{status.state} {status.counts}; {stages}; failures {[(f.id, f.error) for f in status.failures]}"


def wait_for_job(job_id: uuid.UUID, timeout: float, workers=None) -> JobStatus:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = status_or_none(job_id)
        if status is not None and status.done:
            return status
        time.sleep(0.5)
    logs = ""
    for worker in getattr(workers, "started", []):
        logs += f"\n--- {worker.name} ({worker.log}):\n" + "\n".join(worker.log.read_text().splitlines()[-15:])
    raise AssertionError(f"job {job_id} not done after {timeout}s: {describe(status)}{logs}")


def runs_of_job(job_id: uuid.UUID) -> list[StageRun]:
    with session_scope() as session:
        return list(
            session.scalars(select(StageRun).join(Query, Query.id == StageRun.query_id).where(Query.job_id == job_id))
        )


def stage_books_settled(job_id: uuid.UUID, expected: set[uuid.UUID]) -> bool:
    """Every expected query has a succeeded run of each stage and no attempt is still running.

    Checked on the stage runs themselves, not only on the job's state: the books must balance too."""
    runs = runs_of_job(job_id)
    succeeded = Counter((run.query_id, run.stage) for run in runs if run.status == "succeeded")
    running = [run for run in runs if run.status == "running"]
    return not running and all(succeeded[(q, stage.value)] >= 1 for q in expected for stage in PIPELINE)


def broker_drained() -> bool:
    """No message waits in a stage's queue and none is delivered but unacknowledged (that includes the
    message of a killed worker, until the visibility timeout gives it back, and retries waiting for
    their countdown in a worker): every duplicate delivery has been handled."""
    import redis

    from services.common.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    return not any(client.llen(stage.queue) for stage in PIPELINE) and not client.hlen("unacked")


def assert_answered_exactly_once(job_id: uuid.UUID, expected: set[uuid.UUID]) -> list[StageRun]:
    """After a fault: the expected queries each have one answer and one success per stage, no attempt is
    left running, and late duplicate deliveries changed none of that. Returns the job's stage runs."""
    try:
        wait_for(lambda: stage_books_settled(job_id, expected), 60, "every stage to record its success")
    except AssertionError as error:
        raise AssertionError(f"{error}: {[(r.stage, r.status, r.worker) for r in runs_of_job(job_id)]}") from None
    # Twice in a row: a message between its pop from the queue and its entry in `unacked` is in neither.
    wait_for(lambda: broker_drained() and (time.sleep(0.5) or broker_drained()), 60, "the queues to drain")
    runs = runs_of_job(job_id)
    succeeded = Counter((run.query_id, run.stage) for run in runs if run.status == "succeeded")
    assert {key: n for key, n in succeeded.items() if n != 1} == {}
    assert set(succeeded) == {(q, stage.value) for q in expected for stage in PIPELINE}
    assert [(run.stage, run.worker) for run in runs if run.status == "running"] == []
    with session_scope() as session:
        answers = Counter(
            session.scalars(
                select(Answer.query_id).join(Query, Query.id == Answer.query_id).where(Query.job_id == job_id)
            )
        )
        statuses = dict(session.execute(select(Query.id, Query.status).where(Query.job_id == job_id)).all())
    assert answers == Counter(expected)  # exactly one answer row per query, none for any other
    assert {q: statuses[q] for q in expected} == dict.fromkeys(expected, "succeeded")
    return runs


def query_ids(job_id: uuid.UUID, status: str | None = None) -> set[uuid.UUID]:
    with session_scope() as session:
        where = [Query.job_id == job_id] + ([Query.status == status] if status else [])
        return set(session.scalars(select(Query.id).where(*where)))


# ---------------------------------------------------------------------------------------------- shared workers
# The tests share one worker per stage: the workers outlive each fault, as the workers of a cluster would,
# and each process loads the embedding model once (tens of seconds on a busy machine). The kill test,
# which replaces them, comes last.


@pytest.fixture(scope="module")
def pipeline(servers, collection):
    from tests.conftest import FAST_REDELIVERY, Workers, purge_queues

    pool = Workers(servers=servers, base_env={**os.environ, **servers.env, **FAST_REDELIVERY})
    try:
        for stage in PIPELINE:
            pool.start(stage.value)
        yield pool
    finally:
        pool.stop_all()
        purge_queues()


# ---------------------------------------------------------------------------------------------- poison


def test_poison_questions_fail_alone_with_clear_messages(servers, pipeline, collection, tmp_path):
    """A 1 MB question, an empty one, an invalid JSON line and a question naming an unknown collection,
    between good questions, submitted with the real CLI: each poison fails alone with a message that
    says what is wrong; the good questions are answered."""
    good = [json.dumps({"id": f"good-{n}", "question": QUESTIONS[n]}) for n in range(4)]
    lines = [
        good[0],
        good[1],
        '{"id": "broken" "question": "How do I fry pancakes?"}',
        json.dumps({"id": "huge", "question": "x" * 1_048_576}),
        json.dumps({"id": "empty", "question": ""}),
        json.dumps({"id": "nowhere", "question": QUESTIONS[0], "collection": "no-such-collection-here"}),
        good[2],
        good[3],
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    submitted = m2io(
        "submit", str(questions), "--collection", collection, "--generator", "extractive", "--inserter", "rule"
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = uuid.UUID(submitted.stdout.strip().splitlines()[-1])
    assert "8 questions queued, 3 refused" in submitted.stderr
    final = wait_for_job(job_id, 180, pipeline)
    assert final.state == "partial", describe(final)
    assert final.counts == {"succeeded": 4, "failed": 4}
    failures = {f.id: f for f in final.failures}
    assert set(failures) == {"line-3", "huge", "empty", "nowhere"}
    assert (failures["line-3"].stage, failures["line-3"].line) == ("input", 3)
    assert failures["line-3"].error == "line 3: invalid JSON (Expecting ',' delimiter at column 17)"
    assert (failures["huge"].stage, failures["huge"].error) == (
        "input",
        "line 4: the question is 1,048,576 characters (limit 4,000)",
    )
    assert (failures["empty"].stage, failures["empty"].error) == ("input", "line 5: the question is empty")
    assert failures["nowhere"].stage == "retriever"
    assert "no collection named 'no-such-collection-here'" in failures["nowhere"].error
    with session_scope() as session:
        stored = dict(
            session.execute(select(Query.external_id, func.length(Query.question)).where(Query.job_id == job_id)).all()
        )
        assert stored["huge"] <= 201  # the megabyte is not stored, only its beginning for the operator
    answered = query_ids(job_id, "succeeded")
    assert_answered_exactly_once(job_id, answered)
    # The refused lines never reached a queue; the unknown collection failed once, at the retriever (a
    # permanent error is not retried), and went no further.
    attempts: dict[uuid.UUID, list[tuple[str, str]]] = {}
    for run in runs_of_job(job_id):
        attempts.setdefault(run.query_id, []).append((run.stage, run.status))
    assert {f.id: attempts.get(f.query_id, []) for f in final.failures} == {
        "line-3": [],
        "huge": [],
        "empty": [],
        "nowhere": [("retriever", "failed")],
    }

    shown = m2io("status", str(job_id))
    assert shown.returncode == 0, shown.stderr  # a partial job is not an error
    assert "partial" in shown.stdout and "4/8 answered" in shown.stdout
    for message in (
        "line 3: invalid JSON (Expecting ',' delimiter at column 17)",
        "line 4: the question is 1,048,576 characters (limit 4,000)",
        "line 5: the question is empty",
        "no collection named 'no-such-collection-here'",
    ):
        assert message in shown.stdout, (message, shown.stdout)
    as_json = m2io("status", str(job_id), "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["state"] == "partial"


# ---------------------------------------------------------------------------------------------- outages


def wait_until_mid_task(job_id: uuid.UUID, timeout: float = 120.0) -> bool:
    """Until the pipeline flows (a question got through the generator), most of the job is ahead, and
    an attempt of the job is in the middle of its task: the fault then cuts a task short. False when no
    running attempt was seen in time (the fault still lands mid-job)."""
    status = wait_for(
        lambda: (s := job_status(job_id)).stages[1].succeeded >= 1 and s,
        timeout,
        "the first question to get through the generator",
        interval=0.1,
    )
    assert not status.done and status.stages[-1].succeeded < status.total - 2, describe(status)
    probe = text(
        "SELECT 1 FROM stage_runs r JOIN queries q ON q.id = r.query_id "
        "WHERE q.job_id = :job AND r.status = 'running' LIMIT 1"
    )
    deadline = time.monotonic() + 30
    with get_engine().connect() as conn:
        while time.monotonic() < deadline:
            found = conn.execute(probe, {"job": job_id}).first()
            conn.rollback()
            if found:
                return True
            time.sleep(0.005)
    return False


def worker_log_lines(pool, needle: str, since: dict[str, int]) -> list[str]:
    """Lines containing `needle` that the workers logged after `since` (bytes per log)."""
    found = []
    for worker in pool.started:
        with open(worker.log, "rb") as log:
            log.seek(since.get(worker.name, 0))
            found += [line for line in log.read().decode(errors="replace").splitlines() if needle in line]
    return found


def log_sizes(pool) -> dict[str, int]:
    return {worker.name: worker.log.stat().st_size for worker in pool.started}


def postgres_answers() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except OperationalError:
        return False


def test_postgres_unavailable_for_a_few_seconds_mid_job(servers, pipeline, collection):
    """The embedded Postgres is shut down (fast shutdown: open sessions are cut) while a task of the job
    runs, and started again 4 s later: the stages' database errors are transient, retried with backoff,
    and no query is lost."""
    from infra.processes import stop

    cluster = servers.cluster
    job_id = submit(collection, 10, "postgres")
    logs_before = log_sizes(pipeline)
    mid_task = wait_until_mid_task(job_id)
    try:
        # SIGINT is Postgres's fast shutdown (`pg_ctl stop -m fast`), as `m2io down` stops it.
        assert stop(cluster.table, "postgres", signal.SIGINT, timeout=30) == "stopped"
        assert not postgres_answers()
        time.sleep(4)
    finally:
        if not postgres_answers():
            cluster.ensure_postgres(dict(servers.env), print)
    final = wait_for_job(job_id, 240, pipeline)
    assert final.state == "succeeded", describe(final)
    assert final.counts == {"succeeded": 10}
    runs = assert_answered_exactly_once(job_id, query_ids(job_id))
    assert all(worker.process.poll() is None for worker in pipeline.started)  # they rode it out
    # What the outage did, for the record: attempts cut short, and the transient retries the workers logged.
    cut = Counter((r.stage, r.status) for r in runs if r.status != "succeeded")
    retried = worker_log_lines(pipeline, "retry: Retry in", logs_before)
    print(f"postgres outage (an attempt was running: {mid_task}): attempts {dict(cut)}, {len(retried)} retries")


def redis_answers() -> bool:
    from services.common.health import probe_redis
    from services.common.settings import get_settings

    return probe_redis(get_settings().redis_url).healthy


def broker_answers_this_process() -> bool:
    import kombu.exceptions
    import redis

    from services.common.celery_app import app

    try:
        app.control.ping(timeout=0.2)
    except (redis.RedisError, kombu.exceptions.OperationalError, OSError):
        return False
    return True


def test_redis_restarted_mid_job(servers, pipeline, collection):
    """The tests' Redis (append-only persistence, as `m2io up` starts it) is stopped while a task of the
    job runs and started again on the same port 2 s later: workers reconnect, the messages that were
    queued or unacknowledged survive, a task that could not hand its query on is delivered again, and
    every query completes once. This process, a long-lived client like the dashboard, submits again
    after the restart without being restarted itself."""
    from infra.processes import stop

    cluster = servers.cluster
    job_id = submit(collection, 10, "redis")
    logs_before = log_sizes(pipeline)
    mid_task = wait_until_mid_task(job_id)
    try:
        assert stop(cluster.table, "redis", signal.SIGTERM, timeout=30) == "stopped"
        assert not redis_answers()
        time.sleep(2)
    finally:
        if not redis_answers():
            cluster.ensure_redis(dict(servers.env), print)
    try:
        later_id = submit(collection, 3, "after-redis")  # through the connection pool that predates the restart
    finally:
        # This process's pooled broker connections predate the restart: the first use of each fails once
        # (redis-py finds it closed and drops it). Use them until they answer, so that the tests that come
        # next (their `workers.start` pings) find this process's Celery app as they would a fresh one.
        wait_for(broker_answers_this_process, 30, "this process's broker connections to answer", interval=0.1)
    final = wait_for_job(job_id, 180, pipeline)
    assert final.state == "succeeded", describe(final)
    assert final.counts == {"succeeded": 10}
    assert_answered_exactly_once(job_id, query_ids(job_id))
    later = wait_for_job(later_id, 60, pipeline)
    assert later.counts == {"succeeded": 3}, describe(later)
    assert_answered_exactly_once(later_id, query_ids(later_id))
    assert all(worker.process.poll() is None for worker in pipeline.started)  # they rode it out
    handoffs = worker_log_lines(pipeline, "could not enqueue the next stage", logs_before)
    given_back = worker_log_lines(pipeline, "giving the message back", logs_before)
    print(
        f"redis restart (an attempt was running: {mid_task}): {len(handoffs)} hand-offs failed and were redone, "
        f"{len(given_back)} of them by giving the message back"
    )


# ---------------------------------------------------------------------------------------------- kill -9


def kill_mid_task(worker, job_id: uuid.UUID, timeout: float = 60.0) -> int | None:
    """SIGKILL the whole worker (main process and pool) while it runs a task of the job, once it has
    finished one: the stage run it was in the middle of. Returns that run's id, or None when the kill
    did not land inside a task (between two tasks)."""
    of_worker = (
        "FROM stage_runs r JOIN queries q ON q.id = r.query_id "
        "WHERE q.job_id = :job AND r.stage = :stage AND r.worker = :worker AND r.status = "
    )
    probe = text(f"SELECT (SELECT count(*) {of_worker} 'succeeded'), (SELECT max(r.id) {of_worker} 'running')")
    names = {"job": job_id, "stage": worker.stage, "worker": worker.name}
    deadline = time.monotonic() + timeout
    running_now = text(f"SELECT max(r.id) {of_worker} 'running'")
    with get_engine().connect() as conn:
        # A tight poll: a task lasts milliseconds once the worker has loaded its model (the generator's p50
        # is ~4 ms), less than a poll and a kill take. So the worker is frozen (SIGSTOP, its whole process
        # group) when a task of it is seen running, looked at again while it cannot finish anything, and
        # killed only if a task is still running; else it is let go on (SIGCONT) and watched again.
        while time.monotonic() < deadline:
            done, running = conn.execute(probe, names).one()
            conn.rollback()
            if done and running is not None:
                os.killpg(worker.process.pid, signal.SIGSTOP)
                time.sleep(0.05)  # a statement the worker sent before it froze lands meanwhile
                still = conn.execute(running_now, names).scalar()
                conn.rollback()
                if still is not None:
                    worker.kill_all()
                    return still if still_running(conn, still) else None
                os.killpg(worker.process.pid, signal.SIGCONT)
            time.sleep(0.002)
        worker.kill_all()
        last = conn.execute(running_now, names).scalar()
        return last if last is not None and still_running(conn, last) else None


def still_running(conn, run_id: int) -> bool:
    """Whether a stage run is still `running` once its killed worker's last statements have settled: a
    success whose commit was already on its way when the worker froze lands after the look that saw it
    running, and then the kill interrupted nothing."""
    time.sleep(0.5)  # the killed connection's statement, if any, is done or rolled back by then
    status = conn.execute(text("SELECT status FROM stage_runs WHERE id = :id"), {"id": run_id}).scalar()
    conn.rollback()
    return status == "running"


def test_kill_each_kind_of_worker_mid_job(pipeline, collection):
    """The worker of each stage is killed with SIGKILL in the middle of a task while the job flows
    through all four stages, and a new worker of each stage takes over. Each killed worker's message
    comes back after the visibility timeout (acks_late); the attempt it left running is marked `lost`,
    and every query goes on exactly once.

    Runs last on the shared workers: they have their models loaded, so the kills land in steady state.
    The merger goes first and the retriever last, so that each stage still has work coming when its
    turn comes."""
    job_id = submit(collection, 16, "kill")
    landed: dict[str, int | None] = {}
    for stage in reversed(PIPELINE):
        (worker,) = [w for w in pipeline.started if w.stage == stage.value and w.process.poll() is None]
        landed[stage.value] = kill_mid_task(worker, job_id)
        assert worker.process.poll() is not None
    for stage in PIPELINE:
        pipeline.start(stage.value)  # the replacements serve the rest of the job
    final = wait_for_job(job_id, 180, pipeline)
    assert final.state == "succeeded", describe(final)
    expected = query_ids(job_id)
    assert len(expected) == 16 and final.counts == {"succeeded": 16}
    runs = assert_answered_exactly_once(job_id, expected)
    by_id = {run.id: run for run in runs}
    for stage, run_id in landed.items():
        if run_id is None:
            continue  # the kill fell between two tasks: nothing was interrupted, the outcome above still holds
        interrupted = by_id[run_id]
        assert (interrupted.stage, interrupted.status) == (stage, "lost"), (stage, interrupted.status)
        # the interrupted query's stage was done again, by another attempt
        assert any(r.query_id == interrupted.query_id and r.stage == stage and r.status == "succeeded" for r in runs)
    summary = {s.stage: s.lost for s in job_status(job_id).stages}
    for stage, run_id in landed.items():
        assert summary[stage] >= (1 if run_id is not None else 0)
    print(f"kills that landed mid-task: {[stage for stage, run_id in landed.items() if run_id is not None]}")
