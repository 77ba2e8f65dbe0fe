"""Warm workers (services/common/warmup.py): each pool process loads its stage's models before its first
message, and the worker reads `starting`/`warming`, then `ready`, in Redis (what `m2io ps` and the
dashboard show). Real worker processes on real Redis/Postgres/S3."""

from __future__ import annotations

import gc
import json
import os
import signal
import time

import pytest
import redis

from infra.servers.clients import answers
from services.common import warmup
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, Embedder
from services.common.health import WorkerWarmth, online_workers, warmup_key, worker_warmth
from services.common.queues import Stage
from services.common.settings import get_settings
from tests.test_job_faults import ingest_fault_corpus, query_ids, submit
from tests.test_workers import runs_by_status, wait_for


@pytest.fixture(scope="module")
def collection(servers, tmp_path_factory) -> str:
    return ingest_fault_corpus(tmp_path_factory, "warmup")


@pytest.mark.slow
def test_a_worker_warms_up_before_its_first_message(workers, collection):
    """The question is queued before the retriever starts: its parent prefetches the message at once, yet
    no pool process runs it before that process has loaded the embedding model; and the task loads none."""
    job_id = submit(collection, 1, "warmup")
    (query_id,) = query_ids(job_id)
    worker = workers.start(Stage.RETRIEVER.value, concurrency=2, wait=False)
    redis_url = get_settings().redis_url
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, worker.log.read_text()[-3000:]
        found = (worker_warmth(redis_url) or {}).get(worker.name)
        state = found.state if found else "absent"
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in ("ready", "failed"):
            break
        time.sleep(0.05)
    assert seen[-1] == "ready", (seen, found, worker.log.read_text()[-3000:])
    assert "warming" in seen, seen  # recorded while its models load, before ready
    assert found.processes == 2 and found.ready == 2, found
    assert found.seconds is not None and found.seconds > 0

    # What `m2io ps` says of it, once it answers ping.
    workers.wait_ready(worker)
    online, _ = online_workers(redis_url)
    state, detail = answers(Stage.RETRIEVER, online, worker_warmth(redis_url))
    assert state == "ready", detail
    assert "2/2 processes warm" in detail and "warm-up" in detail, detail

    run = wait_for(lambda: (runs_by_status(query_id, Stage.RETRIEVER).get("succeeded") or [None])[0], 120, "retrieval")
    records = worker_warmth(redis_url)[worker.name].records
    assert {record["pid"] for record in records} == {child.pid for child in worker.children()}
    for record in records:
        assert record["state"] == "ready" and record["models"] == [DEFAULT_EMBEDDING_MODEL], record
        assert record["late_loads"] == 0, f"the first task loaded a model: {record}"
    # The task ran in a warm process: after the first of them was ready (same host, same clock).
    assert run.started_at.timestamp() >= min(record["ready_at"] for record in records), (run.started_at, records)
    # Celery's 4 s for a pool process to come up would have killed a slow warm-up (raised in celery_app).
    assert "Timed out waiting for UP message" not in worker.log.read_text()


@pytest.mark.slow
def test_a_replaced_pool_process_warms_up_and_a_model_loaded_late_is_reported(workers, servers):
    """A pool process killed is replaced by one that warms up again (the dead one's record goes); a model
    that a task loads after the warm-up (one the stage table does not name) is counted as a late load."""
    worker = workers.start(Stage.MERGER.value)
    redis_url = get_settings().redis_url
    first = wait_for(lambda: _ready(redis_url, worker.name), 60, "a ready merger")
    (old,) = first.records
    assert old["models"] == [] and old["seconds"] < 5, old  # the merger loads nothing
    os.kill(old["pid"], signal.SIGKILL)
    replaced = wait_for(
        lambda: (found := _ready(redis_url, worker.name)) and old["pid"] not in _pids(found) and found,
        60,
        "the replacement pool process, ready, and the killed one's record gone",
    )
    assert _pids(replaced) == {child.pid for child in worker.children()}

    # Redis loses the records (restarted after their TTL, without its data): each process writes its own again.
    incarnations = [key.decode().rsplit(":", 1)[1] for key in redis.Redis.from_url(redis_url).keys("m2io:warmup:*")]
    redis.Redis.from_url(redis_url).delete(*[warmup_key(incarnation) for incarnation in incarnations])
    assert (worker_warmth(redis_url) or {})[worker.name].state == "starting"
    wait_for(lambda: _ready(redis_url, worker.name), 30, "the merger ready again")

    # In this process: a warm-up that loads nothing, then a model loaded anyway.
    warmth = warmup.warm_up_process([Stage.MERGER], "test-late-load", 30_000)
    assert warmth.state == "ready" and warmth.models == []
    Embedder(DEFAULT_EMBEDDING_MODEL).warm_up()
    warmup.note_late_loads()
    stored = redis.Redis.from_url(redis_url).hget(warmup_key("test-late-load"), str(os.getpid()))
    warmup.PROCESS = None
    gc.unfreeze()  # the warm-up froze this test process's heap (settle_heap): give it back to the collector
    assert json.loads(stored)["late_loads"] == 1


def _pids(warmth) -> set[int]:
    return {record["pid"] for record in warmth.records}


def _ready(redis_url: str, name: str):
    found = (worker_warmth(redis_url) or {}).get(name)
    return found if found is not None and found.state == "ready" else None


@pytest.mark.unit
def test_settle_heap_collects_garbage_and_freezes_the_survivors():
    import weakref

    class Cycle:
        pass

    def garbage_cycles(n: int) -> list[weakref.ref]:
        refs = []
        for _ in range(n):
            one, two = Cycle(), Cycle()
            one.other, two.other = two, one
            refs.append(weakref.ref(one))
        return refs

    gc.unfreeze()  # an earlier test may have warmed up in this process: start from nothing frozen
    gc.disable()  # no automatic collection in between: only settle_heap's
    try:
        refs = garbage_cycles(1000)
        survivor = Cycle()
        assert all(ref() is not None for ref in refs)  # cycles: only the collector frees them
        assert any(found is survivor for found in gc.get_objects())
        warmup.settle_heap()
        assert gc.get_freeze_count() > 10_000  # pytest, pydantic, sqlalchemy...: every live object
        assert all(ref() is None for ref in refs)  # collected first, not frozen
        # Frozen objects leave the collector's generations. (Not the freeze count: other threads of
        # this process may free a frozen object by reference counting, which lowers it.)
        assert not any(found is survivor for found in gc.get_objects())
        garbage_cycles(10)
        assert gc.collect() >= 20  # later garbage is collected as usual
        assert not any(found is survivor for found in gc.get_objects())  # ...and the frozen stay frozen
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.unit
def test_a_workers_state_from_its_processes_records():
    ready = {"state": "ready", "seconds": 2.5, "late_loads": 0}
    assert WorkerWarmth("w", processes=2).state == "starting"
    assert WorkerWarmth("w", 2, ({"state": "warming"},)).state == "warming"
    assert WorkerWarmth("w", 2, (ready, {"state": "warming"})).state == "warming"
    both = WorkerWarmth("w", 2, (ready, {**ready, "seconds": 4.0, "late_loads": 1}))
    assert both.state == "ready" and both.seconds == 4.0
    assert both.describe() == "2/2 processes warm, warm-up 4.0 s, 1 model load(s) after warm-up"
    failed = WorkerWarmth("w", 2, (ready, {"state": "failed", "seconds": 0.1, "error": "EmbeddingModelError: no"}))
    assert failed.state == "failed" and failed.describe().endswith("; EmbeddingModelError: no")
