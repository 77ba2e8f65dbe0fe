"""job names; query lines and per-question collections

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("name", sa.Text(), nullable=True, comment="a label: the questions file, or what the user typed"),
    )
    op.add_column("queries", sa.Column("line", sa.Integer(), nullable=True, comment="line of the questions file"))
    op.add_column(
        "queries",
        sa.Column("collection", sa.String(length=200), nullable=True, comment="overrides the job's collection"),
    )
    op.alter_column(
        "queries",
        "status",
        existing_type=sa.String(length=20),
        comment="queued | running | succeeded | failed | cancelled",
        existing_nullable=False,
        existing_server_default=sa.text("'queued'::character varying"),
    )


def downgrade() -> None:
    op.alter_column(
        "queries",
        "status",
        existing_type=sa.String(length=20),
        comment=None,
        existing_comment="queued | running | succeeded | failed | cancelled",
        existing_nullable=False,
        existing_server_default=sa.text("'queued'::character varying"),
    )
    op.drop_column("queries", "collection")
    op.drop_column("queries", "line")
    op.drop_column("jobs", "name")
