"""Vector search at scale: latency p50/p99 and recall@10 against exact search, at 100k and 1M vectors.

Runs in its own database (created on the configured server and migrated with our migrations), so
the index measured is the production one: the partial expression index on `chunks` for 384-d
vectors, queried with the same SQL as `services.retriever.search.vector_ranks`. Other index
configurations (`--index`, `--m`, `--ef-construction`, `--lists`, `--halfvec`) replace it for the
run, under the same name, with the query they need.

Data: real all-MiniLM-L6-v2 embeddings of the corpora's chunks serve as cluster centres; each
synthetic vector is a centre plus Gaussian noise (cosine ~0.75 to its centre), so the set has the
clustered structure of real text embeddings. Queries are the embeddings of the corpora's
questions (real, held out from the data). Exact top-10 comes from a sequential scan (computed
once per size and kept in the database, table `bench_exact`).

Each latency run records the whole machine's CPU busy share while it ran (psutil): the machine is
shared, and other load makes latencies pessimistic.

    .venv/bin/python bench/search_scale.py --sizes 100000 1000000 [--out bench/results/search.json]
    # keep the database, then time other beams on the built index without rebuilding it:
    .venv/bin/python bench/search_scale.py --sizes 1000000 --db m2io_bench_1m --keep-db --halfvec
    .venv/bin/python bench/search_scale.py --sizes 1000000 --db m2io_bench_1m --keep-db --halfvec \
        --query-only --ef-search 200 400
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

from infra.migrate import upgrade
from services.common.embedding import get_embedder
from services.common.settings import get_settings
from services.retriever.chunking import chunk_document
from services.retriever.importers import parse_source, read_corpus
from services.retriever.sources import SourceDocument

DEFAULT_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
DIM = 384
INDEX_NAME = "ix_chunks_embedding_hnsw_384"  # the migrations' name, whatever the method
EXACT_SQL = (
    "SELECT id FROM chunks WHERE collection_id = %(collection)s AND embedding_dim = 384 "
    "ORDER BY embedding::vector(384) <=> %(query)s::vector(384) LIMIT 10"
)


@dataclass(frozen=True)
class IndexConfig:
    method: str = "hnsw"  # or "ivfflat"
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
            f"CREATE INDEX {INDEX_NAME} ON chunks USING {self.method} ((embedding::{self.cast}) {ops}) "
            f"WITH ({params}) WHERE embedding_dim = {DIM}"
        )

    def search_sql(self) -> str:
        return (
            f"SELECT id FROM chunks WHERE collection_id = %(collection)s AND embedding_dim = {DIM} "
            f"ORDER BY embedding::{self.cast} <=> %(query)s::vector({DIM})::{self.cast} LIMIT 10"
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


def measure(
    conn: psycopg.Connection,
    config: IndexConfig,
    collection: int,
    queries: np.ndarray,
    exact: list[set[int]],
    beam: int,
) -> dict:
    """Each query as production runs it: a transaction with the index's SET LOCALs, then the search."""
    sql = config.search_sql()
    with conn.transaction(), conn.cursor() as cur:
        for statement in config.session_settings(beam):
            cur.execute(statement)
        cur.execute("EXPLAIN " + sql, {"collection": collection, "query": queries[0]})
        plan = " ".join(row[0] for row in cur.fetchall())
    for query in queries[:5]:  # warm-up: the first touches of the index pages are not the steady state
        with conn.transaction(), conn.cursor() as cur:
            for statement in config.session_settings(beam):
                cur.execute(statement)
            cur.execute(sql, {"collection": collection, "query": query})
    approx, latencies = [], []
    psutil.cpu_percent(interval=None)
    load_before = os.getloadavg()[0]
    for query in queries:
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for statement in config.session_settings(beam):
                cur.execute(statement)
            cur.execute(sql, {"collection": collection, "query": query})
            found = {row[0] for row in cur.fetchall()}
        latencies.append(time.perf_counter() - started)
        approx.append(found)
    busy = psutil.cpu_percent(interval=None)
    recall = np.mean([len(a & e) / len(e) for a, e in zip(approx, exact, strict=True)])
    latencies_ms = np.array(latencies) * 1000
    return {
        ("ef_search" if config.method == "hnsw" else "probes"): beam,
        "recall@10": round(float(recall), 4),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2),
        "machine_cpu_busy_pct": round(busy, 1),
        "loadavg_1m": round((load_before + os.getloadavg()[0]) / 2, 2),
        "uses_index": INDEX_NAME in plan,
    }


def index_definition(conn: psycopg.Connection) -> str | None:
    row = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (INDEX_NAME,)).fetchone()
    return row[0] if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--index", choices=["hnsw", "ivfflat"], default="hnsw")
    parser.add_argument("--halfvec", action="store_true", help="index embedding::halfvec(384)")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--lists", type=int, nargs="+", help="ivfflat lists, one per size (default rows/1000)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100])
    parser.add_argument("--probes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--maintenance-work-mem", default="3GB")
    parser.add_argument("--parallel-workers", type=int, default=2, help="max_parallel_maintenance_workers")
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
            loaded = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
            for size in sorted(args.sizes):
                if loaded > size:
                    raise SystemExit(f"{database} holds {loaded} chunks, more than {size}: use another --db")
                config = IndexConfig(
                    method=args.index,
                    halfvec=args.halfvec,
                    m=args.m,
                    ef_construction=args.ef_construction,
                    lists=lists.get(size, max(size // 1000, 10)),
                )
                entry: dict = {"index": asdict(config), "index_sql": config.create_sql()}
                if args.query_only:
                    if loaded != size:
                        raise SystemExit(f"--query-only: {database} holds {loaded} chunks, not {size}")
                    built = index_definition(conn)
                    entry["index_sql"] = built
                else:
                    conn.execute(f"DROP INDEX IF EXISTS {INDEX_NAME}")
                    started = time.perf_counter()
                    for start in range(loaded, size, 100_000):
                        count = min(100_000, size - start)
                        load(conn, 1, 1, synthetic(centres, count, seed=start), offset=start)
                    if loaded < size:
                        entry["load_seconds"] = round(time.perf_counter() - started, 1)
                        conn.execute("VACUUM ANALYZE chunks")
                    loaded = size
                    conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
                    conn.execute(f"SET max_parallel_maintenance_workers = {args.parallel_workers}")
                    psutil.cpu_percent(interval=None)
                    started = time.perf_counter()
                    conn.execute(config.create_sql())
                    entry["index_build_seconds"] = round(time.perf_counter() - started, 1)
                    entry["build_machine_cpu_busy_pct"] = round(psutil.cpu_percent(interval=None), 1)
                    conn.execute("ANALYZE chunks")
                entry["index_mb"] = round(
                    conn.execute("SELECT pg_relation_size(%s)", (INDEX_NAME,)).fetchone()[0] / 2**20, 1
                )
                # read the whole index (and the table) once, so that the latency runs see it in shared_buffers
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
                conn.execute("SELECT pg_prewarm(%s), pg_prewarm('chunks')", (INDEX_NAME,))
                exact = exact_top10(conn, 1, queries, size)
                beams = args.ef_search if config.method == "hnsw" else args.probes
                entry["runs"] = [measure(conn, config, 1, queries, exact, beam) for beam in beams]
                report["sizes"][str(size)] = entry
                print(size, json.dumps(entry), flush=True)
    finally:
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
