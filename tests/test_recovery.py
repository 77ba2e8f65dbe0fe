"""Recovery after kill -9 of a whole worker, by heartbeats (real processes, real Redis/Postgres/S3).

Every worker of this module runs with the default visibility timeout (300 s) and a short heartbeat TTL:
a killed worker's message can come back well before the visibility timeout only through the heartbeat
watchdog, so each test shows that mechanism and nothing else. Separate from tests/test_job_faults.py,
whose workers sweep with a 5 s visibility timeout (any answer worker's sweep restores every answer
worker's messages, so theirs would blur the difference).
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from services.common.queues import PIPELINE, Stage
from services.common.smoke import create_probe_query, send_probe
from services.jobs.status import job_status
from tests.test_job_faults import (
    assert_answered_exactly_once,
    describe,
    ingest_fault_corpus,
    kill_mid_task,
    query_ids,
    runs_of_job,
    submit,
    wait_for_job,
)
from tests.test_jobs import m2io
from tests.test_workers import runs_by_status, wait_for

pytestmark = pytest.mark.slow

VISIBILITY_TIMEOUT_S = 300  # the default: the backstop, never reached here
HEARTBEAT_RECOVERY = {
    "M2IO_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
    "M2IO_UNACKED_RESTORE_INTERVAL_S": "1",
    "M2IO_WORKER_HEARTBEAT_S": "0.5",
    "M2IO_WORKER_HEARTBEAT_TTL_S": "3",
}
WELL_BEFORE_THE_VISIBILITY_TIMEOUT_S = 90  # TTL 3 s + sweep 1 s + a worker's start on a busy machine


@pytest.fixture(scope="module")
def collection(servers, tmp_path_factory) -> str:
    return ingest_fault_corpus(tmp_path_factory, "recovery")


@pytest.fixture
def pool(servers):
    from tests.conftest import Workers, purge_queues

    workers = Workers(servers=servers, base_env={**os.environ, **servers.env, **HEARTBEAT_RECOVERY})
    try:
        yield workers
    finally:
        workers.stop_all()
        purge_queues()


def stage_of(job_id: uuid.UUID, stage: Stage):
    return next(s for s in job_status(job_id).stages if s.stage == stage.value)


def test_killed_generator_waits_for_redelivery_then_its_query_completes_once(pool, collection):
    """kill -9 of the only generator worker while it runs a task of a job: `m2io status` shows the stage
    `waiting for redelivery` (a running attempt whose worker is gone); a new generator worker gets the
    message back by the dead worker's stopped heartbeat, well before the 300 s visibility timeout; the
    old attempt is marked `lost` and every query is answered once."""
    for stage in PIPELINE:
        pool.start(stage.value)
    for trial in range(3):  # a kill may fall between two tasks: then try again with the next job
        job_id = submit(collection, 6, f"recovery-{trial}")
        (generator,) = [w for w in pool.started if w.stage == "generator" and w.process.poll() is None]
        killed_at = time.monotonic()
        interrupted = kill_mid_task(generator, job_id)
        if interrupted is not None:
            break
        pool.start(Stage.GENERATOR.value)
        wait_for_job(job_id, 120, pool)
    assert interrupted is not None, "no kill landed inside a generator task in three jobs"

    waiting = wait_for(lambda: stage_of(job_id, Stage.GENERATOR).waiting, 30, "the stage to wait for redelivery")
    assert waiting == 1
    shown = m2io("status", str(job_id))
    assert shown.returncode == 0, shown.stderr
    assert "waiting for redelivery: generator (1)" in shown.stdout, shown.stdout
    as_json = json.loads(m2io("status", str(job_id), "--json").stdout)
    generator_row = next(s for s in as_json["stages"] if s["stage"] == "generator")
    assert (generator_row["waiting"], generator_row["running"]) == (1, 0)

    pool.start(Stage.GENERATOR.value)
    final = wait_for_job(job_id, WELL_BEFORE_THE_VISIBILITY_TIMEOUT_S, pool)
    assert time.monotonic() - killed_at < WELL_BEFORE_THE_VISIBILITY_TIMEOUT_S
    assert final.state == "succeeded", describe(final)
    runs = assert_answered_exactly_once(job_id, query_ids(job_id))
    lost = next(run for run in runs if run.id == interrupted)
    assert (lost.stage, lost.status, lost.worker) == ("generator", "lost", generator.name)
    again = [r for r in runs if r.query_id == lost.query_id and r.stage == "generator" and r.status == "succeeded"]
    assert len(again) == 1 and again[0].attempt == lost.attempt + 1
    assert all(s.waiting == 0 for s in job_status(job_id).stages)
    assert [r for r in runs_of_job(job_id) if r.status == "running"] == []


def test_a_live_trainer_keeps_its_message_and_a_dead_ones_comes_back(pool):
    """The trainer's unacknowledged messages live apart from the answer stages': an answer worker that
    sweeps with a 2 s visibility timeout does not give back the message of a trainer task that runs 8 s
    (a second trainer worker stands ready to take a duplicate: none comes). kill -9 of the trainer worker
    mid-task then gives its message back by its heartbeat, and the task completes once."""
    pool.start(Stage.GENERATOR.value, extra_env={"M2IO_VISIBILITY_TIMEOUT_S": "2"})
    first = pool.start(Stage.TRAINER.value)
    standby = pool.start(Stage.TRAINER.value)

    alive = create_probe_query(hold_seconds=8.0).model_copy(update={"chain": False})
    send_probe(Stage.TRAINER, alive)
    done = wait_for(lambda: runs_by_status(alive.query_id, Stage.TRAINER).get("succeeded"), 60, "the long task")
    assert set(runs_by_status(alive.query_id, Stage.TRAINER)) == {"succeeded"} and len(done) == 1

    probe = create_probe_query(hold_seconds=20.0).model_copy(update={"chain": False})
    send_probe(Stage.TRAINER, probe)
    running = wait_for(lambda: runs_by_status(probe.query_id, Stage.TRAINER).get("running"), 30, "the task to start")
    holder = next(w for w in (first, standby) if w.name == running[0].worker)
    time.sleep(1.0)
    killed_at = time.monotonic()
    holder.kill_all()
    succeeded = wait_for(
        lambda: runs_by_status(probe.query_id, Stage.TRAINER).get("succeeded"),
        WELL_BEFORE_THE_VISIBILITY_TIMEOUT_S,
        "the redelivered task to complete",
    )
    assert time.monotonic() - killed_at < WELL_BEFORE_THE_VISIBILITY_TIMEOUT_S
    runs = runs_by_status(probe.query_id, Stage.TRAINER)
    assert set(runs) == {"succeeded", "lost"} and len(runs["succeeded"]) == 1
    assert [run.worker for run in runs["lost"]] == [holder.name]
    assert succeeded[0].worker != holder.name
