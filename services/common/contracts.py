"""Typed payloads of every queue hop. A message carries ids and object keys, never blobs."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field


class Contract(BaseModel):
    # Unknown fields are an error: a typo in a producer must not pass silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueryRef(Contract):
    """The payload of every answer-pipeline hop: the stage reads its input from Postgres."""

    query_id: uuid.UUID


class SmokeProbe(Contract):
    """The foundation's end-to-end check: one message through each queue, recorded as stage runs."""

    query_id: uuid.UUID
    # Keeps the task busy so a test can kill its worker mid-task; bounded so a bad value cannot
    # park a worker.
    hold_seconds: float = Field(default=0.0, ge=0.0, le=120.0)
    # Whether the stage enqueues the next stage of the pipeline when done.
    chain: bool = True
    # S3 key of an image the merger reads back and checks against its sha256.
    image_key: str | None = None
