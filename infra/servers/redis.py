"""Redis: the configured M2IO_REDIS_URL when it answers, else a local redis-server started here."""

from __future__ import annotations

import os
import shutil

from infra.processes import ProcessRecord, require_free_ports, spawn
from infra.servers.base import ClusterError, Echo, Health, Server, as_state, wait_until
from services.common.health import probe_redis
from services.common.settings import Settings


def redis_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if not found:
        raise ClusterError("no redis-server on PATH: install Debian's redis-server or set M2IO_REDIS_URL")
    return found


def redis_answers(url: str) -> bool:
    return probe_redis(url).healthy


def broker_url(env: dict[str, str], settings: Settings) -> str:
    """The Redis the cluster's processes use: the one `up` wrote to cluster.env."""
    return env.get("M2IO_REDIS_URL", settings.redis_url)


class Redis(Server):
    # Its pid file exists only when it was started here; a configured Redis that answers is used instead.
    name = "redis"

    def local_url(self) -> str:
        return f"redis://127.0.0.1:{self.state.settings.local_redis_port}/0"

    def runs(self, running: dict[str, ProcessRecord], env: dict[str, str]) -> bool:
        if "redis" in running:
            return True
        url = env.get("M2IO_REDIS_URL")
        return bool(url) and redis_answers(url)

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        configured = os.environ.get("M2IO_REDIS_URL") or self.state.settings.redis_url
        if not self.state.table.live("redis") and redis_answers(configured):
            echo(f"redis: using {configured}")
            return {"M2IO_REDIS_URL": configured}
        port = self.state.settings.local_redis_port
        url = self.local_url()
        if self.state.table.live("redis"):
            return {"M2IO_REDIS_URL": url}
        require_free_ports({"redis": port}, "M2IO_LOCAL_REDIS_PORT, or M2IO_REDIS_URL for your own server")
        data_dir = self.state.dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        # Append-only persistence: queued messages survive a restart of the local Redis.
        argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
        argv += ["--appendonly", "yes", "--save", ""]
        record = spawn(self.state.table, "redis", argv, self.state.logs / "redis.log", port=port)
        wait_until(lambda: redis_answers(url), 30, "redis", record.log)
        echo(f"redis: {configured} does not answer; started a local one (pid {record.pid}, port {port})")
        return {"M2IO_REDIS_URL": url}

    def probe(self, env: dict[str, str]) -> list[Health]:
        url = broker_url(env, self.state.settings)
        # get, not live: a local Redis that died keeps its pid file, so it shows as dead.
        if self.state.table.get("redis") is not None:
            return [self.state.row("redis", lambda: as_state(probe_redis(url)))]
        state, detail = as_state(probe_redis(url))
        if state != "healthy" and url == self.local_url():
            # The local Redis that `m2io down` stopped (`up` starts it again), not a broken server.
            return [Health("redis", None, None, "absent", "not started")]
        return [Health("redis", None, None, "external" if state == "healthy" else state, f"{url} {detail}".strip())]
