"""queries.error_stage: the stage a query failed at, in its own column instead of a prefix of `error`

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 20:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# What `error` was prefixed with until now: a line that was no question, a failed enqueue, or a stage.
PREFIXED = "^(input|enqueue|retriever|generator|inserter|merger): "


def upgrade() -> None:
    op.add_column(
        "queries",
        sa.Column(
            "error_stage",
            sa.String(length=40),
            nullable=True,
            comment="where a failed query failed: input | enqueue | a pipeline stage",
        ),
    )
    op.execute(
        sa.text(
            "UPDATE queries SET error_stage = substring(error from '^([a-z]+): '), "
            "error = regexp_replace(error, :prefixed, '') WHERE error ~ :prefixed"
        ).bindparams(prefixed=PREFIXED)
    )


def downgrade() -> None:
    op.execute("UPDATE queries SET error = error_stage || ': ' || error WHERE error_stage IS NOT NULL")
    op.drop_column("queries", "error_stage")
