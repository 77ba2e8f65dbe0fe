"""The vector indexes: one partial IVFFlat index per table and indexed dimension, on `embedding::halfvec(N)`.

Why IVFFlat and not HNSW (bench/README.md, "Vector search at scale"; bench/results/search-scale-14.json):
on 1M clustered 384-d vectors HNSW (m=16) found 0.72 of the exact top 10 at ef_search 100 and 0.95 only
at 800 (9.5 ms p50 on a quiet machine, ~10 min to build on 2 cores, 2 GB); IVFFlat on halfvec with
sqrt(rows) lists finds 0.99 reading 4 lists (4.4 ms) and 0.999 reading 8 (8.2 ms), builds in 1.5-2.5 min
(790 MB) and inserts a row by one centroid comparison instead of a graph search. halfvec halves the index
and at 1M also the CPU per search (less memory to stream).

The price: IVFFlat clusters the vectors when it is built (k-means into `lists` centroids), and rows
inserted later only join their nearest list. An index built on an empty database has one list (every
search an exact scan: correct, linear), so `refresh_vector_indexes` runs after every ingest run and
rebuilds an index whose lists no longer fit the table: built for fewer than half or more than twice
today's rows. The rebuild blocks neither searches nor ingest: the new index is built CONCURRENTLY next to
the old one, then swapped in.
"""

from __future__ import annotations

import logging
import math

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

INDEXED = (("chunks", 384), ("chunks", 1024), ("images", 384), ("images", 1024))  # migration 0010
# Below this a table keeps one list: an exact scan of 10k halfvecs costs about what 4-8 lists cost at 1M.
MIN_ROWS_TO_CLUSTER = 10_000
# k-means reads 50 sample rows per list; 1M rows (1,000 lists) need ~100 MB. Session-local, for the build only.
BUILD_MAINTENANCE_WORK_MEM = "1GB"
REFRESH_LOCK = 0x6D32696F  # "m2io": one refresher at a time (pg_try_advisory_lock)


def index_name(table: str, dim: int) -> str:
    return f"ix_{table}_embedding_ivfflat_{dim}"


def search_expression(dim: int) -> str:
    """What the index is on, and so what a search must order by (`<=>` a halfvec(dim) query)."""
    return f"embedding::halfvec({dim})"


def lists_for(rows: int) -> int:
    """sqrt(rows) lists of ~sqrt(rows) rows: a search compares the query with every centroid and then
    reads `probes` lists, so it reads ~(probes + 1) * sqrt(rows) vectors. One list below 10k rows.

    >>> lists_for(0), lists_for(9_999), lists_for(100_000), lists_for(1_000_000)
    (1, 1, 316, 1000)
    """
    return 1 if rows < MIN_ROWS_TO_CLUSTER else min(32_768, round(math.sqrt(rows)))


def needs_rebuild(built_lists: int, rows: int) -> bool:
    """The lists were chosen for fewer than half or more than twice today's rows.

    >>> needs_rebuild(1, 5_000), needs_rebuild(1, 20_000), needs_rebuild(316, 150_000), needs_rebuild(316, 250_000)
    (False, True, False, True)
    """
    target = lists_for(rows)
    return target != built_lists and not (built_lists / math.sqrt(2) <= target <= built_lists * math.sqrt(2))


def create_sql(table: str, dim: int, lists: int, name: str | None = None, concurrently: bool = False) -> str:
    return (
        f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}{name or index_name(table, dim)} ON {table} "
        f"USING ivfflat (({search_expression(dim)}) halfvec_cosine_ops) WITH (lists = {lists}) "
        f"WHERE embedding_dim = {dim}"
    )


def built_lists(conn: Connection, table: str, dim: int) -> int | None:
    """The lists the index was built with; None when there is no such index (before migration 0010)."""
    row = conn.execute(
        text("SELECT reloptions FROM pg_class WHERE relname = :name AND relkind = 'i'"),
        {"name": index_name(table, dim)},
    ).first()
    if row is None:
        return None
    values = dict(option.split("=", 1) for option in row.reloptions or [])
    return int(values.get("lists", 100))  # pgvector's default


def rebuild(engine: Engine, table: str, dim: int, lists: int) -> bool:
    """Build the index anew with `lists` beside the old one, then swap them; False (and the old index
    kept) when it could not, e.g. a lock not granted within the timeout. Never blocks searches."""
    name, new = index_name(table, dim), f"{index_name(table, dim)}_new"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SET lock_timeout = '10s'"))
        conn.execute(text(f"SET maintenance_work_mem = '{BUILD_MAINTENANCE_WORK_MEM}'"))
        conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {new}"))  # left by a failed try
        try:
            conn.execute(text(create_sql(table, dim, lists, name=new, concurrently=True)))
        except DBAPIError as error:
            log.warning("vector index %s: rebuild with %d lists failed (%s); the old one stays", name, lists, error)
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {new}"))
            return False
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
            conn.execute(text(f"ALTER INDEX {new} RENAME TO {name}"))
    except DBAPIError as error:
        log.warning("vector index %s: swap failed (%s); the old one stays", name, error)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {new}"))
        return False
    return True


def refresh_vector_indexes(engine: Engine) -> dict[str, int]:
    """Rebuild every vector index whose lists no longer fit its table's rows; {index: new lists}.
    One process at a time: a second caller returns at once (the first one covers its rows too)."""
    rebuilt: dict[str, int] = {}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": REFRESH_LOCK}).scalar():
            return rebuilt
        try:
            counts: dict[str, dict[int, int]] = {}
            for table, dim in INDEXED:
                lists = built_lists(conn, table, dim)
                if lists is None:
                    continue
                if table not in counts:
                    counts[table] = dict(
                        conn.execute(text(f"SELECT embedding_dim, count(*) FROM {table} GROUP BY embedding_dim")).all()
                    )
                rows = counts[table].get(dim, 0)
                if needs_rebuild(lists, rows) and rebuild(engine, table, dim, lists_for(rows)):
                    rebuilt[index_name(table, dim)] = lists_for(rows)
                    log.info("vector index %s: %d lists for %d rows", index_name(table, dim), lists_for(rows), rows)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": REFRESH_LOCK})
    return rebuilt
