"""One settings object for every m2io process, read from `M2IO_*` environment variables.

Precedence: real environment > `<state dir>/cluster.env` (written by `m2io up` with the URLs and
generated keys of the local cluster) > the defaults below. `get_settings()` is cached per process;
nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values people paste from examples; a deployment that still carries one is refused at start-up.
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "change_me", "changethis", "secret", "password"})

CLUSTER_ENV_FILE = "cluster.env"

# Addresses that only this machine reaches (a server bound to one is not published).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def state_dir_from_env() -> Path:
    return Path(os.environ.get("M2IO_STATE_DIR", ".m2io")).resolve()


class NotConfigured(RuntimeError):
    """A server the command needs is configured nowhere (no `m2io up` cluster, no M2IO_* setting)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="M2IO_", extra="ignore", env_file_encoding="utf-8")

    state_dir: Path = Field(default=Path(".m2io"), description="where `m2io up` keeps data, logs and pids")

    # None means: the local cluster (`m2io up`) provides it.
    database_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint: str | None = Field(default=None, description="host:port of an S3 server (MinIO, SeaweedFS)")
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "m2io"
    s3_secure: bool = False
    s3_region: str = "us-east-1"

    # Ports of the local cluster's own servers (used only when the corresponding URL is unset): the
    # usual port with a 1 in front, below Linux's ephemeral range (32768-60999), where the source
    # port of an outgoing connection could hold one when `up` binds it. SeaweedFS takes 18333-18347.
    local_postgres_port: int = 15432
    local_redis_port: int = 16379
    local_s3_port: int = 18333
    # The password `m2io up` generated for its own Redis (kept in cluster.env). A M2IO_REDIS_URL without
    # credentials that names that Redis's address gets it; any other URL is used as given.
    local_redis_password: SecretStr | None = None

    # Celery: with the Redis broker an unacknowledged message whose worker died is delivered again
    # after this many seconds. It must exceed the longest stage task, or a slow task is re-run
    # while still running (tasks are idempotent, so that costs time, not correctness). The backstop:
    # a dead worker's messages normally come back when its heartbeat stops (below).
    visibility_timeout_s: int = 300
    # How often each worker sweeps for such messages, and for the messages of workers whose heartbeat
    # stopped (kombu's default sweep is ~100 s).
    unacked_restore_interval_s: int = 5
    # Each worker writes a heartbeat key this often, with this TTL: a worker silent for the TTL is taken
    # for dead and the messages it held go back to their queues at the next sweep. Recovery after kill -9
    # takes about TTL + sweep interval (bench/README.md); the TTL leaves room for several missed beats on
    # a busy machine (a false alarm costs a duplicate attempt, never a second success).
    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    worker_heartbeat_ttl_s: float = Field(default=10.0, gt=0)
    # The trainer's own visibility timeout: a GRPO run holds its message for minutes to hours, and must not
    # be delivered again while its worker lives (a dead trainer's message comes back by its heartbeat).
    trainer_visibility_timeout_s: int = 86_400
    # Celery task events (sent / received / started / succeeded, published to Redis per hop) for a
    # monitor such as Flower. m2io reads state from Postgres (stage runs), not from events, and each
    # event costs Redis round trips on every hop: off unless a monitor listens.
    task_events: bool = False
    # Celery's two log lines per task ("received" in the worker, "succeeded in …s" in its pool process): the
    # stage runs record the same with timestamps, and at ~30 questions/s they are ~240 lines/s of worker
    # logs. Off by default; failures, retries' errors and everything else of the workers are still logged.
    task_log_lines: bool = False

    # IVFFlat lists read by a vector search (the indexes have ~sqrt(rows) lists, one below 10k rows: an exact
    # scan; services/retriever/vector_index.py). Each probe reads ~sqrt(rows) vectors, so the cost grows
    # linearly with probes while recall saturates. On the clustered bench set (bench/README.md, "Vector search
    # at scale", 3-6 builds each): 1M vectors, 8 probes 0.999-0.9995 at p50 8 ms on a quiet machine (4 probes:
    # 0.98-0.99 at 4 ms); 100k, 8 probes 0.9885-0.9975, 6 probes 0.9785-0.996 (k-means differs from build to
    # build). 8 is the fewest that kept 100k above HNSW's 0.98 in every build; 4-6 is the cheaper choice for a
    # large collection that needs latency. HNSW (before migration 0010) reached 0.95 at 1M only at ef_search
    # 800-1000, at 9-10 ms. A search filtered to a small collection in a large table reads further lists
    # (iterative scan) until it found `limit` rows, up to `ivfflat_max_probes` (the planner usually takes the
    # collection's btree and an exact sort for it instead).
    ivfflat_probes: int = Field(default=8, ge=1, le=1000)
    ivfflat_max_probes: int = Field(default=32, ge=1, le=32_768)

    # Torch threads of each worker process (None: torch's default, one per core; `m2io up` sets it from the
    # machine's cores, infra/sizing.py). Several worker processes, each with a thread per core, oversubscribe
    # a small machine (bench/README.md).
    torch_threads: int | None = Field(default=None, ge=1)
    # Processes of every answer stage's worker in `m2io up` (None: from the machine's cores, infra/sizing.py).
    worker_concurrency: int | None = Field(default=None, ge=1)
    # Seconds a worker's pool process may take to load its models before its parent gives up on it and
    # starts another (services/common/warmup.py): a first load from a cold disk on a busy machine is slow.
    worker_warm_up_timeout_s: float = Field(default=300.0, gt=0)

    # Trainer: a running training run stamps its heartbeat this often; a run whose heartbeat is older than
    # `trainer_stale_after_s` is taken to have lost its worker, and the next delivery of its message resumes it
    # from its last checkpoint. Several heartbeats must fit in the window (a busy machine delays one).
    trainer_heartbeat_s: float = Field(default=10.0, gt=0)
    trainer_stale_after_s: float = Field(default=90.0, gt=0)

    # The words inside images (OCR at ingest, Debian's tesseract): `auto` reads them when the tesseract
    # binary is installed, `on` too but warns on every document with images when it is not, `off` never.
    # Off by default: on the development corpora it moved neither candidate recall nor the rule inserter's
    # F1 beyond noise, and a first ingest of the manual took 1.8-2.5x as long (bench/README.md, "OCR").
    ocr: Literal["auto", "on", "off"] = "off"
    # Seconds one image may take (a screenshot takes ~0.5-2 s on one core); past it the image goes in without
    # its words, with a warning, and is read again at the next ingest.
    ocr_timeout_s: float = Field(default=15.0, gt=0, le=600)

    # Model choices.
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    generator_backend: str = "extractive"
    inserter_backend: str = "rule"
    llm_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Where converted local models are kept (None: ~/.cache/m2io/models). The default LLM ships as a
    # GGUF file in a pip package; it is converted once into a plain checkpoint here.
    model_cache_dir: Path | None = None

    # An OpenAI-compatible chat server (`llm=openai`): base URL like http://host:8000/v1.
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    openai_model: str = "gpt-4o-mini"
    openai_timeout_s: float = 60
    # Extra attempts after the first, only on connection errors, timeouts, 429 and 5xx.
    openai_retries: int = 3

    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8501
    dashboard_password: SecretStr | None = None

    @field_validator("s3_secret_key", "dashboard_password", "openai_api_key")
    @classmethod
    def refuse_placeholder_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError("is a placeholder; set a real secret (see .env.example)")
        return value

    @field_validator("ocr", mode="before")
    @classmethod
    def ocr_in_any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def refuse_placeholder_redis_password(cls, value: str) -> str:
        password = urlsplit(value).password
        if password is not None and password.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError("carries a placeholder password; set a real secret (see .env.example)")
        return value

    def local_redis_url(self) -> str | None:
        """`redis_url` with the local Redis's password, when it names that Redis without credentials."""
        parts = urlsplit(self.redis_url)
        if self.local_redis_password is None or parts.password or parts.username:
            return None
        if parts.hostname not in LOOPBACK_HOSTS or parts.port != self.local_redis_port:
            return None
        netloc = f":{self.local_redis_password.get_secret_value()}@{parts.netloc}"
        return parts._replace(netloc=netloc).geturl()

    @field_validator("database_url")
    @classmethod
    def use_psycopg3_driver(cls, value: str | None) -> str | None:
        # Users paste plain `postgresql://` URLs; SQLAlchemy would pick psycopg2, which we do not ship.
        if value and value.startswith("postgresql://"):
            return "postgresql+psycopg://" + value.removeprefix("postgresql://")
        if value and value.startswith("postgres://"):
            return "postgresql+psycopg://" + value.removeprefix("postgres://")
        return value

    @model_validator(mode="after")
    def heartbeat_outlives_beats(self) -> Settings:
        if self.worker_heartbeat_ttl_s < 2 * self.worker_heartbeat_s:
            raise ValueError("worker_heartbeat_ttl_s must be at least twice worker_heartbeat_s (late beats happen)")
        return self

    def require_database_url(self) -> str:
        if not self.database_url:
            raise NotConfigured("no database configured: run `m2io up` or set M2IO_DATABASE_URL")
        return self.database_url

    def require_s3(self) -> tuple[str, str, str]:
        if not (self.s3_endpoint and self.s3_access_key and self.s3_secret_key):
            raise NotConfigured(
                "no S3 server configured: run `m2io up` or set M2IO_S3_ENDPOINT, M2IO_S3_ACCESS_KEY, M2IO_S3_SECRET_KEY"
            )
        return self.s3_endpoint, self.s3_access_key, self.s3_secret_key.get_secret_value()


def load_settings() -> Settings:
    """Fresh settings: environment first, then the local cluster's env file, then defaults."""
    state_dir = state_dir_from_env()
    env_file = state_dir / CLUSTER_ENV_FILE
    settings = Settings(_env_file=env_file if env_file.exists() else None)
    settings.state_dir = state_dir
    settings.redis_url = settings.local_redis_url() or settings.redis_url
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
