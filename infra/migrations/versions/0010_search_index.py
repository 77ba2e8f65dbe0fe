"""Vector indexes: partial IVFFlat on embedding::halfvec(N) with sqrt(rows) lists, instead of HNSW on vector(N)

On 1M clustered vectors HNSW (m=16) reached recall@10 0.95 only at ef_search 800 (9.5 ms) and built in
~10 min; IVFFlat on halfvec reads 4-8 lists for 0.99-0.999 (4-8 ms) and builds in 1.5-2.5 min
(bench/README.md, "Vector search at scale"). The lists are
sized for the rows present now (one list on an empty database: an exact scan); after each ingest run
`services.retriever.vector_index.refresh_vector_indexes` rebuilds an index whose table has since doubled.
The rule is copied here, not imported: a migration stays what it was when it ran.

Revision ID: 0010_search_index
Revises: 0009_job_scale
Create Date: 2026-12-02 01:40:00
"""

from __future__ import annotations

import math

from alembic import op
from sqlalchemy import text

revision = "0010_search_index"
down_revision = "0009_job_scale"
branch_labels = None
depends_on = None

INDEXED_DIMENSIONS = (384, 1024)


def lists_for(rows: int) -> int:
    return 1 if rows < 10_000 else min(32_768, round(math.sqrt(rows)))


def upgrade() -> None:
    op.execute("SET LOCAL maintenance_work_mem = '1GB'")  # k-means samples 50 rows per list
    for table in ("chunks", "images"):
        counts = dict(op.get_bind().execute(text(f"SELECT embedding_dim, count(*) FROM {table} GROUP BY 1")).all())
        for dim in INDEXED_DIMENSIONS:
            op.execute(f"DROP INDEX IF EXISTS ix_{table}_embedding_hnsw_{dim}")
            op.execute(
                f"CREATE INDEX ix_{table}_embedding_ivfflat_{dim} ON {table} "
                f"USING ivfflat ((embedding::halfvec({dim})) halfvec_cosine_ops) "
                f"WITH (lists = {lists_for(counts.get(dim, 0))}) WHERE embedding_dim = {dim}"
            )


def downgrade() -> None:
    for table in ("chunks", "images"):
        for dim in INDEXED_DIMENSIONS:
            op.execute(f"DROP INDEX IF EXISTS ix_{table}_embedding_ivfflat_{dim}")
            op.execute(
                f"CREATE INDEX ix_{table}_embedding_hnsw_{dim} ON {table} "
                f"USING hnsw ((embedding::vector({dim})) vector_cosine_ops) "
                f"WHERE embedding_dim = {dim}"
            )
