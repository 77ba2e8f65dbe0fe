"""Indexes for jobs of 10,000 questions: a job's queries by status and in file order

Revision ID: 0009_job_scale
Revises: 0008
Create Date: 2026-12-02 01:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0009_job_scale"
down_revision = "0008"  # 0008_stored_vectors
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `m2io status` counts a job's queries by status and lists its failed ones (every poll of
    # `--wait` and of the dashboard): an index-only count instead of visiting every row of the job.
    op.create_index("ix_queries_job_status", "queries", ["job_id", "status"])
    # Export and the dashboard's pages of questions walk a job's queries in file order.
    op.create_index("ix_queries_job_line", "queries", ["job_id", "line"])


def downgrade() -> None:
    op.drop_index("ix_queries_job_line", table_name="queries")
    op.drop_index("ix_queries_job_status", table_name="queries")
