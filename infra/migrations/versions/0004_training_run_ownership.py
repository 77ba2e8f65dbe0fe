"""training runs: the worker that holds a run, its attempts, a cancel request

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "training_runs",
        sa.Column("worker", sa.String(length=300), nullable=True, comment="the worker holding the run"),
    )
    op.add_column(
        "training_runs",
        sa.Column(
            "attempts", sa.Integer(), server_default=sa.text("0"), nullable=False, comment="workers that took it up"
        ),
    )
    op.add_column(
        "training_runs",
        sa.Column(
            "cancel_requested_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="set by `m2io train-cancel`; the run stops at its next step",
        ),
    )
    op.alter_column(
        "training_runs",
        "status",
        existing_type=sa.String(length=20),
        comment="queued | running | succeeded | failed | cancelled",
        existing_nullable=False,
        existing_server_default=sa.text("'queued'::character varying"),
    )


def downgrade() -> None:
    op.alter_column(
        "training_runs",
        "status",
        existing_type=sa.String(length=20),
        comment=None,
        existing_comment="queued | running | succeeded | failed | cancelled",
        existing_nullable=False,
        existing_server_default=sa.text("'queued'::character varying"),
    )
    op.drop_column("training_runs", "cancel_requested_at")
    op.drop_column("training_runs", "attempts")
    op.drop_column("training_runs", "worker")
