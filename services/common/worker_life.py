"""A worker's life in Redis: its heartbeat (a key with a short TTL, refreshed by a thread), and the warm-up
records of its pool processes (services/common/warmup.py), of which it drops those of exited processes."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from services.common.health import heartbeat_key, warmup_key
from services.common.queues import Stage
from services.common.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WorkerLife:
    """This worker process's heartbeat: a key with a short TTL, refreshed by a thread (a task that holds
    the main thread, as with the solo pool, does not stop it). `incarnation` tells a restarted worker of
    the same name from the one that died; `since` (this host's clock) tells its attempts from theirs."""

    name: str
    settings: Settings
    stages: list[Stage] = field(default_factory=list)
    processes: int = 1  # the pool's size: the worker is ready when that many processes are warm
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    since: float = field(default_factory=time.time)
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str:
        return heartbeat_key(self.incarnation)

    def value(self) -> str:
        return json.dumps({"worker": self.name, "since": self.since, "pid": os.getpid(), "processes": self.processes})

    def ttl_ms(self) -> int:
        return int(self.settings.worker_heartbeat_ttl_s * 1000)

    def start(self) -> None:
        threading.Thread(target=self.beat, name="m2io-heartbeat", daemon=True).start()

    def beat(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        while not self.stopped.is_set():
            try:
                client.set(self.key, self.value(), px=self.ttl_ms())
                self.keep_warmth(client)
            except redis.RedisError as error:  # the broker is restarting: the next beat tries again
                log.warning("heartbeat of %s not written: %s", self.name, error)
            self.stopped.wait(self.settings.worker_heartbeat_s)
        try:
            client.delete(self.key, warmup_key(self.incarnation))
        except redis.RedisError as error:
            log.warning("heartbeat of %s not removed: %s", self.name, error)

    def keep_warmth(self, client: redis.Redis) -> None:
        """The pool processes' warm-up records (each rewritten by its process) go with the heartbeat; those of
        exited processes go at once."""
        import psutil

        key = warmup_key(self.incarnation)
        gone = [pid for pid in client.hkeys(key) if not psutil.pid_exists(int(pid))]
        if gone:
            client.hdel(key, *gone)
        client.pexpire(key, self.ttl_ms())
