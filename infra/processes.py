"""Detached processes recorded in pid files, robust to crashes and pid reuse.

A pid file is JSON: pid, the process's create time, port, argv, log. A process counts as ours only
when a live process has that pid *and* that create time, so a pid reused after a crash (or a pid
file left by a `kill -9`) is recognised as stale and cleaned up, never signalled.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

CREATE_TIME_TOLERANCE_S = 2.0


class PortTaken(RuntimeError):
    pass


@dataclass
class ProcessRecord:
    name: str
    pid: int
    create_time: float
    argv: list[str]
    log: str
    port: int | None = None
    extra: dict = field(default_factory=dict)
    # Its start in clock ticks since boot (Linux): unlike create_time, it does not move when the clock is adjusted.
    start_ticks: int | None = None

    def is_alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            # psutil's create_time is the boot time plus the process's start ticks, and the kernel's
            # boot time (/proc/stat btime) moves as the clock is adjusted: on a VM it drifted by more
            # than 0.05 s within an hour, and `m2io down` took live servers for stale pid files. Linux
            # hands out pids in increasing order, so another process with this pid started within
            # CREATE_TIME_TOLERANCE_S of the recorded one is not a risk.
            # After a fresh boot the clock was stepped by more than 2 s within minutes, and `m2io down` removed the
            # pid files of a live cluster and left it running: where the start ticks are known, they decide.
            ticks = start_ticks(self.pid) if self.start_ticks is not None else None
            if ticks is not None:
                same = ticks == self.start_ticks
            else:
                same = abs(process.create_time() - self.create_time) < CREATE_TIME_TOLERANCE_S
            return same and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None without /proc.

    >>> start_ticks(os.getpid()) == start_ticks(os.getpid()) and start_ticks(os.getpid()) > 0
    True
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return int(fields[19])


class ProcessTable:
    """One pid file per managed process under `run_dir`."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def get(self, name: str) -> ProcessRecord | None:
        path = self.path(name)
        if not path.exists():
            return None
        try:
            return ProcessRecord(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            # A pid file cut short by a crash: nothing to signal, so treat it as stale.
            path.rename(path.with_suffix(f".corrupt-{int(time.time())}"))
            # stderr: stdout may be machine-read (`m2io ps --json`).
            print(f"warning: moved aside unreadable pid file {path}: {error}", file=sys.stderr)
            return None

    def put(self, record: ProcessRecord) -> None:
        tmp = self.path(record.name).with_suffix(".tmp")
        write_private(tmp, json.dumps(asdict(record)))
        tmp.replace(self.path(record.name))

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def records(self) -> list[ProcessRecord]:
        names = sorted(p.stem for p in self.run_dir.glob("*.json"))
        return [record for name in names if (record := self.get(name)) is not None]

    def live(self, name: str) -> ProcessRecord | None:
        """The record if its process runs; a stale record (crash, kill -9) is removed."""
        record = self.get(name)
        if record is None:
            return None
        if record.is_alive():
            return record
        self.remove(name)
        return None


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (mode 0600 from its creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as file:
        file.write(text)


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the source ports of outgoing connections (Linux's default otherwise)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on the port now. Probed with SO_REUSEADDR, as redis-server,
    Postgres and SeaweedFS (Go) bind: a connection in TIME_WAIT on the port does not hold it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def who_listens(port: int) -> str:
    """A short description of the process holding a TCP port, when the OS tells us."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.NoSuchProcess:
                    return f"pid {conn.pid}"
    except psutil.AccessDenied:
        pass
    return "another process"


def require_free_ports(ports: dict[str, int], setting_hint: str) -> None:
    taken = {label: port for label, port in ports.items() if not port_is_free(port)}
    if taken:
        details = ", ".join(f"{label} port {port} is held by {who_listens(port)}" for label, port in taken.items())
        raise PortTaken(f"cannot start: {details}. Stop that process or choose other ports ({setting_hint}).")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(size: int, attempts: int = 500) -> int:
    """A base port such that base .. base+size-1 are free, below the ephemeral range: there the
    source port of some outgoing connection cannot take one of them before the server binds it."""
    low, _ = ephemeral_port_range()
    candidates = range(20000, low - size) if low > 21000 + size else range(10000, 65535 - size)
    for _ in range(attempts):
        base = random.choice(candidates)
        if all(port_is_free(port) for port in range(base, base + size)):
            return base
    raise PortTaken(f"no {size} consecutive free ports below {low}")


def ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


def run_as(user: str | None) -> dict:
    """Popen arguments that run a process as `user`, with that user's own group and no other (so that
    it gets what the group may, like traversing a state dir of mode 0710, and nothing of ours)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def spawn(
    table: ProcessTable,
    name: str,
    argv: list[str],
    log: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    extra: dict | None = None,
) -> ProcessRecord:
    """Start a process detached from us (own session), log to `log`, and record its pid file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # Logs hold document text and errors: readable by their owner only.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log_file:
        log_file.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(argv)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            **run_as(user),
        )
    record = ProcessRecord(
        name=name,
        pid=process.pid,
        create_time=psutil.Process(process.pid).create_time(),
        start_ticks=start_ticks(process.pid),
        argv=argv,
        log=str(log),
        port=port,
        extra=extra or {},
    )
    table.put(record)
    return record


def stop(table: ProcessTable, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> str:
    """Signal the process and its children, wait, then SIGKILL what is left. Returns what happened."""
    record = table.get(name)
    if record is None:
        return "not running"
    if not record.is_alive():
        table.remove(name)
        return "was not running (stale pid file removed)"
    process = psutil.Process(record.pid)
    children = process.children(recursive=True)
    os.kill(record.pid, sig)
    _, alive = psutil.wait_procs([process], timeout=timeout)
    outcome = "stopped"
    if alive:
        for proc in [process, *children]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        outcome = f"killed after {timeout:.0f}s"
    # Children that outlive their parent (prefork pool processes) go too.
    for child in children:
        try:
            child.wait(timeout=5)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    table.remove(name)
    return outcome


def tail(path: str | Path, lines: int = 20) -> str:
    try:
        content = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(content[-lines:])
