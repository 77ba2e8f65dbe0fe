"""Real Celery worker processes on real Redis/Postgres/S3: the message flow and its guarantees."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from sqlalchemy import func, select

from services.common.celery_app import app
from services.common.db import session_scope
from services.common.models import DeadLetter, Query
from services.common.queues import Stage
from services.common.smoke import create_probe_query, run_smoke_check, send_probe, stage_runs_of
from services.common.storage import get_store

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def runs_by_status(query_id: uuid.UUID, stage: Stage) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for run in stage_runs_of(query_id):
        if run.stage == stage.value:
            grouped.setdefault(run.status, []).append(run)
    return grouped


def test_a_message_goes_through_every_queue(workers):
    for stage in Stage:
        workers.start(stage.value)
    store = get_store()
    store.ensure_bucket()
    results = run_smoke_check(store, timeout=60)
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    checks = {r.check for r in results}
    assert {f"queue {stage.queue}" for stage in Stage} <= checks
    assert any(check.startswith("pgvector") for check in checks)
    assert any("merger worker" in check for check in checks)


def test_each_stage_runs_on_its_own_queue(workers):
    """A worker of one stage never runs another stage's task: without an inserter worker the probe
    stops at the inserter's queue."""
    for stage in (Stage.RETRIEVER, Stage.GENERATOR, Stage.MERGER):
        workers.start(stage.value)
    probe = create_probe_query()
    send_probe(Stage.RETRIEVER, probe)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.GENERATOR).get("succeeded"), 30, "generator")
    time.sleep(2)
    stages_run = {run.stage for run in stage_runs_of(probe.query_id)}
    assert stages_run == {"retriever", "generator"}
    inserter = workers.start(Stage.INSERTER.value)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.MERGER).get("succeeded"), 30, "merger")
    assert runs_by_status(probe.query_id, Stage.INSERTER)["succeeded"][0].worker == inserter.name


def dead_letters_for(task_ids: list[str]) -> dict[str, DeadLetter]:
    with session_scope() as session:
        letters = session.scalars(select(DeadLetter).where(DeadLetter.task_id.in_(task_ids))).all()
        return {letter.task_id: letter for letter in letters}


def test_invalid_payloads_are_recorded_and_the_worker_keeps_serving(workers):
    worker = workers.start(Stage.GENERATOR.value)
    bad = {
        "not a uuid": app.send_task("generator.smoke", args=[{"query_id": "not-a-uuid"}]),
        "out of range": app.send_task("generator.smoke", args=[{"query_id": str(uuid.uuid4()), "hold_seconds": -5}]),
        "unknown field": app.send_task("generator.smoke", args=[{"query_id": str(uuid.uuid4()), "surprise": 1}]),
        "unknown query": app.send_task("generator.smoke", args=[{"query_id": str(uuid.uuid4())}]),
        "wrong shape": app.send_task("generator.smoke", args=[1, 2]),
        "unknown task": app.send_task("generator.no_such_task", args=[{}], queue="generator"),
    }
    ids = {label: result.id for label, result in bad.items()}
    letters = wait_for(
        lambda: (found := dead_letters_for(list(ids.values()))) and len(found) == len(ids) and found,
        30,
        "a dead letter for every bad message",
    )
    expected_words = {
        "not a uuid": "query_id",
        "out of range": "hold_seconds",
        "unknown field": "surprise",
        "unknown query": "does not exist",
        "wrong shape": "expected one JSON object",
        "unknown task": "unknown task name",
    }
    for label, word in expected_words.items():
        letter = letters[ids[label]]
        assert word in letter.error, (label, letter.error)
        assert letter.payload  # the message as received, for the operator
    # the worker is alive and still serves good messages
    assert worker.process.poll() is None
    probe = create_probe_query().model_copy(update={"chain": False})
    send_probe(Stage.GENERATOR, probe)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.GENERATOR).get("succeeded"), 30, "a good message")


def test_permanent_error_fails_the_query_with_a_readable_message(workers):
    workers.start(Stage.MERGER.value)
    probe = create_probe_query(image_key="smoke/00/00/this-image-vanished").model_copy(update={"chain": False})
    send_probe(Stage.MERGER, probe)
    failed = wait_for(lambda: runs_by_status(probe.query_id, Stage.MERGER).get("failed"), 30, "a failed run")
    assert "does not exist" in failed[0].error
    with session_scope() as session:
        query = session.get(Query, probe.query_id)
        assert query.status == "failed"
        assert query.described_error.startswith("merger: ObjectMissing")
        assert (query.error_stage, query.error.split(":")[0]) == ("merger", "ObjectMissing")
    # exactly one attempt: a permanent error is not retried
    assert len(stage_runs_of(probe.query_id)) == 1


def test_worker_killed_mid_task_the_task_still_completes_once(workers):
    """SIGKILL of the whole worker (main process and pool) while it holds a task: acks_late keeps the
    message in Redis; it is delivered again after the visibility timeout to the next worker, and
    the stage succeeds exactly once."""
    first = workers.start(Stage.INSERTER.value)
    probe = create_probe_query(hold_seconds=4.0).model_copy(update={"chain": False})
    send_probe(Stage.INSERTER, probe)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.INSERTER).get("running"), 20, "the task to start")
    time.sleep(1.0)  # well inside the 4 s task
    first.kill_all()
    assert "succeeded" not in runs_by_status(probe.query_id, Stage.INSERTER)

    second = workers.start(Stage.INSERTER.value)
    succeeded = wait_for(
        lambda: runs_by_status(probe.query_id, Stage.INSERTER).get("succeeded"),
        60,
        "the redelivered task to complete",
    )
    # Give a duplicate delivery time to show up (visibility timeout 5 s, sweep every 1 s).
    time.sleep(7)
    runs = runs_by_status(probe.query_id, Stage.INSERTER)
    assert len(runs["succeeded"]) == 1
    assert succeeded[0].worker == second.name and succeeded[0].attempt == 2
    assert [run.worker for run in runs["lost"]] == [first.name]
    assert set(runs) == {"succeeded", "lost"}


def test_pool_process_killed_mid_task_is_requeued_at_once(workers):
    """SIGKILL of the pool process only: the worker sees it lost (reject_on_worker_lost) and the
    message is given back immediately, without waiting for the visibility timeout."""
    worker = workers.start(Stage.RETRIEVER.value)
    probe = create_probe_query(hold_seconds=3.0).model_copy(update={"chain": False})
    send_probe(Stage.RETRIEVER, probe)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.RETRIEVER).get("running"), 20, "the task to start")
    time.sleep(0.5)
    children = worker.children()
    assert children, "prefork pool has a child process"
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
    succeeded = wait_for(  # by the pool process that replaces the killed one, once it has warmed up
        lambda: runs_by_status(probe.query_id, Stage.RETRIEVER).get("succeeded"),
        120,
        "the requeued task to complete",
    )
    runs = runs_by_status(probe.query_id, Stage.RETRIEVER)
    assert len(succeeded) == 1 and succeeded[0].attempt == 2
    assert len(runs["lost"]) == 1
    assert worker.process.poll() is None  # the worker itself lived on
    # Its replacement loaded the model before taking the task, and was not killed for taking longer than
    # Celery's default 4 s to come up (celery_app raises it: a replacement pool process has that limit).
    assert "Timed out waiting for UP message" not in worker.log.read_text()


def test_redelivered_message_of_a_finished_stage_does_nothing_new(workers):
    workers.start(Stage.GENERATOR.value)
    probe = create_probe_query().model_copy(update={"chain": False})
    send_probe(Stage.GENERATOR, probe)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.GENERATOR).get("succeeded"), 30, "first delivery")
    send_probe(Stage.GENERATOR, probe)  # as if Redis delivered it again
    send_probe(Stage.GENERATOR, probe)
    # One worker, one process, FIFO: once a later message is done, the repeats have been handled.
    marker = create_probe_query().model_copy(update={"chain": False})
    send_probe(Stage.GENERATOR, marker)
    wait_for(lambda: runs_by_status(marker.query_id, Stage.GENERATOR).get("succeeded"), 30, "the marker")
    runs = stage_runs_of(probe.query_id)
    assert len(runs) == 1 and runs[0].status == "succeeded"


def raw_envelope(redis_client, **changes) -> bytes:
    """A real message as a producer sends it (a `merger.smoke`, popped back from the merger queue, which
    no worker of these tests consumes), with fields of the envelope replaced."""
    import json

    app.send_task("merger.smoke", args=[{"query_id": str(uuid.uuid4())}])
    envelope = json.loads(wait_for(lambda: redis_client.rpop(Stage.MERGER.queue), 10, "the message"))
    envelope.update(changes)
    return json.dumps(envelope).encode()


def test_undecodable_raw_messages_are_dead_lettered_and_the_worker_serves_on(workers):
    """Raw items LPUSHed into a stage's queue, as `redis-cli lpush generator 'not json {'` would: each one is
    recorded in `dead_letters` (the raw text, the queue, a readable error) and the worker serves on; before,
    the first one killed the worker with `Unrecoverable error: JSONDecodeError`."""
    import base64

    import redis

    from services.common.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    worker = workers.start(Stage.GENERATOR.value)
    with session_scope() as session:
        before = session.scalar(select(func.coalesce(func.max(DeadLetter.id), 0)))
    encoded = base64.b64encode
    shapes = {
        b"not json {": "not JSON (Expecting value at character 0)",
        b"[1,2]": "a JSON list, not a message",
        b'{"task": "generator.generate", "args": []}': "not a kombu message: no properties.delivery_tag",
        b'"just a string"': "a JSON str, not a message",
        b"\xff\xfe\x00 not text": "not",  # not UTF-8 (or not JSON): either way refused
        b"nul \x00 inside": "not JSON",
        b"x" * (2 << 20): "the message is 2,097,152 bytes (limit 1,048,576)",
        raw_envelope(client, body=encoded(b"not json {").decode()): "the body is not JSON",
        raw_envelope(client, body="%%% not base64 %%%"): "the body is not base64",
        raw_envelope(client, body=encoded(b"[1, 2]").decode()): "the body is not Celery's [args, kwargs, options]",
        raw_envelope(client, headers=None): "not a Celery task message",
        raw_envelope(client, headers=[1, 2]): "headers is not an object",
        raw_envelope(client, properties={"delivery_tag": 7}): "no properties.delivery_tag",
    }
    for raw in shapes:
        client.lpush(Stage.GENERATOR.queue, raw)

    def letters() -> list[DeadLetter]:
        with session_scope() as session:
            return list(session.scalars(select(DeadLetter).where(DeadLetter.id > before).order_by(DeadLetter.id)))

    found = wait_for(lambda: len(got := letters()) >= len(shapes) and got, 60, "a dead letter for every raw item")
    assert len(found) == len(shapes)
    for letter, (raw, words) in zip(found, shapes.items(), strict=True):  # FIFO: one worker, one queue
        assert letter.queue == Stage.GENERATOR.value
        assert letter.error.startswith("undecodable message: ") and words in letter.error, (raw[:80], letter.error)
        assert letter.payload == raw[:10_000].decode("utf-8", "replace").replace("\x00", "\\x00")
    assert worker.process.poll() is None
    assert "Unrecoverable error" not in worker.log.read_text()
    probe = create_probe_query().model_copy(update={"chain": False})
    send_probe(Stage.GENERATOR, probe)
    wait_for(lambda: runs_by_status(probe.query_id, Stage.GENERATOR).get("succeeded"), 30, "a good message")
