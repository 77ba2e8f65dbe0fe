"""The local cluster without Docker (`m2io up`, `m2io ps`, `m2io down`) with real processes: an
embedded PostgreSQL, a local Redis, SeaweedFS and the five Celery workers, started by the CLI in a
subprocess, killed with SIGKILL, fed stale pid files and a taken port, and recovered by `m2io up`.

Every process runs on free ports from a temporary state dir, so a cluster the developer already runs
is never touched. The tests share one cluster and run in file order; teardown stops it with
`m2io down` and then SIGKILLs whatever a pid file (or an earlier `ps`) named that still runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from infra.processes import CREATE_TIME_TOLERANCE_S, ProcessRecord, start_ticks

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = [f"worker-{stage}" for stage in ("retriever", "generator", "inserter", "merger", "trainer")]
SERVERS = ["postgres", "redis", "s3"]
EVERYTHING = SERVERS + WORKERS
# What `ps` says of each when it is up: a worker is `ready` once its processes loaded their models.
UP_STATE = {**dict.fromkeys(SERVERS, "healthy"), **dict.fromkeys(WORKERS, "ready")}
S3_PORT_SPAN = 15  # SeaweedFS uses the S3 port and +1..+4, +10..+14

UP = ("up", "--no-dashboard", "--concurrency", "1")
SMOKE = ("smoke", "--no-start", "--timeout", "60")


# --- ports ----------------------------------------------------------------------------------------


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports() -> tuple[int, int, int]:
    """Postgres and Redis ports from the kernel (bind to port 0), and an S3 base port whose whole
    span is free. The span is taken below the ephemeral range, so that the source port of some
    outgoing connection cannot land in it between this check and SeaweedFS binding it."""
    sockets = []
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        postgres_port, redis_port = (sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    from infra.processes import ephemeral_port_range

    low, _ = ephemeral_port_range()
    candidates = range(20000, low - S3_PORT_SPAN) if low > 21000 else range(10000, 65535 - S3_PORT_SPAN)
    for _ in range(500):
        base = random.choice(candidates)
        span = range(base, base + S3_PORT_SPAN)
        if postgres_port in span or redis_port in span:
            continue
        if all(_is_free(port) for port in span):
            return postgres_port, redis_port, base
    raise AssertionError("found no 15 consecutive free ports for SeaweedFS")


# --- the cluster under test -----------------------------------------------------------------------


@dataclass
class Cluster:
    state_dir: Path
    env: dict[str, str]
    postgres_port: int
    redis_port: int
    s3_port: int
    # (pid, create time) of every process a pid file ever named: what the safety net may kill.
    seen: set[tuple[int, float]] = field(default_factory=set)

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    def m2io(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.remember()
        return result

    def remember(self) -> None:
        for record in self.pid_files().values():
            if isinstance(record.get("pid"), int) and isinstance(record.get("create_time"), float):
                self.seen.add((record["pid"], record["create_time"]))

    def pid_files(self) -> dict[str, dict]:
        records = {}
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                records[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return records

    def record(self, name: str) -> dict:
        return json.loads((self.run_dir / f"{name}.json").read_text())

    def ps(self) -> tuple[int, dict[str, dict]]:
        result = self.m2io("ps", "--json", timeout=60)
        assert result.returncode in (0, 1), f"ps crashed:\n{result.stdout}\n{result.stderr}"
        try:
            rows = json.loads(result.stdout)
        except ValueError as error:
            raise AssertionError(f"ps --json printed no JSON:\n{result.stdout}\n{result.stderr}") from error
        return result.returncode, {row["name"]: row for row in rows}

    def wait_until_healthy(self, timeout: float = 120) -> dict[str, dict]:
        """Poll `ps --json` until postgres, redis, s3 are healthy and every worker is ready (workers need
        a few seconds before they answer ping, and more to load their models)."""
        deadline = time.monotonic() + timeout
        while True:
            code, rows = self.ps()
            if code == 0 and all(rows.get(name, {}).get("state") == UP_STATE[name] for name in EVERYTHING):
                return rows
            if time.monotonic() > deadline:
                states = {name: (row["state"], row["detail"]) for name, row in rows.items()}
                raise AssertionError(f"cluster not healthy after {timeout:.0f}s (ps exit {code}): {states}")
            time.sleep(0.5)

    def pids(self, rows: dict[str, dict]) -> dict[str, int]:
        return {name: rows[name]["pid"] for name in EVERYTHING}

    def live_pid_file_processes(self) -> list[str]:
        return [f"{name} (pid {rec['pid']})" for name, rec in self.pid_files().items() if _alive(rec)]

    def log_tails(self) -> str:
        parts = []
        for log in sorted((self.state_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _process(pid: int, create_time: float | None) -> psutil.Process | None:
    """The process, if it runs and (when given) was created at `create_time` (else the pid is reused)."""
    try:
        process = psutil.Process(pid)
        if create_time is not None and abs(process.create_time() - create_time) >= CREATE_TIME_TOLERANCE_S:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def _alive(record: dict) -> bool:
    return _process(record["pid"], record["create_time"]) is not None


def kill_tree(
    pid: int, create_time: float | None, *, children: bool = True, strict: bool = True
) -> list[psutil.Process]:
    """SIGKILL the process (and its children) and wait for them to be gone."""
    process = _process(pid, create_time)
    if process is None:
        return []
    try:
        victims = [process, *(process.children(recursive=True) if children else [])]
    except psutil.NoSuchProcess:
        return []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(victims, timeout=15)
    assert not alive or not strict, f"still alive after SIGKILL: {alive}"
    return victims


def _cluster_env(state_dir: Path, postgres_port: int, redis_port: int, s3_port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("M2IO_")}
    env.update(
        {
            "M2IO_STATE_DIR": str(state_dir),
            "M2IO_LOCAL_POSTGRES_PORT": str(postgres_port),
            "M2IO_LOCAL_REDIS_PORT": str(redis_port),
            "M2IO_LOCAL_S3_PORT": str(s3_port),
            # Nothing answers there yet, so `up` starts its own Redis on that port.
            "M2IO_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "250",  # rich wraps messages at the terminal width
        }
    )
    return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is private, and postgres runs as another user.
    state_dir = Path(tempfile.mkdtemp(prefix="m2io-test-cluster-", dir="/tmp"))
    state_dir.chmod(0o755)
    ports = pick_ports()
    the_cluster = Cluster(state_dir, _cluster_env(state_dir, *ports), *ports)
    try:
        yield the_cluster
    finally:
        try:
            the_cluster.m2io("down", timeout=240)
        finally:
            # Safety net: nothing started by these tests may outlive them.
            the_cluster.remember()
            for pid, create_time in the_cluster.seen:
                kill_tree(pid, create_time, strict=False)
            shutil.rmtree(state_dir, ignore_errors=True)


def assert_ok(result: subprocess.CompletedProcess[str], cluster: Cluster | None = None) -> None:
    if result.returncode != 0:
        logs = cluster.log_tails() if cluster else ""
        raise AssertionError(
            f"{result.args[3:]} exited {result.returncode}\n--- stdout\n{result.stdout}\n"
            f"--- stderr\n{result.stderr}\n{logs}"
        )


# --- the tests ------------------------------------------------------------------------------------


def test_help_of_every_command() -> None:
    commands = [
        [],
        ["up"],
        ["ps"],
        ["down"],
        ["migrate"],
        ["migrate", "upgrade"],
        ["migrate", "downgrade"],
        ["migrate", "current"],
        ["worker"],
        ["smoke"],
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith("M2IO_")}
    env["COLUMNS"] = "200"
    script = Path(sys.executable).with_name("m2io")
    assert script.exists(), f"console script {script} missing: pip install -e ."
    for command in commands:
        result = subprocess.run(
            [str(script), *command, "--help"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"m2io {' '.join(command)} --help: {result.stderr}"
        assert "Usage:" in result.stdout, result.stdout
        assert f"m2io {' '.join(command)}".strip() in " ".join(result.stdout.split()), result.stdout


@pytest.mark.unit
def test_one_class_per_server_in_start_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.cluster import LocalCluster
    from services.common.settings import Settings

    for key in ("M2IO_DATABASE_URL", "M2IO_S3_ENDPOINT"):  # set when the test servers run
        monkeypatch.delenv(key, raising=False)
    cluster = LocalCluster(Settings(state_dir=tmp_path), start_dashboard=False)
    assert [server.name for server in cluster.servers] == SERVERS
    assert cluster.managed_names() == EVERYTHING
    assert cluster.worker_names() == WORKERS
    # `down` sends each its own signal: SIGINT is Postgres's fast shutdown, the rest get SIGTERM.
    assert [server.stop_signal for server in cluster.servers + cluster.clients] == [
        signal.SIGINT,
        *[signal.SIGTERM] * 4,
    ]
    assert LocalCluster(Settings(state_dir=tmp_path)).managed_names()[-1:] == ["dashboard"]

    # A server the environment configures is external: used, never started here.
    monkeypatch.setenv("M2IO_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/m2io")
    monkeypatch.setenv("M2IO_S3_ENDPOINT", "127.0.0.1:2")
    external = LocalCluster(Settings(state_dir=tmp_path), start_dashboard=False)
    assert external.managed_names() == ["redis", *WORKERS]
    assert [row.state for row in external.s3.probe({})] == ["external"]


@pytest.mark.slow
def test_up_starts_everything(cluster: Cluster) -> None:
    result = cluster.m2io(*UP)
    assert_ok(result, cluster)
    rows = cluster.wait_until_healthy()
    # Sized from the cores (infra/sizing.py), `--concurrency 1` given: one process per stage, torch 1 thread.
    assert "1 process(es), torch threads 1" in result.stdout, result.stdout
    assert "1/1 processes warm, warm-up" in rows["worker-retriever"]["detail"], rows["worker-retriever"]
    for name in EVERYTHING:
        assert isinstance(rows[name]["pid"], int), rows[name]
        assert _process(rows[name]["pid"], cluster.record(name)["create_time"]), f"{name} does not run"
    assert rows["postgres"]["port"] == cluster.postgres_port
    assert rows["redis"]["port"] == cluster.redis_port
    assert rows["s3"]["port"] == cluster.s3_port
    assert "pgvector" in rows["postgres"]["detail"]
    env_file = cluster.state_dir / "cluster.env"
    assert env_file.stat().st_mode & 0o077 == 0, "cluster.env holds secrets: it must be private"
    # The local Redis's URL, with the password `up` generated for it (issue 17).
    redis_url = rf"M2IO_REDIS_URL=redis://:[0-9a-f]{{32}}@127\.0\.0\.1:{cluster.redis_port}/0"
    assert re.search(redis_url, env_file.read_text())


@pytest.mark.slow
def test_up_again_changes_nothing(cluster: Cluster) -> None:
    before = cluster.pids(cluster.wait_until_healthy())
    result = cluster.m2io(*UP)
    assert_ok(result, cluster)
    assert "already runs" in " ".join(result.stdout.split()), result.stdout
    _, rows = cluster.ps()
    assert cluster.pids(rows) == before


@pytest.mark.slow
def test_smoke_passes(cluster: Cluster) -> None:
    assert_ok(cluster.m2io(*SMOKE), cluster)


@pytest.mark.slow
def test_killed_worker_is_dead_then_restarted_alone(cluster: Cluster) -> None:
    before = cluster.pids(cluster.wait_until_healthy())
    record = cluster.record("worker-merger")
    assert kill_tree(record["pid"], record["create_time"]), "worker-merger did not run"

    code, rows = cluster.ps()
    assert code == 1
    assert rows["worker-merger"]["state"] == "dead", rows["worker-merger"]
    assert rows["worker-merger"]["pid"] == record["pid"]
    assert all(rows[name]["state"] == UP_STATE[name] for name in EVERYTHING if name != "worker-merger"), rows

    assert_ok(cluster.m2io(*UP), cluster)
    after = cluster.pids(cluster.wait_until_healthy())
    assert after["worker-merger"] != before["worker-merger"]
    assert {n: p for n, p in after.items() if n != "worker-merger"} == {
        n: p for n, p in before.items() if n != "worker-merger"
    }
    assert_ok(cluster.m2io(*SMOKE), cluster)


@pytest.mark.slow
def test_killed_postgres_is_dead_then_recovered(cluster: Cluster) -> None:
    before = cluster.pids(cluster.wait_until_healthy())
    record = cluster.record("postgres")
    # Only the postmaster, as a crash or the OOM killer would: its children exit on their own.
    assert kill_tree(record["pid"], record["create_time"], children=False)

    code, rows = cluster.ps()
    assert code == 1
    assert rows["postgres"]["state"] == "dead", rows["postgres"]

    assert_ok(cluster.m2io(*UP), cluster)
    after = cluster.pids(cluster.wait_until_healthy())
    assert after["postgres"] != before["postgres"]
    assert {n: p for n, p in after.items() if n != "postgres"} == {n: p for n, p in before.items() if n != "postgres"}

    # Again, with `up` at once (as a supervisor would): the killed postmaster may not be reaped yet,
    # and a new postmaster refuses to start while postmaster.pid names a pid that still exists.
    record = cluster.record("postgres")
    assert _process(record["pid"], record["create_time"])
    os.kill(record["pid"], signal.SIGKILL)
    assert_ok(cluster.m2io(*UP), cluster)
    again = cluster.pids(cluster.wait_until_healthy())
    assert again["postgres"] != after["postgres"]
    assert {n: p for n, p in again.items() if n != "postgres"} == {n: p for n, p in before.items() if n != "postgres"}
    # The workers' pooled connections died with the server; pool_pre_ping replaces them.
    assert_ok(cluster.m2io(*SMOKE), cluster)


@pytest.mark.slow
def test_stale_pid_files_are_dead_and_recovered(cluster: Cluster) -> None:
    before = cluster.pids(cluster.wait_until_healthy())
    stale = ["worker-trainer", "worker-generator", "worker-inserter", "redis"]
    for name in stale:  # stop the real ones first, so that none is left running untracked
        record = cluster.record(name)
        assert kill_tree(record["pid"], record["create_time"])
    # The local Redis killed with -9 keeps its pid file as it was: stale, with the dead pid.
    redis_pid = cluster.record("redis")["pid"]

    # A pid that no longer runs (a process we started and reaped), with a wrong create time.
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    record = cluster.record("worker-trainer")
    (cluster.run_dir / "worker-trainer.json").write_text(
        json.dumps({**record, "pid": finished.pid, "create_time": time.time() - 12345.0})
    )
    # A reused pid: a live process (this test) that is not the worker; it must never be signalled.
    record = cluster.record("worker-generator")
    (cluster.run_dir / "worker-generator.json").write_text(
        json.dumps({**record, "pid": os.getpid(), "create_time": psutil.Process().create_time() - 100.0})
    )
    # A pid file cut short by a crash in the middle of writing it.
    (cluster.run_dir / "worker-inserter.json").write_text('{"name": "worker-inserter", "pid": 12')

    code, rows = cluster.ps()
    assert code == 1
    assert rows["worker-trainer"]["state"] == "dead", rows["worker-trainer"]
    assert rows["worker-generator"]["state"] == "dead", rows["worker-generator"]
    assert rows["worker-inserter"]["state"] in ("dead", "absent"), rows["worker-inserter"]
    assert rows["redis"]["state"] == "dead", rows["redis"]
    assert rows["redis"]["pid"] == redis_pid

    assert_ok(cluster.m2io(*UP), cluster)
    # Healthy includes the two workers left running: they reconnected to the new Redis.
    after = cluster.pids(cluster.wait_until_healthy())
    for name in stale:
        assert after[name] not in (before[name], finished.pid, os.getpid()), (name, after[name])
    assert {n: p for n, p in after.items() if n not in stale} == {n: p for n, p in before.items() if n not in stale}


@pytest.mark.slow
def test_port_taken_is_refused_with_a_clear_message(cluster: Cluster) -> None:
    pids = {name: rec for name, rec in cluster.pid_files().items()}
    assert_ok(cluster.m2io("down", timeout=240), cluster)
    code, rows = cluster.ps()
    states = {name: (row["state"], row["detail"]) for name, row in rows.items()}
    assert all(state in ("absent", "external") for state, _ in states.values()), states
    assert code == 0, states
    assert not [name for name, rec in pids.items() if _alive(rec)], "processes survived `down`"
    assert not cluster.live_pid_file_processes()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # SO_REUSEADDR: connections closed by `down` may leave the port in TIME_WAIT for a while.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", cluster.postgres_port))
        squatter.listen()
        result = cluster.m2io(*UP)
        assert result.returncode != 0, result.stdout
        message = " ".join((result.stdout + result.stderr).split())
        assert f"postgres port {cluster.postgres_port} is held by" in message, message
        assert f"pid {os.getpid()}" in message, message
    assert not cluster.live_pid_file_processes(), "a failed `up` left processes running"


@pytest.mark.slow
def test_down_stops_everything(cluster: Cluster) -> None:
    assert_ok(cluster.m2io(*UP), cluster)
    records = cluster.pid_files()
    assert set(EVERYTHING) <= set(records), sorted(records)
    assert all(_alive(record) for record in records.values())

    result = cluster.m2io("down", timeout=240)
    assert_ok(result, cluster)
    still = [f"{name} (pid {rec['pid']})" for name, rec in records.items() if _alive(rec)]
    assert not still, f"still running after `down`: {still}"
    assert not cluster.pid_files(), "down left pid files behind"

    again = cluster.m2io("down")
    assert_ok(again, cluster)
    assert "nothing runs" in again.stdout, again.stdout


@pytest.mark.unit
def test_a_pid_record_survives_boot_time_drift():
    """The kernel's boot time moves with clock adjustments, and psutil's create_time with it: a record
    of a live process read back half a second off is still that process; one whose recorded start
    is a minute away is another process that reused the pid."""
    me = psutil.Process()
    started, argv = me.create_time(), me.cmdline()
    assert ProcessRecord("me", me.pid, started + 0.5, argv, log="-").is_alive()
    assert ProcessRecord("me", me.pid, started - 0.5, argv, log="-").is_alive()
    assert not ProcessRecord("me", me.pid, started - 60, argv, log="-").is_alive()


@pytest.mark.unit
def test_a_pid_record_with_start_ticks_survives_a_clock_step():
    """A record with the process's start ticks since boot is that process whatever the wall clock did since
    (a fresh VM's clock was stepped by more than 2 s, and `m2io down` left a live cluster running); a record
    whose ticks differ is another process that reused the pid, even with the create time right."""
    me = psutil.Process()
    started, argv = me.create_time(), me.cmdline()
    ticks = start_ticks(me.pid)
    assert ticks is not None
    assert ProcessRecord("me", me.pid, started - 60, argv, log="-", start_ticks=ticks).is_alive()
    assert not ProcessRecord("me", me.pid, started, argv, log="-", start_ticks=ticks + 1).is_alive()
    assert ProcessRecord("me", me.pid, started, argv, log="-").is_alive()  # a record written before: create time
