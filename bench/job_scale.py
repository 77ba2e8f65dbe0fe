"""Job scale: a job of 10,000 questions, submitted, looked at and exported as a user does it.

What is measured (each `m2io` command in a subprocess of its own, its peak RSS read from `os.wait4`):
- `m2io submit QUESTIONS.jsonl --collection C`: wall seconds and peak RSS; the messages it published
  are counted on the retriever queue (no worker runs: they stay there, and are dropped at the end);
- the read model on the fresh job (every query `queued`): `job_status()` in this process, p50 of a few
  calls, and `m2io status JOB` (a subprocess: interpreter start and imports included);
- the same on the job once every query is answered. No worker runs 10,000 questions here in
  reasonable time on a laptop, so the answers are made in SQL: a few of the recipes questions are
  answered for real first (the four stage tasks' own code, in this process, as bench/job_load.py's
  in-process run does), then each of the 10,000 queries gets a copy of one of those answers (its stage
  runs, with the times shifted to its own submission, and its answer row, whose HTML in S3 it shares);
- `m2io export JOB --out DIR` of that answered job: wall seconds, peak RSS, files written.

Questions: the recipes corpus's questions (../shared/corpora/recipes), cycled to the count with ids
`<id>#<cycle>`, asked of one collection (`bench-jobscale-recipes`, ingested here if missing).

Run against the servers of a local cluster with no workers running (so no worker takes the job's
messages), e.g. a cluster of its own:
    export M2IO_STATE_DIR=/tmp/m2io-jobscale M2IO_LOCAL_POSTGRES_PORT=25432 \
        M2IO_LOCAL_REDIS_PORT=26379 M2IO_LOCAL_S3_PORT=28333 M2IO_REDIS_URL=redis://127.0.0.1:26379/0
    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m bench.job_scale --start-servers --label after \
        [--questions 10000] [--out bench/results/job_scale.json]
    m2io down    # with the same environment
`--start-servers` starts Postgres, Redis and S3 (no workers, no dashboard) unless they run, and
migrates. Each run is recorded under its `--label` in the results file (`before` / `after` a change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from services.common.db import session_scope
from services.common.settings import get_settings

CORPUS = Path(os.environ.get("M2IO_BENCH_CORPUS", Path(__file__).resolve().parents[2] / "shared/corpora/recipes"))
COLLECTION = "bench-jobscale-recipes"
REPO = Path(__file__).resolve().parents[1]


def start_servers() -> None:
    """Postgres, Redis and S3 of the configured local cluster (no workers), migrated; this process's
    environment then points at them."""
    from infra.cluster import LocalCluster, read_env_file, write_env_file

    settings = get_settings()
    if "M2IO_REDIS_URL" not in os.environ:  # a Redis of its own, never one that happens to answer on 6379
        os.environ["M2IO_REDIS_URL"] = f"redis://127.0.0.1:{settings.local_redis_port}/0"
        get_settings.cache_clear()
    cluster = LocalCluster(get_settings(), start_dashboard=False)
    env = read_env_file(cluster.env_file)
    cluster.ensure_servers(env, print)
    write_env_file(cluster.env_file, env)
    cluster.migrate(env, print)
    os.environ.update(env)
    get_settings.cache_clear()


def ensure_collection() -> None:
    from bench.job_load import collection_exists
    from bench.retrieval_quality import ingest_corpus
    from services.common.embedding import DEFAULT_EMBEDDING_MODEL

    if collection_exists(COLLECTION):
        return
    print(f"ingesting {CORPUS} as {COLLECTION} ...", flush=True)
    print(ingest_corpus(CORPUS, COLLECTION, DEFAULT_EMBEDDING_MODEL), flush=True)


def write_questions(path: Path, count: int) -> list[dict[str, Any]]:
    base = [json.loads(line) for line in (CORPUS / "questions.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for n in range(count):
        record = dict(base[n % len(base)])
        record["id"] = f"{record['id']}#{n // len(base)}"
        records.append(record)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return base


GNU_TIME = Path("/usr/bin/time")


def measured(*args: str) -> dict[str, Any]:
    """`m2io ARGS` in a subprocess: wall seconds, peak RSS (MiB), return code, last stdout line.

    The peak RSS is GNU time's (`%M`, from the wait4 of a child it forked itself): the wait4 of a child
    of this process would count the pages it shared with this process (which holds the embedding model)
    between its fork and its exec. Without /usr/bin/time it falls back to that, and says so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        usage_file = Path(scratch) / "rss"
        argv = [sys.executable, "-m", "services.cli", *args]
        if GNU_TIME.exists():
            argv = [str(GNU_TIME), "-f", "%M", "-o", str(usage_file), *argv]
        with open(Path(scratch) / "out", "w+b") as out, open(Path(scratch) / "err", "w+b") as err:
            started = time.perf_counter()
            process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
            _, code, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(code)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        by_gnu_time = usage_file.exists()
        peak_kib = int(usage_file.read_text().split()[-1]) if by_gnu_time else usage.ru_maxrss
    if process.returncode not in (0, 1):
        raise RuntimeError(f"m2io {' '.join(args)} exited {process.returncode}: {stderr[-2000:]}")
    lines = stdout.strip().splitlines()
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),  # KiB on Linux
        "peak_rss_from": "gnu time" if by_gnu_time else "wait4 (includes pages shared before exec)",
        "rc": process.returncode,
        "last_line": lines[-1] if lines else "",
        "stderr_tail": stderr[-300:],
    }


def status_latency(job_id: str, calls: int) -> dict[str, Any]:
    from services.jobs.status import job_status

    job_status(job_id)  # the first call pays for imports and the connection pool
    in_process = []
    for _ in range(calls):
        started = time.perf_counter()
        status = job_status(job_id)
        in_process.append(time.perf_counter() - started)
    cli = [measured("status", job_id)["seconds"] for _ in range(3)]
    # The same command on a job that does not exist: the interpreter, the imports and one lookup, which
    # every `m2io` command pays; what `cli_status_p50_s` adds to it is the job's status.
    baseline = [measured("status", "00000000-0000-0000-0000-000000000000")["seconds"] for _ in range(3)]
    return {
        "state": status.state,
        "counts": status.counts,
        "job_status_p50_s": round(statistics.median(in_process), 4),
        "job_status_max_s": round(max(in_process), 4),
        "cli_status_p50_s": round(statistics.median(cli), 3),
        "cli_unknown_job_p50_s": round(statistics.median(baseline), 3),
    }


def queue_length(queue: str) -> int:
    import redis

    return redis.Redis.from_url(get_settings().redis_url).llen(queue)


def drop_queue(queue: str) -> None:
    import redis

    redis.Redis.from_url(get_settings().redis_url).delete(queue)


def answer_templates(records: list[dict[str, Any]], count: int) -> str:
    """A small job answered for real by the four stage tasks' code, in this process; its id."""
    from sqlalchemy import select

    from services.common.celery_app import app
    from services.common.models import Query
    from services.common.queues import PIPELINE, Stage
    from services.generator.tasks import generate_for_query
    from services.inserter.tasks import insert_for_query
    from services.jobs.commands import job_config, submit_job
    from services.jobs.questions import from_records
    from services.merger.tasks import merge_for_query
    from services.retriever.tasks import retrieve_for_query

    tasks = {
        Stage.RETRIEVER: retrieve_for_query,
        Stage.GENERATOR: generate_for_query,
        Stage.INSERTER: insert_for_query,
        Stage.MERGER: merge_for_query,
    }
    app.send_task = lambda *args, **kwargs: None  # this loop calls the next task itself
    config = job_config(COLLECTION, generator="extractive", inserter="rule")
    job_id = submit_job(from_records(records[:count]), config, name="bench job_scale templates", enqueue=False)
    with session_scope() as session:
        ids = session.scalars(select(Query.id).where(Query.job_id == job_id).order_by(Query.line)).all()
    for query_id in ids:
        for stage in PIPELINE:
            tasks[stage].run({"query_id": str(query_id)})
    return str(job_id)


def answer_in_sql(job_id: str, templates: str) -> dict[str, Any]:
    """Every query of `job_id` answered as one of the template job's queries (cycled by line)."""
    started = time.perf_counter()
    mapping = """
        WITH q AS (SELECT id, created_at, row_number() OVER (ORDER BY line) - 1 AS n FROM queries
                   WHERE job_id = :job),
             t AS (SELECT id, created_at, row_number() OVER (ORDER BY line) - 1 AS n FROM queries
                   WHERE job_id = :templates),
             m AS (SELECT q.id, q.created_at, q.n, t.id AS template, t.created_at AS template_created
                   FROM q JOIN t ON t.n = q.n % (SELECT count(*) FROM t))
    """
    with session_scope() as session:
        session.execute(
            text(
                mapping
                + """
            INSERT INTO stage_runs (query_id, stage, attempt, status, worker, started_at, finished_at, output)
            SELECT m.id, s.stage, 1, 'succeeded', s.worker,
                   m.created_at + (s.started_at - m.template_created) + m.n * interval '20 ms',
                   m.created_at + (s.finished_at - m.template_created) + m.n * interval '20 ms', s.output
            FROM m JOIN stage_runs s ON s.query_id = m.template AND s.status = 'succeeded'
        """
            ),
            {"job": job_id, "templates": templates},
        )
        session.execute(
            text(
                mapping
                + """
            INSERT INTO answers (query_id, markdown, blocks, html_key)
            SELECT m.id, a.markdown, a.blocks, a.html_key FROM m JOIN answers a ON a.query_id = m.template
        """
            ),
            {"job": job_id, "templates": templates},
        )
        session.execute(
            text(
                "UPDATE queries SET status = 'succeeded', updated_at = created_at + (line * interval '20 ms') + "
                "interval '1 s' WHERE job_id = :job"
            ),
            {"job": job_id},
        )
        session.execute(text("ANALYZE queries; ANALYZE stage_runs; ANALYZE answers"))
    return {"seconds": round(time.perf_counter() - started, 2)}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=10_000)
    parser.add_argument("--templates", type=int, default=20, help="questions answered for real, then copied")
    parser.add_argument("--status-calls", type=int, default=5)
    parser.add_argument("--label", default="after")
    parser.add_argument("--start-servers", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "job_scale.json")
    args = parser.parse_args()
    if args.start_servers:
        start_servers()
    ensure_collection()
    work = Path(tempfile.mkdtemp(prefix="m2io-jobscale-"))
    questions = work / "questions.jsonl"
    base = write_questions(questions, args.questions)
    drop_queue("retriever")
    run: dict[str, Any] = {"questions": args.questions, "commit": git_commit(), "machine": platform.node()}
    run["at"] = datetime.now(UTC).isoformat(timespec="seconds")

    submitted = measured("submit", str(questions), "--collection", COLLECTION)
    job_id = submitted.pop("last_line")
    run["submit"] = {**submitted, "messages_published": queue_length("retriever")}
    print("submit", run["submit"], flush=True)
    drop_queue("retriever")  # no worker takes them: the answers are made below
    run["status_fresh"] = status_latency(job_id, args.status_calls)
    print("status (fresh)", run["status_fresh"], flush=True)

    templates = answer_templates(base, args.templates)
    run["answer_in_sql"] = answer_in_sql(job_id, templates)
    run["status_answered"] = status_latency(job_id, args.status_calls)
    print("status (answered)", run["status_answered"], flush=True)

    out_dir = work / "export"
    exported = measured("export", job_id, "--out", str(out_dir))
    exported.pop("last_line")
    run["export"] = {**exported, "files": sum(1 for p in out_dir.rglob("*") if p.is_file())}
    print("export", run["export"], flush=True)
    run["job_id"] = job_id

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out} [{args.label}]")


if __name__ == "__main__":
    main()
