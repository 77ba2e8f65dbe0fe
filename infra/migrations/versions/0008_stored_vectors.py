"""Vectors read once, at ingest: each chunk's units, each document's section labels, each image's texts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# float32 matrices (services.common.vectors.pack): read with the row, no parsing, no index needed
# (they are looked up by the row they belong to, never searched). NULL for rows indexed before: their
# queries embed these texts until a re-ingest (CHUNKER_VERSION 3) stores them.


def upgrade() -> None:
    op.add_column(
        "chunks",
        sa.Column("unit_vectors", sa.LargeBinary, nullable=True, comment="first_unit..last_unit"),
    )
    op.add_column(
        "documents",
        sa.Column("section_labels", JSONB, nullable=True, comment="its sections' heading paths"),
    )
    op.add_column(
        "documents",
        sa.Column("label_vectors", sa.LargeBinary, nullable=True, comment="one per section label"),
    )
    op.add_column(
        "images",
        sa.Column(
            "text_vectors",
            sa.LargeBinary,
            nullable=True,
            comment="sentence before, sentence after, caption, image text (zero if none)",
        ),
    )


def downgrade() -> None:
    op.drop_column("images", "text_vectors")
    op.drop_column("documents", "label_vectors")
    op.drop_column("documents", "section_labels")
    op.drop_column("chunks", "unit_vectors")
