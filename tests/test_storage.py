"""S3 through the minio client against a real S3 server (SeaweedFS) with real SigV4 auth."""

import urllib.request

import pytest
from minio import Minio
from minio.error import S3Error

from services.common.settings import get_settings
from services.common.smoke import tiny_png
from services.common.storage import ObjectMissing, ObjectStore, content_key, sha256_hex


@pytest.fixture
def store() -> ObjectStore:
    store = ObjectStore.from_settings(get_settings())
    store.ensure_bucket()
    return store


def test_content_addressed_put_is_idempotent(store):
    data = tiny_png()
    first = store.put_content(data, "image/png", prefix="images")
    second = store.put_content(data, "image/png", prefix="images")
    assert first.key == second.key == content_key(sha256_hex(data), "images")
    assert first.key.endswith(sha256_hex(data))
    assert second.created is False
    assert store.get(first.key) == data


def test_presigned_url_serves_the_bytes(store):
    data = b"answer html " * 100
    stored = store.put_content(data, "text/html")
    with urllib.request.urlopen(store.presigned_url(stored.key), timeout=10) as response:
        assert response.read() == data


def test_missing_object_is_a_clear_error(store):
    with pytest.raises(ObjectMissing, match="does not exist"):
        store.get("blobs/00/00/does-not-exist")
    assert store.exists("blobs/00/00/does-not-exist") is False


def test_bucket_bootstrap_is_idempotent(store):
    store.ensure_bucket()
    assert store.ensure_bucket() is False


def test_wrong_secret_is_refused(store):
    settings = get_settings()
    intruder = Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key="wrong-secret", secure=False)
    with pytest.raises(S3Error) as caught:
        intruder.list_objects(store.bucket)
        list(intruder.list_objects(store.bucket))
    assert caught.value.code in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}
