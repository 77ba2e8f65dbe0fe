"""Warm-up per worker process: each process that runs tasks loads its stage's models before its first
message, and says so in Redis, so that `m2io ps` and the dashboard call a worker `ready` only once every
one of its processes is warm.

Why no task runs cold: Celery's prefork pool sends `worker_process_init` in the child (billiard's
initializer) before the child reports WORKER_UP, and the parent writes a task to a child only after that
report (celery/concurrency/asynpool.py, `on_process_alive`). With the solo pool the signal runs in the
worker itself while it builds its pool, before it connects to the broker. A message may be prefetched by the
parent meanwhile (prefetch 1), but it waits for a warm process. The parent kills a child that is not up
within `worker_proc_alive_timeout` (Celery's default, 4 s, is shorter than a model load on a busy small
machine): celery_app sets it from `worker_warm_up_timeout_s`.

The record: a Redis hash per worker incarnation, `m2io:warmup:<incarnation>` (services/common/health.py),
one field per process (its pid), a JSON `ProcessWarmth`, written again by a thread of that process at every
heartbeat with the heartbeat's TTL (so that it comes back after Redis lost it, restarted); the worker's
heartbeat thread drops the fields of pool processes that exited (a replaced child warms up anew).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis

from services.common.health import warmup_key
from services.common.queues import Stage
from services.common.settings import Settings, get_settings

log = logging.getLogger(__name__)


def default_embedder() -> str:
    """The embedding model a collection gets unless it names another (`M2IO_EMBEDDING_MODEL`)."""
    from services.common.embedding import get_embedder

    name = get_settings().embedding_model
    get_embedder(name).warm_up()
    return name


# What each stage's processes load before their first message. The LM backends (local, llm, checkpoint)
# are chosen per job and load on first use, as before. The generator and inserter read the vectors stored
# at ingest (services/common/vectors.py); only an LM's answer brings text that must be embedded.
WARM_UP: dict[Stage, tuple[Callable[[], str], ...]] = {
    Stage.RETRIEVER: (default_embedder,),  # embeds the question
    Stage.GENERATOR: (),  # extractive: the retriever's sections, or MMR over stored unit vectors
    Stage.INSERTER: (default_embedder,),  # rule: an LM's answer (no provenance) is embedded to be matched
    Stage.MERGER: (),
    Stage.TRAINER: (),  # a training run loads its own models
}


@dataclass
class ProcessWarmth:
    """One process's warm-up: `warming` while its models load, then `ready` (or `failed`, with the error:
    the process serves anyway, and its tasks fail with that error if they need the model)."""

    stage: str
    pid: int = field(default_factory=os.getpid)
    state: str = "warming"
    started: float = field(default_factory=time.time)
    seconds: float | None = None
    ready_at: float | None = None  # when it became ready (Unix seconds): its first task starts after
    models: list[str] = field(default_factory=list)
    # Model loads after `ready` (a model the warm-up did not load, loaded by a task): 0 when the table is right.
    late_loads: int = 0
    error: str | None = None


class WarmthRecord:
    """Writes this process's `ProcessWarmth` to its worker's hash; never raises (Redis may be restarting)."""

    def __init__(self, settings: Settings, incarnation: str, ttl_ms: int):
        self.client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        self.key = warmup_key(incarnation)
        self.ttl_ms = ttl_ms

    def drop_gone(self) -> None:
        """Drop the records of this worker's processes that exited (the one this process replaces): they
        must not count as warm. The heartbeat thread does so too, every beat (services/common/worker_life.py)."""
        import psutil

        try:
            gone = [pid for pid in self.client.hkeys(self.key) if not psutil.pid_exists(int(pid))]
            if gone:
                self.client.hdel(self.key, *gone)
        except redis.RedisError as error:
            log.warning("warm-up records of exited processes not dropped: %s", error)

    def keep(self, warmth: ProcessWarmth, interval_s: float) -> None:
        """Write `warmth` every `interval_s`, from a thread of this process, as long as it lives."""

        def again() -> None:
            while True:
                time.sleep(interval_s)
                self.write(warmth)

        threading.Thread(target=again, name="m2io-warmth", daemon=True).start()

    def write(self, warmth: ProcessWarmth) -> None:
        try:
            with self.client.pipeline() as pipe:
                pipe.hset(self.key, str(warmth.pid), json.dumps(asdict(warmth)))
                pipe.pexpire(self.key, self.ttl_ms)
                pipe.execute()
        except redis.RedisError as error:
            log.warning("warm-up record of pid %d not written: %s", warmth.pid, error)


@dataclass
class ProcessState:
    """This process's warm-up, kept to report late loads after each task."""

    warmth: ProcessWarmth
    record: WarmthRecord
    loads_when_ready: int = 0


PROCESS: ProcessState | None = None


def total_loads() -> int:
    from services.common.embedding import LOADS

    return sum(LOADS.values())


def settle_heap() -> None:
    """After the models are loaded: collect once, then move every object that survived (torch,
    transformers, the models: some 600k objects) out of the collector's reach (`gc.freeze`). Otherwise
    each full collection walks them all again, ~0.2 s a time, a few times per thousand questions, in
    every process that loaded a model; what tasks allocate later is collected as usual."""
    gc.collect()
    gc.freeze()


def warm_up_process(stages: list[Stage], incarnation: str, ttl_ms: int, beat_s: float | None = None) -> ProcessWarmth:
    """Load what `WARM_UP` names for `stages` in this process, recording `warming`, then `ready`/`failed`
    (and again every `beat_s` seconds, when given)."""
    global PROCESS
    warmth = ProcessWarmth(stage=",".join(stage.value for stage in stages))
    record = WarmthRecord(get_settings(), incarnation, ttl_ms)
    record.drop_gone()
    record.write(warmth)
    if beat_s:
        record.keep(warmth, beat_s)
    loaders = list(dict.fromkeys(loader for stage in stages for loader in WARM_UP.get(stage, ())))
    started = time.perf_counter()
    try:
        warmth.models = [loader() for loader in loaders]
        warmth.state = "ready"
        settle_heap()
    except Exception as error:  # noqa: BLE001 - recorded and shown; the process serves on
        log.error("warm-up of pid %d failed: %s", warmth.pid, "".join(traceback.format_exception_only(error)))
        warmth.state, warmth.error = "failed", f"{type(error).__name__}: {error}"
    warmth.seconds = round(time.perf_counter() - started, 3)
    warmth.ready_at = time.time()
    PROCESS = ProcessState(warmth, record, loads_when_ready=total_loads())
    record.write(warmth)
    log.info("pid %d %s after %.1f s of warm-up (%s)", warmth.pid, warmth.state, warmth.seconds, warmth.models)
    return warmth


def note_late_loads() -> None:
    """After a task: if it loaded a model (one the warm-up did not), the record says so. Writes only then."""
    if PROCESS is None:
        return
    late = total_loads() - PROCESS.loads_when_ready
    if late != PROCESS.warmth.late_loads:
        PROCESS.warmth.late_loads = late
        PROCESS.record.write(PROCESS.warmth)
