"""SQLAlchemy 2 models. Alembic (infra/migrations) owns the schema; these mirror it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Dimensions that get a vector index (IVFFlat on halfvec, migration 0010) out of the box:
# all-MiniLM-L6-v2 (the offline default) and BGE-M3 (the paper's choice). The vector columns are
# dimension-free so one table holds every collection; each index is a partial expression index over
# one dimension.
INDEXED_DIMENSIONS = (384, 1024)


def utcnow_column(**kwargs: Any) -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False, **kwargs)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


class Collection(Base):
    __tablename__ = "collections"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    embedding_model: Mapped[str] = mapped_column(String(500))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = utcnow_column()
    updated_at: Mapped[datetime] = utcnow_column(onupdate=func.now())


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("collection_id", "doc_key"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    doc_key: Mapped[str] = mapped_column(String(1000), comment="stable id within the collection")
    title: Mapped[str | None] = mapped_column(Text)
    source_path: Mapped[str | None] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    # The parsed units, [kind, text, heading level] each, numbered from 1 as images' `position` counts
    # them: answers are cut from these (whole sections, with provenance). NULL for documents indexed
    # before it existed; re-ingesting fills it.
    units: Mapped[list[Any] | None] = mapped_column(
        nullable=True, comment="parsed units: [kind, text, heading level], 1-based"
    )
    # Vectors a query compares, stored at ingest (services.common.vectors: float32 rows, packed).
    section_labels: Mapped[list[Any] | None] = mapped_column(nullable=True, comment="its sections' heading paths")
    label_vectors: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, comment="one per section label")
    meta: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    created_at: Mapped[datetime] = utcnow_column()
    updated_at: Mapped[datetime] = utcnow_column(onupdate=func.now())


class Chunk(Base):
    __tablename__ = "chunks"
    # The vector indexes are partial expression indexes created in the migrations (one per dimension).
    __table_args__ = (
        UniqueConstraint("document_id", "ordinal"),
        Index("ix_chunks_tsv", "tsv", postgresql_using="gin"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    heading: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    first_unit: Mapped[int | None] = mapped_column(Integer, comment="the document units it holds, 1-based, inclusive")
    last_unit: Mapped[int | None] = mapped_column(Integer)
    embedding: Mapped[Any] = mapped_column(Vector(), nullable=True)
    embedding_dim: Mapped[int | None] = mapped_column(Integer)
    unit_vectors: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, comment="first_unit..last_unit")
    tsv: Mapped[Any] = mapped_column(
        TSVECTOR, Computed("to_tsvector('english', coalesce(heading, '') || ' ' || text)", persisted=True)
    )
    image_ids: Mapped[list[Any]] = mapped_column(server_default=sql_text("'[]'::jsonb"))


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("document_id", "source_name", "position"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    source_name: Mapped[str] = mapped_column(Text, comment="path relative to the corpus root")
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    s3_key: Mapped[str] = mapped_column(Text)
    mime_type: Mapped[str] = mapped_column(String(100))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    alt_text: Mapped[str | None] = mapped_column(Text)
    caption: Mapped[str | None] = mapped_column(Text)
    context_before: Mapped[str | None] = mapped_column(Text)
    context_after: Mapped[str | None] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer, comment="index of the document sentence it follows")
    image_text: Mapped[str | None] = mapped_column(Text, comment="the words inside the image (OCR), cleaned")
    embedding: Mapped[Any] = mapped_column(Vector(), nullable=True)
    embedding_dim: Mapped[int | None] = mapped_column(Integer)
    text_vectors: Mapped[bytes | None] = mapped_column(
        LargeBinary, nullable=True, comment="sentence before, sentence after, caption, image text (zero if none)"
    )
    created_at: Mapped[datetime] = utcnow_column()


class ImageText(Base):
    """What OCR read in an image's bytes, once per sha256: a table of its own, not columns of `images`,
    because an `images` row is one occurrence in one document of one collection and is replaced each
    time its document is indexed again, while the words depend on the bytes only. Keyed by sha256, a
    re-ingest, a changed document, the same screenshot in several documents or collections, and
    switching OCR off and on again read each image once. `images.image_text` keeps the cleaned copy
    that search returns with the candidate, without a join."""

    __tablename__ = "image_texts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(Text, server_default="", comment="the words read, line by line, uncleaned")
    error: Mapped[str | None] = mapped_column(Text, comment="why nothing was read (the image still went in)")
    engine: Mapped[str] = mapped_column(String(200), comment="engine, version and reading recipe: another re-reads")
    created_at: Mapped[datetime] = utcnow_column()


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(50), comment="answer | smoke | ingest")
    name: Mapped[str | None] = mapped_column(Text, comment="a label: the questions file, or what the user typed")
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id", ondelete="SET NULL"))
    config: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    created_at: Mapped[datetime] = utcnow_column()
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queries: Mapped[list[Query]] = relationship(back_populates="job", cascade="all, delete-orphan")


class Query(Base):
    __tablename__ = "queries"
    __table_args__ = (
        UniqueConstraint("job_id", "external_id"),
        # A job's queries by status (its counts, its failures) and in file order (export, pages).
        Index("ix_queries_job_status", "job_id", "status"),
        Index("ix_queries_job_line", "job_id", "line"),
    )
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str] = mapped_column(String(500), comment="the question id of the questions file")
    question: Mapped[str] = mapped_column(Text)
    line: Mapped[int | None] = mapped_column(Integer, comment="line of the questions file")
    collection: Mapped[str | None] = mapped_column(String(200), comment="overrides the job's collection")
    gold: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(
        String(20), server_default="queued", comment="queued | running | succeeded | failed | cancelled"
    )
    error: Mapped[str | None] = mapped_column(Text)
    error_stage: Mapped[str | None] = mapped_column(
        String(40), comment="where a failed query failed: input | enqueue | a pipeline stage"
    )
    created_at: Mapped[datetime] = utcnow_column()
    updated_at: Mapped[datetime] = utcnow_column(onupdate=func.now())
    job: Mapped[Job] = relationship(back_populates="queries")

    @property
    def described_error(self) -> str | None:
        """The error as users read it: `stage: message`."""
        if self.error is None or self.error_stage is None:
            return self.error
        return f"{self.error_stage}: {self.error}"


class StageRun(Base):
    """One attempt of one stage on one query. A redelivered message adds an attempt."""

    __tablename__ = "stage_runs"
    __table_args__ = (
        UniqueConstraint("query_id", "stage", "attempt"),
        # At most one successful run per (query, stage): the exactly-once guarantee, in the schema.
        Index(
            "uq_stage_runs_one_success",
            "query_id",
            "stage",
            unique=True,
            postgresql_where=sql_text("status = 'succeeded'"),
        ),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    query_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), comment="running | succeeded | failed | lost")
    worker: Mapped[str | None] = mapped_column(String(300))
    started_at: Mapped[datetime] = utcnow_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    query_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), unique=True)
    markdown: Mapped[str] = mapped_column(Text)
    blocks: Mapped[list[Any]] = mapped_column()
    html_key: Mapped[str | None] = mapped_column(Text, comment="S3 key of the self-contained HTML")
    created_at: Mapped[datetime] = utcnow_column()


class TrainingRun(Base):
    __tablename__ = "training_runs"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(
        String(20), server_default="queued", comment="queued | running | succeeded | failed | cancelled"
    )
    config: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(300), comment="the worker holding the run")
    attempts: Mapped[int] = mapped_column(Integer, server_default=sql_text("0"), comment="workers that took it up")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), comment="set by `m2io train-cancel`; the run stops at its next step"
    )
    last_checkpoint_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = utcnow_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TrainingStep(Base):
    __tablename__ = "training_steps"
    __table_args__ = (UniqueConstraint("run_id", "phase", "step"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(20), comment="sft | grpo")
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = utcnow_column()


class RegisteredModel(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(50), comment="inserter | embedding | generator")
    base_model: Mapped[str | None] = mapped_column(Text)
    s3_prefix: Mapped[str] = mapped_column(Text)
    training_run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    meta: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    created_at: Mapped[datetime] = utcnow_column()


class EvalRun(Base):
    __tablename__ = "eval_runs"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    metrics: Mapped[dict[str, Any]] = mapped_column(server_default=sql_text("'{}'::jsonb"))
    report_key: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = utcnow_column()


class DeadLetter(Base):
    """A message a task refused (invalid payload, unknown ids): recorded, acknowledged, never retried."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(200), index=True)
    queue: Mapped[str | None] = mapped_column(String(50))
    task_id: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text, comment="the message as received, truncated")
    error: Mapped[str] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = utcnow_column()


class IngestRun(Base):
    """One `m2io ingest`: what was read, what went in, and everything skipped with its reason."""

    __tablename__ = "ingest_runs"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    # The collection is created by the first worker batch (it knows the model's dimension).
    collection_name: Mapped[str] = mapped_column(String(200), index=True)
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    embedding_model: Mapped[str] = mapped_column(String(500))
    source: Mapped[str] = mapped_column(Text, comment="the path given to m2io ingest")
    layout: Mapped[str] = mapped_column(String(50), comment="markdown-folder | mramg | file")
    status: Mapped[str] = mapped_column(String(20), server_default="running")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = utcnow_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    items: Mapped[list[IngestItem]] = relationship(back_populates="run", cascade="all, delete-orphan")


class IngestItem(Base):
    """A document of an ingest run (or an input skipped before it became one)."""

    __tablename__ = "ingest_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ingest_runs.id", ondelete="CASCADE"), index=True)
    doc_key: Mapped[str | None] = mapped_column(String(1000))
    what: Mapped[str] = mapped_column(Text, comment="file, line or image concerned")
    status: Mapped[str] = mapped_column(String(20), comment="pending | ingested | unchanged | skipped | failed")
    reason: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[list[Any]] = mapped_column(server_default=sql_text("'[]'::jsonb"))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB, comment="the parsed source, for the worker")
    chunks: Mapped[int] = mapped_column(Integer, server_default="0")
    images: Mapped[int] = mapped_column(Integer, server_default="0")
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    run: Mapped[IngestRun] = relationship(back_populates="items")
