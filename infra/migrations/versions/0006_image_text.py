"""images.image_text and the image_texts cache: the words inside images (OCR at ingest), read once per sha256

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "images",
        sa.Column("image_text", sa.Text(), nullable=True, comment="the words inside the image (OCR), cleaned"),
    )
    op.create_table(
        "image_texts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "text", sa.Text(), server_default="", nullable=False, comment="the words read, line by line, uncleaned"
        ),
        sa.Column("error", sa.Text(), nullable=True, comment="why nothing was read (the image still went in)"),
        sa.Column(
            "engine",
            sa.String(length=200),
            nullable=False,
            comment="engine, version and reading recipe: another re-reads",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )


def downgrade() -> None:
    op.drop_table("image_texts")
    op.drop_column("images", "image_text")
