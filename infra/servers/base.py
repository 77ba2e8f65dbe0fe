"""What every server of the local cluster shares: where it keeps its things, and its interface.

A `Server` starts its process(es) in `ensure` when they do not run (or answer) yet, returning the
M2IO_* settings that reach it, and reports their health in `probe`, as rows of `m2io ps`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.processes import ProcessRecord, ProcessTable, tail
from services.common.health import Probe
from services.common.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

Echo = Callable[[str], None]


class ClusterError(RuntimeError):
    pass


@dataclass
class Health:
    name: str
    pid: int | None
    port: int | None
    state: str  # healthy | unhealthy | dead | external | absent; a worker: starting | warming | ready
    detail: str = ""


def as_state(probe: Probe, healthy_state: str = "healthy") -> tuple[str, str]:
    """A shared health probe as a row of `m2io ps`."""
    return (healthy_state if probe.healthy else "unhealthy"), probe.detail


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # noqa: BLE001 - any failure of a probe means "not ready yet"
            last_error = f"{type(error).__name__}: {error}"
        time.sleep(0.25)
    log_tail = f"\n--- last lines of {log}:\n{tail(log)}" if log else ""
    raise ClusterError(f"{what} did not become ready within {timeout:.0f}s {last_error}{log_tail}")


class ClusterState:
    """The state directory: `run/*.json` pid files, `logs/*.log`, and each server's data."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = settings.state_dir.resolve()
        self.table = ProcessTable(self.dir / "run")
        self.logs = self.dir / "logs"

    def make_private(self, group_id: int | None = None) -> None:
        """No other user may read the state (logs hold document text; cluster.env, pid files and keys
        are secrets): the state dir and run/ are 0700, or 0710 with `group_id` (the group of the
        Postgres system user) so that Postgres reaches its data dir and its socket dir in run/, each
        private to it; logs/ is 0700 whatever runs."""
        for path in (self.dir, self.table.run_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
            shared = group_id is not None and path != self.logs
            if shared:
                os.chown(path, -1, group_id)
            path.chmod(0o710 if shared else 0o700)

    def private_dir(self, name: str) -> Path:
        """A folder of the state dir (a server's data) that only its owner can enter."""
        path = self.dir / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        return path

    def process_env(self, env: dict[str, str]) -> dict[str, str]:
        """The environment of a process we start that reads the cluster's settings (workers, dashboard)."""
        return {**os.environ, **env, "M2IO_STATE_DIR": str(self.dir), "HF_HUB_OFFLINE": "1"}

    def row(self, name: str, probe: Callable[[], tuple[str, str]]) -> Health:
        """The `m2io ps` row of a process started here: `probe` asks it only when its pid still runs."""
        record = self.table.get(name)
        if record is None:
            return Health(name, None, None, "absent", "not started")
        if not record.is_alive():
            return Health(name, record.pid, record.port, "dead", f"process gone; log: {record.log}")
        state, detail = probe()
        return Health(name, record.pid, record.port, state, detail)


class Server:
    """A server of the local cluster (or a group of processes, as the workers), each process with its
    pid file under `run/`, named as in `m2io ps`."""

    name = ""
    stop_signal = signal.SIGTERM  # what `m2io down` sends it

    def __init__(self, state: ClusterState):
        self.state = state

    def names(self) -> list[str]:
        """Its pid files, whether it runs here or not (`m2io down` stops whatever they name)."""
        return [self.name]

    def managed_names(self) -> list[str]:
        """The processes this cluster starts: none for a server the environment configures."""
        return self.names()

    def runs(self, running: dict[str, ProcessRecord], env: dict[str, str]) -> bool:
        """Nothing for `up` to start: every process of it runs (`running`: the live ones)."""
        return all(name in running for name in self.managed_names())

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        """Start it unless it runs (or answers) already; the M2IO_* settings that reach it."""
        raise NotImplementedError

    def probe(self, env: dict[str, str]) -> list[Health]:
        """Its rows of `m2io ps`; `env` is the cluster's (cluster.env)."""
        raise NotImplementedError
