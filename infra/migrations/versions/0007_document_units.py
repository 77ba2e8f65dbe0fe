"""documents.units and chunks.first_unit/last_unit: answers cut from whole sections, with provenance

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for documents indexed before: their answers fall back to the passages' text until a
    # re-ingest (CHUNKER_VERSION 2) fills them.
    op.add_column(
        "documents",
        sa.Column("units", JSONB, nullable=True, comment="parsed units: [kind, text, heading level], 1-based"),
    )
    op.add_column(
        "chunks",
        sa.Column("first_unit", sa.Integer, nullable=True, comment="the document units it holds, 1-based, inclusive"),
    )
    op.add_column("chunks", sa.Column("last_unit", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("chunks", "last_unit")
    op.drop_column("chunks", "first_unit")
    op.drop_column("documents", "units")
