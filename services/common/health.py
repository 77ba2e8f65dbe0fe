"""Health probes of the servers and workers, shared by `m2io ps` and the dashboard.

Each probe returns a `Probe`: healthy or not, and a detail a person can act on. Probes never raise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg
import redis

from services.common.queues import Stage
from services.common.settings import Settings

# Each worker process keeps `m2io:heartbeat:<incarnation>` alive (services/common/celery_app.py), lists
# the delivery tags it holds in `m2io:held:<unacked key>:<incarnation>`, and its pool processes record their
# warm-up in the hash `m2io:warmup:<incarnation>` (services/common/warmup.py).
HEARTBEAT_PREFIX = "m2io:heartbeat:"
HELD_PREFIX = "m2io:held:"
WARMUP_PREFIX = "m2io:warmup:"


def heartbeat_key(incarnation: str) -> str:
    return HEARTBEAT_PREFIX + incarnation


def warmup_key(incarnation: str) -> str:
    return WARMUP_PREFIX + incarnation


@dataclass(frozen=True)
class Probe:
    healthy: bool
    detail: str


def probe_postgres(url: str | None) -> Probe:
    if not url:
        return Probe(False, "no database URL configured")
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(plain, connect_timeout=2) as conn:
            version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    except psycopg.Error as error:
        return Probe(False, str(error).strip().splitlines()[0])
    return Probe(True, f"pgvector {version[0]}" if version else "pgvector not installed yet (run migrations)")


def probe_redis(url: str) -> Probe:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError as error:
        return Probe(False, str(error))
    return Probe(True, "answers ping")


def probe_s3(settings: Settings) -> Probe:
    from services.common.storage import ObjectStore

    try:
        store = ObjectStore.from_settings(settings)
        found = store.client.bucket_exists(store.bucket)
    except Exception as error:  # noqa: BLE001 - any failure (auth, network, config) is the finding
        return Probe(False, f"{type(error).__name__}: {error}")
    return Probe(True, f"bucket {store.bucket}") if found else Probe(False, f"bucket {store.bucket} missing")


def online_workers(redis_url: str, timeout: float = 1.5) -> tuple[set[str], str | None]:
    """Names of the workers that answer a broadcast ping, and the error if the broker is down."""
    from celery import Celery

    probe = Celery("m2io-health", broker=redis_url)
    try:
        replies = probe.control.ping(timeout=timeout) or []
    except Exception as error:  # noqa: BLE001 - a dead broker means no worker is reachable
        return set(), f"{type(error).__name__}: {error}"
    finally:
        probe.close()
    return {name for reply in replies for name in reply}, None


def workers_of(stage: Stage, online: set[str]) -> list[str]:
    """Workers are named `<stage>@<host>` (or `<stage>-N@<host>`)."""
    return sorted(name for name in online if name.split("@", 1)[0].split("-", 1)[0] == stage.value)


def queue_depths(redis_url: str) -> dict[str, int | None]:
    """Messages waiting in each stage's queue (None when Redis does not answer)."""
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
        return {stage.queue: int(client.llen(stage.queue)) for stage in Stage}
    except redis.RedisError:
        return {stage.queue: None for stage in Stage}


def live_beats(client: redis.Redis) -> dict[str, dict]:
    """The heartbeat records alive now, by incarnation (raises RedisError)."""
    keys = list(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=200))
    values = client.mget(keys) if keys else []
    beats = {}
    for key, value in zip(keys, values, strict=True):
        try:
            beat = json.loads(value) if value else None
            beat["worker"], beat["since"] = str(beat["worker"]), float(beat["since"])
        except (ValueError, TypeError, KeyError):
            continue  # expired between SCAN and MGET, or not ours
        beats[key.decode().removeprefix(HEARTBEAT_PREFIX)] = beat
    return beats


def worker_heartbeats(redis_url: str) -> dict[str, list[float]] | None:
    """The workers whose heartbeat is alive, each with the start times (its host's clock, Unix seconds) of
    its live incarnations; None when Redis does not answer (then nothing can be said of any worker)."""
    try:
        beats = live_beats(redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1))
    except redis.RedisError:
        return None
    alive: dict[str, list[float]] = {}
    for beat in beats.values():
        alive.setdefault(beat["worker"], []).append(beat["since"])
    return alive


@dataclass(frozen=True)
class WorkerWarmth:
    """A worker's warm-up, from its newest live incarnation: `processes` is its pool's size, `records` the
    `ProcessWarmth` of each of its live processes that started warming (services/common/warmup.py)."""

    worker: str
    processes: int
    records: tuple[dict, ...] = ()

    @property
    def ready(self) -> int:
        return sum(record.get("state") == "ready" for record in self.records)

    @property
    def state(self) -> str:
        """`starting` (no process warming yet), `warming`, `ready` (every process), or `failed`."""
        if any(record.get("state") == "failed" for record in self.records):
            return "failed"
        if self.processes and self.ready >= self.processes:
            return "ready"
        return "warming" if self.records else "starting"

    @property
    def seconds(self) -> float | None:
        """The longest warm-up of its processes, in seconds."""
        done = [record["seconds"] for record in self.records if record.get("seconds") is not None]
        return max(done) if done else None

    def describe(self) -> str:
        errors = sorted({record["error"] for record in self.records if record.get("error")})
        late = sum(record.get("late_loads") or 0 for record in self.records)
        parts = [f"{self.ready}/{self.processes} processes warm"]
        parts += [f"warm-up {self.seconds:.1f} s"] if self.seconds is not None else []
        parts += [f"{late} model load(s) after warm-up"] if late else []
        return ", ".join(parts) + (f"; {errors[0]}" if errors else "")


def worker_warmth(redis_url: str) -> dict[str, WorkerWarmth] | None:
    """Each live worker's warm-up; None when Redis does not answer."""
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
        beats = live_beats(client)
        newest: dict[str, tuple[str, dict]] = {}
        for incarnation, beat in beats.items():
            if beat["worker"] not in newest or beat["since"] > newest[beat["worker"]][1]["since"]:
                newest[beat["worker"]] = (incarnation, beat)
        found = {}
        for worker, (incarnation, beat) in newest.items():
            fields = client.hgetall(warmup_key(incarnation))
            records = []
            for value in fields.values():
                try:
                    records.append(json.loads(value))
                except ValueError:
                    continue
            found[worker] = WorkerWarmth(worker, int(beat.get("processes") or 0), tuple(records))
    except redis.RedisError:
        return None
    return found
