"""Session fixtures: real PostgreSQL+pgvector, Redis and S3 (SeaweedFS) on free ports, and real Celery
worker processes. Nothing here is mocked; the servers are the ones `m2io up` starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
for key in [k for k in os.environ if k.startswith("M2IO_")]:
    del os.environ[key]  # a developer's own cluster must not leak into the tests

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port_block(size: int) -> int:
    """A base port such that base .. base+size-1 are free (SeaweedFS needs a block), below the
    ephemeral range, where an outgoing connection's source port cannot take one meanwhile."""
    from infra.processes import free_port_block as below_ephemeral_range

    return below_ephemeral_range(size)


@dataclass
class Servers:
    state_dir: Path
    env: dict[str, str]  # M2IO_* variables that point a process at these servers
    cluster: object = None

    @property
    def database_url(self) -> str:
        return self.env["M2IO_DATABASE_URL"]


@pytest.fixture(autouse=True)
def _servers_unless_unit(request: pytest.FixtureRequest) -> None:
    """Every test but a `unit` one gets the servers before it runs (and the environment pointing at
    them, before anything configures Celery); `pytest -m unit` starts none and runs in seconds."""
    if request.node.get_closest_marker("unit") is None:
        request.getfixturevalue("servers")


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    from infra.cluster import LocalCluster
    from infra.processes import free_port
    from services.common.settings import Settings, get_settings

    # Postgres runs as an unprivileged user when we are root: its data dir must be reachable, so the
    # state dir is not under pytest's own temp root, which every pytest session (a developer's second
    # one too) resets to mode 0700: that cut a running suite's Postgres off its data dir.
    state_dir = Path(tempfile.mkdtemp(prefix="m2io-test-state-"))
    state_dir.chmod(0o755)
    redis_port = free_port()
    settings = Settings(
        state_dir=state_dir,
        local_postgres_port=free_port(),
        local_redis_port=redis_port,
        redis_url=f"redis://127.0.0.1:{redis_port}/0",  # nothing answers there: a Redis of our own
        local_s3_port=free_port_block(15),
        s3_bucket="m2io-test",
    )
    cluster = LocalCluster(settings, start_dashboard=False)
    env = cluster.ensure_servers({}, print)
    cluster.migrate(env, print)
    env["M2IO_STATE_DIR"] = str(state_dir)
    os.environ.update(env)
    get_settings.cache_clear()
    point_celery_at_these_servers()
    try:
        yield Servers(state_dir=state_dir, env=env, cluster=cluster)
    finally:
        cluster.down(echo=print)
        shutil.rmtree(state_dir, ignore_errors=True)


def point_celery_at_these_servers() -> None:
    """A unit test that ran first may have configured this process's Celery app from the settings of
    then (no servers yet): configure it again from these, and drop the connection pools it made for the
    old broker (Celery's own reset after a fork), or pings and sends would go to a Redis nobody reads."""
    from services.common.celery_app import app, configure

    if app.configured:
        configure(app)
        app._after_fork()


@dataclass
class WorkerProcess:
    stage: str
    process: subprocess.Popen
    log: Path
    name: str = ""

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def kill_all(self) -> None:
        """SIGKILL the worker and its pool processes at once, as when its container dies."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@dataclass
class Workers:
    servers: Servers
    base_env: dict[str, str]
    started: list[WorkerProcess] = field(default_factory=list)
    count: int = 0

    def start(
        self, stage: str, *, concurrency: int = 1, extra_env: dict[str, str] | None = None, wait: bool = True
    ) -> WorkerProcess:
        self.count += 1
        name = f"{stage}-{self.count}@test"
        log = self.servers.state_dir / "logs" / f"test-worker-{stage}-{self.count}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.base_env, **(extra_env or {})}
        from services.common.celery_app import worker_argv

        argv = worker_argv(stage, name, concurrency) + ["--without-mingle", "--without-gossip"]
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(stage=stage, process=process, log=log, name=name)
        self.started.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: WorkerProcess, timeout: float = 60.0, warm_timeout: float = 180.0) -> None:
        """Until the worker answers ping and every process of it has loaded its models (ready, as `m2io ps`
        says): a test's first task then runs at once, not after a model load on a busy machine."""
        from services.common.celery_app import app
        from services.common.health import worker_warmth
        from services.common.settings import get_settings

        deadline = time.monotonic() + timeout
        while True:
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited: {worker.log.read_text()[-3000:]}")
            replies = app.control.ping(destination=[worker.name], timeout=0.5) or []
            if any(worker.name in reply for reply in replies):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker.name} did not answer ping in {timeout}s: {worker.log.read_text()[-3000:]}")
        deadline = time.monotonic() + warm_timeout
        while True:
            found = (worker_warmth(get_settings().redis_url) or {}).get(worker.name)
            if found is not None and found.state in ("ready", "failed"):
                return
            if worker.process.poll() is not None or time.monotonic() > deadline:
                log = worker.log.read_text()[-3000:]
                raise RuntimeError(f"{worker.name} not warm after {warm_timeout}s ({found}): {log}")
            time.sleep(0.1)

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGTERM)
        for worker in self.started:
            try:
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(timeout=10)
        self.started.clear()


# Short timeouts so a message of a killed worker comes back within seconds, not minutes.
FAST_REDELIVERY = {"M2IO_VISIBILITY_TIMEOUT_S": "5", "M2IO_UNACKED_RESTORE_INTERVAL_S": "1"}


@pytest.fixture
def workers(servers: Servers) -> Iterator[Workers]:
    base_env = {**os.environ, **servers.env, **FAST_REDELIVERY}
    pool = Workers(servers=servers, base_env=base_env)
    try:
        yield pool
    finally:
        pool.stop_all()
        purge_queues()


def purge_queues() -> None:
    """Drop what a test left queued, so the next test's workers start from empty queues."""
    import redis

    from services.common.queues import Stage
    from services.common.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    client.delete(*[stage.queue for stage in Stage], "unacked", "unacked_index")
