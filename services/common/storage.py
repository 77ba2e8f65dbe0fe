"""S3 storage through the `minio` client: content-addressed objects, bucket bootstrap, presigned URLs."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from minio import Minio
from minio.error import S3Error

from services.common.settings import Settings, get_settings

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket"})


class ObjectMissing(LookupError):
    """The key is not in the bucket (deleted, or never written)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(digest: str, prefix: str = "blobs") -> str:
    """`blobs/ab/cd/abcd...`: the two fan-out levels keep listings short in any S3 server."""
    return f"{prefix}/{digest[:2]}/{digest[2:4]}/{digest}"


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int
    created: bool  # False when the same bytes were already stored


class ObjectStore:
    def __init__(self, client: Minio, bucket: str):
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        endpoint, access_key, secret_key = settings.require_s3()
        client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        return cls(client, settings.s3_bucket)

    def ensure_bucket(self) -> bool:
        """Create the bucket if missing; True when it was created."""
        if self.client.bucket_exists(self.bucket):
            return False
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as error:
            # Another process created it between our check and our call.
            if error.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise
            return False
        return True

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as error:
            if error.code in NOT_FOUND_CODES:
                return False
            raise
        return True

    def put_content(
        self, data: bytes, content_type: str = "application/octet-stream", prefix: str = "blobs"
    ) -> StoredObject:
        """Store bytes under their sha256; storing the same bytes twice writes nothing."""
        digest = sha256_hex(data)
        key = content_key(digest, prefix)
        if self.exists(key):
            return StoredObject(key=key, sha256=digest, size=len(data), created=False)
        self.client.put_object(
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={"sha256": digest},
        )
        return StoredObject(key=key, sha256=digest, size=len(data), created=True)

    def put_named(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store bytes under a chosen key (answers, checkpoints), replacing what was there."""
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as error:
            if error.code in NOT_FOUND_CODES:
                raise ObjectMissing(f"s3://{self.bucket}/{key} does not exist") from error
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def keys_under(self, prefix: str) -> list[str]:
        return [obj.object_name for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def download_prefix(self, prefix: str, folder: Path) -> int:
        """Every object under `prefix` into `folder`, keeping the relative paths; returns how many."""
        keys = self.keys_under(prefix)
        for key in keys:
            target = folder / key[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.get(key))
        return len(keys)

    def upload_folder(self, folder: Path, prefix: str) -> int:
        """Every file of `folder` under `prefix` (checkpoints); returns how many."""
        files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
        for path in files:
            self.put_named(prefix + path.relative_to(folder).as_posix(), path.read_bytes())
        return len(files)

    def delete_prefix(self, prefix: str) -> None:
        for key in self.keys_under(prefix):
            self.client.remove_object(self.bucket, key)

    def presigned_url(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return self.client.presigned_get_object(self.bucket, key, expires=expires)


@lru_cache(maxsize=1)
def get_store() -> ObjectStore:
    return ObjectStore.from_settings(get_settings())
