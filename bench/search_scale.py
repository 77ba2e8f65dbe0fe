"""Vector search at scale: latency p50/p99 and recall@10 against exact search, at 100k and 1M vectors.

Runs in its own database (created on the configured server and migrated with our migrations). The
default, `--index production`, measures what production runs: the index rebuilt by
`services.retriever.vector_index.rebuild` (what the refresh after an ingest run does: IVFFlat on
halfvec, sqrt(rows) lists, built concurrently), searched by `services.retriever.search.vector_ranks`
itself (its transaction, its settings round trip, LIMIT 50 as the retriever asks; recall on the first
10) with `--probes` as `M2IO_IVFFLAT_PROBES`. Other configurations (`--index hnsw|ivfflat`, `--m`,
`--ef-construction`, `--lists`, `--halfvec`) replace the production index for the run with the same
query shape, for comparison.

Data: real all-MiniLM-L6-v2 embeddings of the corpora's chunks serve as cluster centres; each
synthetic vector is a centre plus Gaussian noise (cosine ~0.75 to its centre), so the set has the
clustered structure of real text embeddings. Queries are the embeddings of the corpora's
questions (real, held out from the data). Exact top-10 comes from a sequential scan (computed
once per size and kept in the database, table `bench_exact`).

Each latency run records the whole machine's CPU busy share while it ran (psutil): the machine is
shared, and other load makes latencies pessimistic.

    .venv/bin/python -m bench.search_scale --sizes 100000 1000000 --queries 200 --probes 4 8 [--out FILE]
    # keep the database, then time the built index again (no rebuild, no migration):
    .venv/bin/python -m bench.search_scale --sizes 1000000 --db m2io_bench_1m --keep-db
    .venv/bin/python -m bench.search_scale --sizes 1000000 --db m2io_bench_1m --keep-db --query-only --probes 6
    # HNSW on halfvec, for comparison:
    .venv/bin/python -m bench.search_scale --sizes 1000000 --index hnsw --halfvec --ef-search 100 400 800
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import psycopg
from pgvector.psycopg import register_vector
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from infra.migrate import upgrade
from services.common.db import vector_literal
from services.common.embedding import get_embedder
from services.common.models import Collection
from services.common.settings import get_settings
from services.retriever.chunking import chunk_document
from services.retriever.importers import parse_source, read_corpus
from services.retriever.search import POOL, vector_ranks, vector_search_sql
from services.retriever.sources import SourceDocument
from services.retriever.vector_index import index_name, lists_for, rebuild

DEFAULT_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
DIM = 384
PRODUCTION_INDEX = index_name("chunks", DIM)
VARIANT_INDEX = "ix_chunks_embedding_bench_384"
ALL_INDEXES = (PRODUCTION_INDEX, VARIANT_INDEX, "ix_chunks_embedding_hnsw_384")  # the last: before 0010
EXACT_SQL = (
    "SELECT id FROM chunks WHERE collection_id = %(collection)s AND embedding_dim = 384 "
    "ORDER BY embedding::vector(384) <=> %(query)s::vector(384) LIMIT 10"
)


@dataclass(frozen=True)
class IndexConfig:
    method: str = "production"  # or "hnsw", "ivfflat"
    halfvec: bool = False  # index (and query) embedding::halfvec(384) instead of vector(384)
    m: int = 16
    ef_construction: int = 64
    lists: int = 1000

    @property
    def cast(self) -> str:
        return f"{'halfvec' if self.halfvec else 'vector'}({DIM})"

    def create_sql(self) -> str:
        ops = "halfvec_cosine_ops" if self.halfvec else "vector_cosine_ops"
        params = (
            f"m = {self.m}, ef_construction = {self.ef_construction}"
            if self.method == "hnsw"
            else f"lists = {self.lists}"
        )
        return (
            f"CREATE INDEX {VARIANT_INDEX} ON chunks USING {self.method} ((embedding::{self.cast}) {ops}) "
            f"WITH ({params}) WHERE embedding_dim = {DIM}"
        )

    def search_sql(self) -> str:
        return (
            f"SELECT id FROM chunks WHERE collection_id = %(collection)s AND embedding_dim = {DIM} "
            f"ORDER BY embedding::{self.cast} <=> %(query)s::vector({DIM})::{self.cast} LIMIT {POOL}"
        )

    def session_settings(self, beam: int) -> list[str]:
        if self.method == "hnsw":
            return [
                f"SELECT set_config('hnsw.ef_search', '{beam}', true), "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true)"
            ]
        return [
            f"SELECT set_config('ivfflat.probes', '{beam}', true), "
            "set_config('ivfflat.iterative_scan', 'relaxed_order', true)"
        ]


def real_embeddings(corpora: Path) -> tuple[np.ndarray, np.ndarray]:
    embedder = get_embedder()
    texts, questions = [], []
    for root in sorted(p for p in corpora.iterdir() if (p / "docs").is_dir()):
        for item in read_corpus(root):
            if isinstance(item, SourceDocument):
                parsed, _ = parse_source(item)
                texts += [chunk.text for chunk in chunk_document(parsed)]
        questions += [
            json.loads(line)["question"] for line in (root / "questions.jsonl").read_text().splitlines() if line.strip()
        ]
    return embedder.encode(texts), embedder.encode(questions)


def synthetic(centres: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = centres[rng.integers(0, len(centres), count)]
    # noise of norm ~0.9 per vector: cosine to its centre ~0.75
    noise = rng.standard_normal((count, DIM)).astype(np.float32) * (0.9 / np.sqrt(DIM))
    vectors = picks + noise
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def load(conn: psycopg.Connection, collection: int, document: int, vectors: np.ndarray, offset: int) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY chunks (document_id, collection_id, ordinal, text, embedding, embedding_dim) "
            "FROM STDIN WITH (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["int8", "int8", "int4", "text", "vector", "int4"])
        for i, vector in enumerate(vectors):
            copy.write_row((document, collection, offset + i, "", vector, DIM))


def exact_top10(conn: psycopg.Connection, collection: int, queries: np.ndarray, size: int) -> list[set[int]]:
    """The exact top 10 of every query (a sequential scan), kept in `bench_exact` for later runs."""
    conn.execute("CREATE TABLE IF NOT EXISTS bench_exact (size int, query int, ids int8[], PRIMARY KEY (size, query))")
    stored = {
        row[0]: set(row[1])
        for row in conn.execute("SELECT query, ids FROM bench_exact WHERE size = %s", (size,)).fetchall()
    }
    with conn.cursor() as cur:
        cur.execute("SET enable_indexscan = off")
        cur.execute("SET enable_bitmapscan = off")
        for i, query in enumerate(queries):
            if i not in stored:
                cur.execute(EXACT_SQL, {"collection": collection, "query": query})
                stored[i] = {row[0] for row in cur.fetchall()}
                cur.execute("INSERT INTO bench_exact VALUES (%s, %s, %s)", (size, i, sorted(stored[i])))
        cur.execute("RESET enable_indexscan")
        cur.execute("RESET enable_bitmapscan")
    return [stored[i] for i in range(len(queries))]


def timed(search, queries, exact: list[set[int]], backend_pid: int) -> dict:
    """Recall@10 and latency of `search(query) -> ids` over the queries, after 5 warm-up queries, with
    the machine's CPU busy share (all cores, every process) meanwhile, and the CPU time the Postgres
    backend spent per query (what other load on the machine does not change, unlike the latency)."""
    for query in queries[:5]:  # the first touches of pages and of the code path are not the steady state
        search(query)
    approx, latencies = [], []
    backend = psutil.Process(backend_pid)
    cpu_before = sum(backend.cpu_times()[:2])
    psutil.cpu_percent(interval=None)
    load_before = os.getloadavg()[0]
    for query in queries:
        started = time.perf_counter()
        found = set(search(query)[:10])
        latencies.append(time.perf_counter() - started)
        approx.append(found)
    busy = psutil.cpu_percent(interval=None)
    backend_cpu_ms = (sum(backend.cpu_times()[:2]) - cpu_before) * 1000 / len(queries)
    recall = np.mean([len(a & e) / len(e) for a, e in zip(approx, exact, strict=True)])
    latencies_ms = np.array(latencies) * 1000
    return {
        "recall@10": round(float(recall), 4),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2),
        "backend_cpu_ms_per_query": round(backend_cpu_ms, 2),
        "machine_cpu_busy_pct": round(busy, 1),
        "loadavg_1m": round((load_before + os.getloadavg()[0]) / 2, 2),
    }


def measure_production(engine, queries: np.ndarray, exact: list[set[int]], probes: int, collection_id: int = 1) -> dict:
    """`vector_ranks` as the retriever calls it (one session, a transaction per question)."""
    os.environ["M2IO_IVFFLAT_PROBES"] = str(probes)
    get_settings.cache_clear()
    collection = Collection(id=collection_id, name="scale", embedding_model="synthetic", embedding_dim=DIM)
    literals = [vector_literal(query) for query in queries]  # made before a question's search, too
    with Session(engine) as session:

        def search(literal: str) -> list[int]:
            ids = vector_ranks(session, "chunks", collection, literal, POOL)
            session.rollback()
            return ids

        session.execute(text(f"SET LOCAL ivfflat.probes = {probes}"))
        plan = " ".join(
            row[0]
            for row in session.execute(
                text("EXPLAIN " + vector_search_sql("chunks", DIM)),
                {"collection": collection_id, "query": literals[0], "limit": POOL},
            )
        )
        session.rollback()
        pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        session.rollback()
        result = timed(search, literals, exact, pid)
    return {"probes": probes, **result, "uses_index": PRODUCTION_INDEX in plan}


def measure_variant(
    conn: psycopg.Connection, config: IndexConfig, queries: np.ndarray, exact: list[set[int]], beam: int
) -> dict:
    """The variant's query, in a transaction with its SET LOCALs, as production would run it."""
    sql = config.search_sql()

    def search(query) -> list[int]:
        with conn.transaction(), conn.cursor() as cur:
            for statement in config.session_settings(beam):
                cur.execute(statement)
            cur.execute(sql, {"collection": 1, "query": query})
            return [row[0] for row in cur.fetchall()]

    with conn.transaction(), conn.cursor() as cur:
        for statement in config.session_settings(beam):
            cur.execute(statement)
        cur.execute("EXPLAIN " + sql, {"collection": 1, "query": queries[0]})
        plan = " ".join(row[0] for row in cur.fetchall())
    result = timed(search, queries, exact, conn.info.backend_pid)
    return {("ef_search" if config.method == "hnsw" else "probes"): beam, **result, "uses_index": VARIANT_INDEX in plan}


def small_collection(conn: psycopg.Connection, engine, centres: np.ndarray, queries: np.ndarray, args) -> dict:
    """A second, small collection in the same table (the case of many collections in one index): its rows
    join the lists they fall in, and a search filtered to it reads further lists (iterative scan) until
    it has found LIMIT rows of it, up to `ivfflat_max_probes`. Exact top 10 by numpy over its rows."""
    rows = args.small_collection
    if not conn.execute("SELECT 1 FROM collections WHERE id = 2").fetchone():
        conn.execute(
            "INSERT INTO collections (name, embedding_model, embedding_dim) VALUES ('small', 'synthetic', 384)"
        )
        conn.execute("INSERT INTO documents (collection_id, doc_key, content_sha256, text) VALUES (2, 'd2', '-', '')")
    if conn.execute("SELECT count(*) FROM chunks WHERE collection_id = 2").fetchone()[0] != rows:
        conn.execute("DELETE FROM chunks WHERE collection_id = 2")
        document = conn.execute("SELECT id FROM documents WHERE collection_id = 2").fetchone()[0]
        load(conn, 2, document, synthetic(centres, rows, seed=10**9), offset=0)
        conn.execute("ANALYZE chunks")
    stored = conn.execute("SELECT id, embedding FROM chunks WHERE collection_id = 2 ORDER BY id").fetchall()
    ids = np.array([row[0] for row in stored])
    vectors = np.stack([np.asarray(row[1].to_numpy(), dtype=np.float32) for row in stored])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    normed = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = [set(ids[np.argsort(-(vectors @ query))[:10]].tolist()) for query in normed]
    return {"rows": rows, "runs": [measure_production(engine, queries, exact, probes, 2) for probes in args.probes]}


def built_index(conn: psycopg.Connection) -> tuple[str, str] | None:
    row = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE indexname = ANY(%s)", (list(ALL_INDEXES),)
    ).fetchone()
    return (row[0], row[1]) if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--index", choices=["production", "hnsw", "ivfflat"], default="production")
    parser.add_argument("--halfvec", action="store_true", help="variants: index embedding::halfvec(384)")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--lists", type=int, nargs="+", help="ivfflat variant: lists per size (default sqrt(rows))")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100])
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--maintenance-work-mem", default="3GB", help="variants' builds")
    parser.add_argument("--parallel-workers", type=int, default=2, help="variants: max_parallel_maintenance_workers")
    parser.add_argument("--small-collection", type=int, help="production: also time a second collection of N rows")
    parser.add_argument("--db", help="database name (default: a new one); reused when it exists")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database afterwards")
    parser.add_argument("--query-only", action="store_true", help="time the index already built in --db")
    parser.add_argument("--embeddings-cache", type=Path, help=".npz of the centres and questions, made once")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("--out", type=Path, help="JSON results; appended to a list when the file exists")
    args = parser.parse_args()
    url = get_settings().require_database_url().replace("postgresql+psycopg://", "postgresql://")
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    database = args.db or f"m2io_bench_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
            admin.execute(f'CREATE DATABASE "{database}"')
    bench_url = url.rsplit("/", 1)[0] + f"/{database}"
    engine = create_engine(bench_url.replace("postgresql://", "postgresql+psycopg://"))
    if not args.query_only:  # a migration could replace the index to be timed
        upgrade(bench_url.replace("postgresql://", "postgresql+psycopg://"))
    if args.embeddings_cache and args.embeddings_cache.exists():
        cached = np.load(args.embeddings_cache)
        centres, questions = cached["centres"], cached["questions"]
    else:
        centres, questions = real_embeddings(args.corpora)
        if args.embeddings_cache:
            np.savez(args.embeddings_cache, centres=centres, questions=questions)
    queries = questions[: args.queries]
    lists = dict(zip(sorted(args.sizes), args.lists or [], strict=False))
    report = {"label": args.label, "database": database, "centres": len(centres), "queries": len(queries), "sizes": {}}
    try:
        with psycopg.connect(bench_url, autocommit=True) as conn:
            register_vector(conn)
            if not conn.execute("SELECT 1 FROM collections WHERE id = 1").fetchone():
                conn.execute(
                    "INSERT INTO collections (name, embedding_model, embedding_dim) VALUES ('scale', 'synthetic', 384)"
                )
                conn.execute(
                    "INSERT INTO documents (collection_id, doc_key, content_sha256, text) VALUES (1, 'd', '-', '')"
                )
            loaded = conn.execute("SELECT count(*) FROM chunks WHERE collection_id = 1").fetchone()[0]
            for size in sorted(args.sizes):
                if loaded > size:
                    raise SystemExit(f"{database} holds {loaded} chunks, more than {size}: use another --db")
                config = IndexConfig(
                    method=args.index,
                    halfvec=args.halfvec,
                    m=args.m,
                    ef_construction=args.ef_construction,
                    lists=lists.get(size, lists_for(size)),
                )
                entry: dict = {"index": asdict(config)}
                if args.query_only:
                    if loaded != size:
                        raise SystemExit(f"--query-only: {database} holds {loaded} chunks, not {size}")
                else:
                    if args.index != "production":
                        for name in ALL_INDEXES:  # loads faster without, and no other index may serve the query
                            conn.execute(f"DROP INDEX IF EXISTS {name}")
                    started = time.perf_counter()
                    for start in range(loaded, size, 100_000):
                        count = min(100_000, size - start)
                        load(conn, 1, 1, synthetic(centres, count, seed=start), offset=start)
                    if loaded < size:
                        entry["load_seconds"] = round(time.perf_counter() - started, 1)
                        conn.execute("VACUUM ANALYZE chunks")
                    loaded = size
                    psutil.cpu_percent(interval=None)
                    started = time.perf_counter()
                    if args.index == "production":
                        for name in ALL_INDEXES[1:]:
                            conn.execute(f"DROP INDEX IF EXISTS {name}")
                        # what the refresh after an ingest run does (CREATE INDEX CONCURRENTLY, then the swap)
                        if not rebuild(engine, "chunks", DIM, lists_for(size)):
                            raise SystemExit("the production rebuild failed (see the log)")
                    else:
                        conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
                        conn.execute(f"SET max_parallel_maintenance_workers = {args.parallel_workers}")
                        conn.execute(config.create_sql())
                    entry["index_build_seconds"] = round(time.perf_counter() - started, 1)
                    entry["build_machine_cpu_busy_pct"] = round(psutil.cpu_percent(interval=None), 1)
                    conn.execute("ANALYZE chunks")
                built = built_index(conn)
                if built is None:
                    raise SystemExit(f"{database} has no vector index to time")
                entry["index_sql"] = built[1]
                entry["index_mb"] = round(
                    conn.execute("SELECT pg_relation_size(%s)", (built[0],)).fetchone()[0] / 2**20, 1
                )
                entry["shared_buffers"] = conn.execute("SHOW shared_buffers").fetchone()[0]
                # read the whole index (and the table) once, so that the latency runs see them in shared_buffers
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
                conn.execute("SELECT pg_prewarm(%s), pg_prewarm('chunks')", (built[0],))
                exact = exact_top10(conn, 1, queries, size)
                if args.index == "production":
                    entry["runs"] = [measure_production(engine, queries, exact, probes) for probes in args.probes]
                else:
                    beams = args.ef_search if config.method == "hnsw" else args.probes
                    entry["runs"] = [measure_variant(conn, config, queries, exact, beam) for beam in beams]
                if args.small_collection and args.index == "production":
                    entry["small_collection"] = small_collection(conn, engine, centres, queries, args)
                report["sizes"][str(size)] = entry
                print(size, json.dumps(entry), flush=True)
    finally:
        engine.dispose()
        if not args.keep_db:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.out.read_text()) if args.out.exists() else []
        previous = previous if isinstance(previous, list) else [previous]
        args.out.write_text(json.dumps([*previous, report], indent=2) + "\n")


if __name__ == "__main__":
    main()
