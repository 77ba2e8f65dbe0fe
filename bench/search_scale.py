"""Vector search at scale: latency p50/p99 and recall@10 against exact search, at 100k and 1M vectors.

Runs in its own database (created on the configured server and migrated with our migrations), so
the index measured is the production one: the partial HNSW expression index on `chunks` for
384-d vectors, queried with the same SQL as `services.retriever.search.vector_ranks`.

Data: real all-MiniLM-L6-v2 embeddings of the corpora's chunks serve as cluster centres; each
synthetic vector is a centre plus Gaussian noise (cosine ~0.75 to its centre), so the set has the
clustered structure of real text embeddings. Queries are the embeddings of the corpora's
questions (real, held out from the data). Exact top-10 comes from a sequential scan.

    .venv/bin/python bench/search_scale.py --sizes 100000 1000000 [--out bench/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import numpy as np
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
INDEX_SQL = (
    "CREATE INDEX ix_chunks_embedding_hnsw_384 ON chunks "
    "USING hnsw ((embedding::vector(384)) vector_cosine_ops) WHERE embedding_dim = 384"
)
SEARCH_SQL = (
    "SELECT id FROM chunks WHERE collection_id = %(collection)s AND embedding_dim = 384 "
    "ORDER BY embedding::vector(384) <=> %(query)s::vector(384) LIMIT 10"
)


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


def measure(conn: psycopg.Connection, collection: int, queries: np.ndarray, ef_search: int) -> dict:
    exact, approx, latencies = [], [], []
    with conn.cursor() as cur:
        cur.execute("SET enable_indexscan = off")
        cur.execute("SET enable_bitmapscan = off")
        for query in queries:
            cur.execute(SEARCH_SQL, {"collection": collection, "query": query})
            exact.append({row[0] for row in cur.fetchall()})
        cur.execute("RESET enable_indexscan")
        cur.execute("RESET enable_bitmapscan")
        cur.execute(f"SET hnsw.ef_search = {ef_search}")
        cur.execute("SET hnsw.iterative_scan = relaxed_order")
        cur.execute("EXPLAIN " + SEARCH_SQL, {"collection": collection, "query": queries[0]})
        plan = " ".join(row[0] for row in cur.fetchall())
        for query in queries:
            started = time.perf_counter()
            cur.execute(SEARCH_SQL, {"collection": collection, "query": query})
            found = {row[0] for row in cur.fetchall()}
            latencies.append(time.perf_counter() - started)
            approx.append(found)
    recall = np.mean([len(a & e) / len(e) for a, e in zip(approx, exact, strict=True)])
    latencies_ms = np.array(latencies) * 1000
    return {
        "ef_search": ef_search,
        "recall@10": round(float(recall), 4),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2),
        "uses_hnsw_index": "ix_chunks_embedding_hnsw_384" in plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()
    url = get_settings().require_database_url().replace("postgresql+psycopg://", "postgresql://")
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    database = f"m2io_bench_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    bench_url = url.rsplit("/", 1)[0] + f"/{database}"
    upgrade(bench_url.replace("postgresql://", "postgresql+psycopg://"))
    centres, questions = real_embeddings(args.corpora)
    queries = questions[: args.queries]
    report = {"centres": len(centres), "queries": len(queries), "sizes": {}}
    try:
        with psycopg.connect(bench_url, autocommit=True) as conn:
            register_vector(conn)
            conn.execute(
                "INSERT INTO collections (name, embedding_model, embedding_dim) VALUES ('scale', 'synthetic', 384)"
            )
            conn.execute(
                "INSERT INTO documents (collection_id, doc_key, content_sha256, text) VALUES (1, 'd', '-', '')"
            )
            loaded = 0
            for size in sorted(args.sizes):
                conn.execute("DROP INDEX IF EXISTS ix_chunks_embedding_hnsw_384")
                started = time.perf_counter()
                for start in range(loaded, size, 100_000):
                    count = min(100_000, size - start)
                    load(conn, 1, 1, synthetic(centres, count, seed=start), offset=start)
                load_seconds = time.perf_counter() - started
                loaded = size
                conn.execute("SET maintenance_work_mem = '6GB'")
                conn.execute("SET max_parallel_maintenance_workers = 2")
                started = time.perf_counter()
                conn.execute(INDEX_SQL)
                build_seconds = time.perf_counter() - started
                conn.execute("VACUUM ANALYZE chunks")
                entry = {
                    "load_seconds": round(load_seconds, 1),
                    "index_build_seconds": round(build_seconds, 1),
                    "runs": [measure(conn, 1, queries, ef) for ef in args.ef_search],
                }
                report["sizes"][str(size)] = entry
                print(size, json.dumps(entry), flush=True)
    finally:
        if not args.keep:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
