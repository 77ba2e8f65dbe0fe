"""The clients of the servers: one Celery worker per stage, and the Streamlit dashboard."""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Callable

from infra.processes import require_free_ports, spawn
from infra.servers.base import REPO_ROOT, ClusterError, ClusterState, Echo, Health, Server
from infra.servers.redis import broker_url
from services.common.health import WorkerWarmth, online_workers, worker_warmth, workers_of
from services.common.queues import Stage
from services.common.settings import LOOPBACK_HOSTS

DASHBOARD_APP = REPO_ROOT / "dashboard" / "app.py"


class Workers(Server):
    """One worker per stage, `worker-<stage>`, consuming the stage's queue. `down` stops them with
    SIGTERM: a warm shutdown (they finish the task in hand; acks_late re-queues it if we must kill).
    Each gets `torch_threads` (M2IO_TORCH_THREADS) unless the environment or cluster.env sets it."""

    def __init__(self, state: ClusterState, argv: Callable[[Stage], list[str]], torch_threads: int | None = None):
        super().__init__(state)
        self.argv = argv  # a stage's worker command line
        self.torch_threads = torch_threads

    def process_env(self, env: dict[str, str]) -> dict[str, str]:
        process_env = self.state.process_env(env)
        if self.torch_threads and "M2IO_TORCH_THREADS" not in os.environ and "M2IO_TORCH_THREADS" not in env:
            process_env["M2IO_TORCH_THREADS"] = str(self.torch_threads)
        return process_env

    @staticmethod
    def name_of(stage: Stage) -> str:
        return f"worker-{stage.value}"

    def names(self) -> list[str]:
        return [self.name_of(stage) for stage in Stage]

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        for stage in Stage:
            name = self.name_of(stage)
            if self.state.table.live(name):
                continue
            argv, process_env = self.argv(stage), self.process_env(env)
            record = spawn(
                self.state.table,
                name,
                argv,
                self.state.logs / f"{name}.log",
                env=process_env,
                cwd=REPO_ROOT,
                extra={"queue": stage.queue},
            )
            processes = argv[argv.index("--concurrency") + 1] if "--concurrency" in argv else "?"
            threads = process_env.get("M2IO_TORCH_THREADS", "torch's default")
            echo(
                f"worker {stage.value}: started (pid {record.pid}, queue {stage.queue}, "
                f"{processes} process(es), torch threads {threads})"
            )
        return {}

    def probe(self, env: dict[str, str]) -> list[Health]:
        redis_url = broker_url(env, self.state.settings)
        online, error = online_workers(redis_url)
        if error:
            print(f"warning: cannot ping workers through {redis_url}: {error}", file=sys.stderr)
        warmth = worker_warmth(redis_url) or {}
        return [
            self.state.row(self.name_of(stage), lambda stage=stage: answers(stage, online, warmth)) for stage in Stage
        ]


def answers(stage: Stage, online: set[str], warmth: dict[str, WorkerWarmth]) -> tuple[str, str]:
    """`ready` once it answers ping and every process of it is warm (services/common/warmup.py); `warming`
    while they load their models, `starting` before (its heartbeat runs, no ping answer or record yet)."""
    answered = workers_of(stage, online)
    if not answered:
        if workers_of(stage, set(warmth)):
            return "starting", f"queue {stage.queue}; its heartbeat runs, no answer to ping yet"
        return "unhealthy", f"queue {stage.queue}; no answer to ping (starting, or stuck)"
    found = warmth.get(answered[0])
    if found is None:
        return "starting", f"queue {stage.queue}; answers ping as {answered[0]}, no warm-up record yet"
    state = "unhealthy" if found.state == "failed" else found.state
    return state, f"queue {stage.queue}; {answered[0]}: {found.state}, {found.describe()}"


class Dashboard(Server):
    name = "dashboard"

    def __init__(self, state: ClusterState, *, start: bool):
        super().__init__(state)
        self.start = start and DASHBOARD_APP.exists()

    def managed_names(self) -> list[str]:
        return self.names() if self.start else []

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        if not self.start or self.state.table.live("dashboard"):
            return {}
        settings = self.state.settings
        host, port = settings.dashboard_host, settings.dashboard_port
        if host not in LOOPBACK_HOSTS and settings.dashboard_password is None:
            raise ClusterError(
                f"the dashboard would listen on {host}, beyond this machine, without a password: "
                "set M2IO_DASHBOARD_PASSWORD, or M2IO_DASHBOARD_HOST=127.0.0.1"
            )
        require_free_ports({"dashboard": port}, "M2IO_DASHBOARD_PORT")
        argv = [sys.executable, "-m", "streamlit", "run", str(DASHBOARD_APP), "--server.address", host]
        argv += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
        log = self.state.logs / "dashboard.log"
        process_env = self.state.process_env(env)
        record = spawn(self.state.table, "dashboard", argv, log, port=port, env=process_env, cwd=REPO_ROOT)
        echo(f"dashboard: http://{self.reach_host()}:{port} (pid {record.pid})")
        return {}

    def reach_host(self) -> str:
        """Where this machine reaches the dashboard: its address, or loopback when it listens everywhere."""
        host = self.state.settings.dashboard_host
        return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host

    def probe(self, env: dict[str, str]) -> list[Health]:
        # Shown whenever the app exists: `up --no-dashboard` leaves it absent, not hidden.
        return [self.state.row("dashboard", self.answers)] if DASHBOARD_APP.exists() else []

    def answers(self) -> tuple[str, str]:
        url = f"http://{self.reach_host()}:{self.state.settings.dashboard_port}/_stcore/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return ("healthy", url) if response.status == 200 else ("unhealthy", f"HTTP {response.status}")
        except OSError as error:
            return "unhealthy", str(error)
