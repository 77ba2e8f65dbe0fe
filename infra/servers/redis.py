"""Redis: the configured M2IO_REDIS_URL when it answers, else a local redis-server started here.

The local one has a password (`requirepass`, generated once and kept in cluster.env, whose
M2IO_REDIS_URL carries it); it reads it from a config file of mode 0600, never from its command
line, which any user sees in `ps`. A configured Redis elsewhere is used as its URL says.
"""

from __future__ import annotations

import os
import secrets
import shutil
from urllib.parse import urlsplit

from infra.processes import ProcessRecord, require_free_ports, spawn, write_private
from infra.servers.base import ClusterError, Echo, Health, Server, as_state, wait_until
from services.common.health import probe_redis
from services.common.settings import LOOPBACK_HOSTS, Settings


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


def local_redis_url(port: int, password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/0"


class Redis(Server):
    # Its pid file exists only when it was started here; a configured Redis that answers is used instead.
    name = "redis"

    def is_local(self, url: str) -> bool:
        """Whether `url` names the address of the local Redis (which `up` starts, with its password)."""
        parts = urlsplit(url)
        return parts.hostname in LOOPBACK_HOSTS and parts.port == self.state.settings.local_redis_port

    def runs(self, running: dict[str, ProcessRecord], env: dict[str, str]) -> bool:
        if "redis" in running:
            return True
        url = env.get("M2IO_REDIS_URL")
        return bool(url) and not self.is_local(url) and redis_answers(url)

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        configured = os.environ.get("M2IO_REDIS_URL") or self.state.settings.redis_url
        if not self.state.table.live("redis") and not self.is_local(configured) and redis_answers(configured):
            echo(f"redis: using {redacted(configured)}")
            return {"M2IO_REDIS_URL": configured}
        port = self.state.settings.local_redis_port
        password = env.get("M2IO_LOCAL_REDIS_PASSWORD") or secrets.token_hex(16)
        values = {"M2IO_REDIS_URL": local_redis_url(port, password), "M2IO_LOCAL_REDIS_PASSWORD": password}
        if self.state.table.live("redis"):
            return values
        require_free_ports({"redis": port}, "M2IO_LOCAL_REDIS_PORT, or M2IO_REDIS_URL for your own server")
        data_dir = self.state.private_dir("redis")
        config = data_dir / "redis.conf"
        write_private(config, f"requirepass {password}\n")
        # Append-only persistence: queued messages survive a restart of the local Redis.
        argv = [redis_binary(), str(config), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
        argv += ["--appendonly", "yes", "--save", ""]
        record = spawn(self.state.table, "redis", argv, self.state.logs / "redis.log", port=port)
        wait_until(lambda: redis_answers(values["M2IO_REDIS_URL"]), 30, "redis", record.log)
        where = "nothing answers there" if self.is_local(configured) else "it does not answer"
        echo(f"redis: {redacted(configured)}: {where}; started a local one (pid {record.pid}, port {port}, password)")
        return values

    def probe(self, env: dict[str, str]) -> list[Health]:
        url = broker_url(env, self.state.settings)
        # get, not live: a local Redis that died keeps its pid file, so it shows as dead.
        if self.state.table.get("redis") is not None:
            return [self.state.row("redis", lambda: as_state(probe_redis(url)))]
        state, detail = as_state(probe_redis(url))
        if state != "healthy" and self.is_local(url):
            # The local Redis that `m2io down` stopped (`up` starts it again), not a broken server.
            return [Health("redis", None, None, "absent", "not started")]
        detail = f"{redacted(url)} {detail}".strip()
        return [Health("redis", None, None, "external" if state == "healthy" else state, detail)]


def redacted(url: str) -> str:
    """The URL without its password, to print."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
