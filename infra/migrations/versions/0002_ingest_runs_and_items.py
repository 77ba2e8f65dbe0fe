"""ingest runs and items

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 20:14:27.969823
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_runs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("collection_name", sa.String(length=200), nullable=False),
        sa.Column("collection_id", sa.BigInteger(), nullable=True),
        sa.Column("embedding_model", sa.String(length=500), nullable=False),
        sa.Column("source", sa.Text(), nullable=False, comment="the path given to m2io ingest"),
        sa.Column("layout", sa.String(length=50), nullable=False, comment="markdown-folder | mramg | file"),
        sa.Column("status", sa.String(length=20), server_default="running", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["collection_id"], ["collections.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_ingest_runs_collection_name"), "ingest_runs", ["collection_name"], unique=False)
    op.create_table(
        "ingest_items",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("doc_key", sa.String(length=1000), nullable=True),
        sa.Column("what", sa.Text(), nullable=False, comment="file, line or image concerned"),
        sa.Column(
            "status", sa.String(length=20), nullable=False, comment="pending | ingested | unchanged | skipped | failed"
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "warnings", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="the parsed source, for the worker",
        ),
        sa.Column("chunks", sa.Integer(), server_default="0", nullable=False),
        sa.Column("images", sa.Integer(), server_default="0", nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["ingest_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_ingest_items_run_id"), "ingest_items", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_ingest_items_run_id"), table_name="ingest_items")
    op.drop_table("ingest_items")
    op.drop_index(op.f("ix_ingest_runs_collection_name"), table_name="ingest_runs")
    op.drop_table("ingest_runs")
