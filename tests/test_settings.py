import pytest
from pydantic import ValidationError

from services.common.settings import Settings, load_settings

pytestmark = pytest.mark.unit


def test_placeholder_secret_is_refused():
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(s3_secret_key="changeme")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(dashboard_password="password")


def test_secrets_are_never_printed():
    settings = Settings(s3_secret_key="a-real-secret-value-123", dashboard_password="another-secret-456")
    shown = repr(settings) + str(settings.model_dump()) + settings.model_dump_json()
    assert "a-real-secret-value-123" not in shown
    assert "another-secret-456" not in shown
    assert settings.s3_secret_key.get_secret_value() == "a-real-secret-value-123"


def test_plain_postgres_urls_get_the_psycopg3_driver():
    assert Settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"


def test_environment_beats_the_cluster_env_file(tmp_path, monkeypatch):
    (tmp_path / "cluster.env").write_text("M2IO_REDIS_URL=redis://from-file:1/0\nM2IO_S3_BUCKET=filebucket\n")
    monkeypatch.setenv("M2IO_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("M2IO_REDIS_URL", "redis://from-env:2/0")
    monkeypatch.delenv("M2IO_S3_BUCKET", raising=False)
    settings = load_settings()
    assert settings.redis_url == "redis://from-env:2/0"
    assert settings.s3_bucket == "filebucket"
    assert settings.state_dir == tmp_path.resolve()


def test_missing_services_give_clear_errors():
    # Explicit values beat the environment (which points at the test servers).
    settings = Settings(database_url=None, s3_endpoint=None, s3_access_key=None, s3_secret_key=None)
    with pytest.raises(RuntimeError, match="m2io up"):
        settings.require_database_url()
    with pytest.raises(RuntimeError, match="M2IO_S3_ENDPOINT"):
        settings.require_s3()
