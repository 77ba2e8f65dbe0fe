"""The local cluster without Docker: `m2io up`, `m2io ps`, `m2io down`.

Everything lives in one state directory (default `./.m2io`):
  cluster.env   URLs and generated secrets (mode 0600), read by every m2io process
  run/*.json    pid files           logs/*.log   one log per process
  postgres/     data of the embedded PostgreSQL + pgvector
  redis/ s3/    data of the local Redis and SeaweedFS, when those are started here

Each server is a class of its own in `infra.servers` (`ensure`: start it unless it runs, and the
M2IO_* settings that reach it; `probe`: its health); `LocalCluster` loops over them.
"""

from __future__ import annotations

import fcntl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infra.processes import ProcessRecord, stop, write_private
from infra.servers.base import ClusterError, ClusterState, Echo, Health, Server
from infra.servers.clients import Dashboard, Workers
from infra.servers.postgres import Postgres
from infra.servers.redis import Redis
from infra.servers.s3 import S3
from infra.sizing import WorkerPlan, machine_cores, plan_workers
from services.common.queues import PIPELINE, Stage
from services.common.settings import CLUSTER_ENV_FILE, Settings

__all__ = ["ClusterError", "Health", "LocalCluster"]


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_private(tmp, "# written by `m2io up`; holds secrets\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    tmp.replace(path)


class LocalCluster:
    def __init__(self, settings: Settings, *, worker_concurrency: int | None = None, start_dashboard: bool = True):
        """`worker_concurrency`: processes of every answer stage's worker; None: M2IO_WORKER_CONCURRENCY, else
        `plan` (from the machine's cores, infra/sizing.py)."""
        self.settings = settings
        self.state = ClusterState(settings)
        self.state_dir = self.state.dir
        self.table = self.state.table
        self.env_file = self.state_dir / CLUSTER_ENV_FILE
        self.worker_concurrency = worker_concurrency or settings.worker_concurrency
        self.plan: WorkerPlan = plan_workers(machine_cores())
        self.postgres = Postgres(self.state)
        self.redis = Redis(self.state)
        self.s3 = S3(self.state)
        # Late-bound: bench/job_load.py replaces `worker_argv` to give stages their own process counts.
        self.workers = Workers(self.state, lambda stage: self.worker_argv(stage), self.plan.torch_threads)
        self.dashboard = Dashboard(self.state, start=start_dashboard)
        # In the order `up` starts them; `down` stops the clients first, then the servers backwards.
        self.servers: list[Server] = [self.postgres, self.redis, self.s3]
        self.clients: list[Server] = [self.workers, self.dashboard]

    # ---------------------------------------------------------------- state
    def cluster_env(self) -> dict[str, str]:
        return read_env_file(self.env_file)

    def managed_names(self) -> list[str]:
        return [name for server in self.servers + self.clients for name in server.managed_names()]

    def running(self) -> dict[str, ProcessRecord]:
        """Live processes; stale pid files (after a crash or kill -9) are removed on the way."""
        return {name: record for name in self.managed_names() if (record := self.table.live(name))}

    # ---------------------------------------------------------------- up
    def up(self, echo: Echo = print) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_dir / "up.lock"
        with open(lock_path, "w") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise ClusterError(f"another `m2io up` is running on {self.state_dir}") from error
            return self._up_locked(echo)

    def _up_locked(self, echo: Echo) -> str:
        running = self.running()
        env = self.cluster_env()
        if all(server.runs(running, env) for server in self.servers + self.clients):
            echo(f"the local cluster already runs (state in {self.state_dir}); `m2io ps` shows it")
            return "already running"
        self.ensure_servers(env, echo)
        write_env_file(self.env_file, env)
        self.migrate(env, echo)
        for client in self.clients:
            client.ensure(env, echo)
        return "started"

    def ensure_servers(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        """Postgres, Redis and S3, each started unless it runs (or answers); `env` gains their settings."""
        self.state.make_private(self.postgres.system_group())
        for server in self.servers:
            env.update(server.ensure(env, echo))
        return env

    def migrate(self, env: dict[str, str], echo: Echo) -> None:
        from infra.migrate import upgrade

        url = self.postgres.external or env["M2IO_DATABASE_URL"]
        revision = upgrade(url)
        echo(f"migrations: database at revision {revision}")

    def worker_argv(self, stage: Stage) -> list[str]:
        from services.common.celery_app import worker_argv

        return worker_argv(stage.queue, f"{stage.value}@%h", self.processes_of(stage))

    def processes_of(self, stage: Stage) -> int:
        """`worker_concurrency` is for the answer stages: the trainer keeps the plan's one process (a training
        run uses every core by itself)."""
        if self.worker_concurrency and stage in PIPELINE:
            return self.worker_concurrency
        return self.plan.processes[stage]

    # ---------------------------------------------------------------- kept for their callers
    def ensure_postgres(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        return self.postgres.ensure(env, echo)  # tests/test_job_faults.py

    def ensure_redis(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        return self.redis.ensure(env, echo)  # tests/test_job_faults.py

    def ensure_workers(self, env: dict[str, str], echo: Echo) -> None:
        self.workers.ensure(env, echo)  # bench/job_load.py

    def worker_names(self) -> list[str]:
        return self.workers.names()  # bench/job_load.py

    # ---------------------------------------------------------------- ps
    def ps(self) -> list[Health]:
        env = self.cluster_env()
        return [row for server in self.servers + self.clients for row in server.probe(env)]

    # ---------------------------------------------------------------- down
    def down(self, echo: Echo = print) -> None:
        """Stop the clients first (dashboard, workers: in parallel, they are independent), then the
        servers they use, one by one, the last started first."""
        clients = [name for client in reversed(self.clients) for name in client.names()]
        waves = [clients, *(server.names() for server in reversed(self.servers))]
        signals = {name: server.stop_signal for server in self.servers + self.clients for name in server.names()}
        stopped_any = False
        for wave in waves:
            running = [name for name in wave if self.table.get(name) is not None]
            if not running:
                continue
            with ThreadPoolExecutor(max_workers=len(running)) as pool:
                outcomes = list(pool.map(lambda name: stop(self.table, name, signals[name], timeout=30.0), running))
            for name, outcome in zip(running, outcomes, strict=True):
                echo(f"{name}: {outcome}")
            stopped_any = True
        if not stopped_any:
            echo(f"nothing runs from {self.state_dir}")
