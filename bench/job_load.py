"""Job load: a job of 1,000 questions through the four queues, against the same task code in one process.

Runs (each recorded under its own key in the results file, so runs can be made one at a time):
- `in-process`: the job's rows are stored as `m2io submit` stores them (no message sent), then this
  process runs each query through the four stage tasks' own code, in order — validation, stage-run
  bookkeeping, reading the previous stages' outputs from Postgres, retrieve / generate / insert /
  merge, the three S3 puts and the answer row. Only the broker hop is replaced: the hand-on to the
  next queue is recorded instead of sent, and the next task is called directly.
- `cluster:N`: the local cluster's workers are restarted with N processes per stage, warmed up with a
  small job (models loaded in every pool process), then the job is submitted with the client and
  waited for.
Both are measured the same way: `JobStatus` from the job's query and stage-run rows (throughput,
per-stage p50/p99 and queue wait, end-to-end p50/p99), plus the CPU seconds of every process
involved (psutil) and of the whole machine, to see where the time goes and how busy the cores were.

Questions: both corpora of ../shared/corpora (124 + 80), shuffled once (seeded) and cycled to the
requested count with ids `<id>#<cycle>`; each question asks its own corpus's collection
(`bench-<corpus>`, ingested in this process if missing). Backends: extractive generator, rule
inserter. The in-process run may take fewer questions (the first M of the same sequence).

Run against a local cluster (`m2io up --no-dashboard`); it restarts that cluster's workers:
    PYTHONPATH=. python -m bench.job_load --runs in-process cluster:1 cluster:2 \
        [--questions 1000] [--in-process-questions 1000] [--torch-threads K] [--suffix S] \
        [--out bench/results/job_load.json]
BENCH_WORKER_ARGS="--pool solo" (say) adds options to the restarted workers, to compare pools and bootsteps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.retrieval_quality import DEFAULT_CORPORA, ingest_corpus
from services.common.db import session_scope
from services.common.embedding import DEFAULT_EMBEDDING_MODEL, get_embedder
from services.common.queues import ANSWER_TASKS, PIPELINE, Stage, next_stage
from services.common.settings import get_settings, load_settings
from services.retriever.search import UnknownCollection, get_collection

GENERATOR, INSERTER = "extractive", "rule"
SERVERS = ("postgres", "redis", "s3")


# ---------------------------------------------------------------- questions
def build_questions(corpora: Path, count: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    base: list[dict[str, Any]] = []
    per_corpus: dict[str, int] = {}
    for root in sorted(p for p in corpora.iterdir() if (p / "questions.jsonl").exists()):
        lines = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines() if line.strip()]
        per_corpus[root.name] = len(lines)
        for record in lines:
            base.append({**record, "collection": f"bench-{root.name}"})
    random.Random(seed).shuffle(base)
    questions = [{**base[i % len(base)], "id": f"{base[i % len(base)]['id']}#{i // len(base)}"} for i in range(count)]
    return questions, per_corpus


def collection_exists(name: str) -> bool:
    with session_scope() as session:
        try:
            get_collection(session, name)
        except UnknownCollection:
            return False
    return True


def ensure_corpus(root: Path, name: str, model: str) -> None:
    """Ingest the corpus folder `root` into collection `name` unless that collection exists."""
    if collection_exists(name):
        return
    print(f"ingesting {root} into {name} ...", flush=True)
    print(ingest_corpus(root, name, model), flush=True)


def ensure_collections(corpora: Path, model: str) -> None:
    for root in sorted(p for p in corpora.iterdir() if (p / "questions.jsonl").exists()):
        ensure_corpus(root, f"bench-{root.name}", model)


# ---------------------------------------------------------------- CPU accounting
def tree_cpu(pid: int, seen: set[int]) -> float:
    """CPU seconds of a process, its reaped children and its live descendants not counted yet
    (`seen`: the workers this process started are its children, but are counted as themselves)."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        seen.add(pid)
        for child in root.children(recursive=True):
            if child.pid in seen:
                continue
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
                seen.add(child.pid)
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return 0.0


def own_cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return 0.0


def descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


class CpuMeter:
    """CPU seconds per named process tree and for the whole machine between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def snapshot(self) -> tuple[float, dict[str, float], float]:
        machine = psutil.cpu_times()
        # guest times are already inside user time
        total = sum(machine) - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)
        busy = total - machine.idle - getattr(machine, "iowait", 0.0)
        # The workers this process (re)started are its children: they count as themselves only.
        me = os.getpid()
        others = {pid for pid in self.pids.values() if pid != me}
        others |= {child for pid in others for child in descendants(pid)}
        per_process = {name: tree_cpu(pid, set(others) if pid == me else set()) for name, pid in self.pids.items()}
        # A worker's own process (not its pool): Celery's consumer, receiving, dispatching, acking.
        for name, pid in self.pids.items():
            if name.startswith("worker-"):
                per_process[f"{name} main process"] = own_cpu(pid)
        return time.monotonic(), per_process, busy

    def start(self) -> None:
        self.begin = self.snapshot()

    def stop(self) -> dict[str, Any]:
        end = self.snapshot()
        wall = end[0] - self.begin[0]
        per_process = {name: round(end[1][name] - self.begin[1][name], 1) for name in self.pids}
        main_processes = {
            name: round(end[1][name] - self.begin[1][name], 1) for name in end[1] if name not in self.pids
        }
        machine = end[2] - self.begin[2]
        cores = psutil.cpu_count() or 1
        return {
            "wall_s": round(wall, 1),
            "cpu_s": per_process,
            **({"cpu_s_of_which_worker_main_processes": main_processes} if main_processes else {}),
            "cpu_s_ours": round(sum(per_process.values()), 1),
            "cpu_s_machine": round(machine, 1),
            # What ran on the machine besides the processes measured (other users' jobs: the noise).
            "cpu_s_others": round(machine - sum(per_process.values()), 1),
            "machine_busy_share": round(machine / (wall * cores), 3) if wall else None,
        }


def server_pids(cluster) -> dict[str, int]:
    return {name: record.pid for name in SERVERS if (record := cluster.table.live(name))}


# ---------------------------------------------------------------- the two kinds of run
def summarise(status, questions: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "questions": questions,
        "state": status.state,
        "counts": status.counts,
        "failures": [f"{f.id} ({f.stage}): {f.error}" for f in status.failures[:5]],
        "elapsed_s": status.elapsed_s,
        "questions_per_s": status.questions_per_s,
        "end_to_end_p50_s": status.end_to_end_p50_s,
        "end_to_end_p99_s": status.end_to_end_p99_s,
        "stages": {
            s.stage: {
                "p50_s": s.p50_s,
                "p99_s": s.p99_s,
                "mean_s": s.mean_s,
                "wait_p50_s": s.wait_p50_s,
                "wait_p99_s": s.wait_p99_s,
                "attempts": s.attempts,
                "lost": s.lost,
            }
            for s in status.stages
        },
        **extra,
    }


def in_process_worker(torch_threads: int | None, work, control) -> None:
    """One in-process worker (a child process): takes query ids from `work` until "END", runs each
    through the four stage tasks' own code, reports its seconds per stage on `control`, and waits
    for the next round (so that it never takes another worker's "END")."""
    import torch

    from infra.sizing import TORCH_THREADS
    from services.common.celery_app import app
    from services.common.warmup import settle_heap
    from services.generator.tasks import generate_for_query
    from services.inserter.tasks import insert_for_query
    from services.merger.tasks import merge_for_query
    from services.retriever.tasks import retrieve_for_query

    torch.set_num_threads(torch_threads or TORCH_THREADS)  # as m2io up's workers, unless asked otherwise
    tasks = {
        Stage.RETRIEVER: retrieve_for_query,
        Stage.GENERATOR: generate_for_query,
        Stage.INSERTER: insert_for_query,
        Stage.MERGER: merge_for_query,
    }
    expected_next = {stage.value: ANSWER_TASKS[after] for stage in PIPELINE if (after := next_stage(stage))}
    handed_on: list[str] = []
    # The one thing replaced: the hop to the next queue is recorded, and the loop calls that task.
    app.send_task = lambda name, *args, **kwargs: handed_on.append(name)
    get_embedder(DEFAULT_EMBEDDING_MODEL).warm_up()
    settle_heap()  # as a worker process after its warm-up
    control.send(("ready", torch.get_num_threads()))
    while control.recv() == "round":
        busy = {stage.value: 0.0 for stage in PIPELINE}
        try:
            while (query_id := work.get()) != "END":
                for stage in PIPELINE:
                    handed_on.clear()
                    started = time.perf_counter()
                    result = tasks[stage].run({"query_id": query_id})
                    busy[stage.value] += time.perf_counter() - started
                    if "failed" in result or "refused" in result or "cancelled" in result:
                        break
                    if stage.value in expected_next and handed_on != [expected_next[stage.value]]:
                        raise RuntimeError(f"{stage.value} handed on {handed_on}, not {expected_next[stage.value]}")
        except Exception as error:  # noqa: BLE001 - reported to the parent, which stops the run
            control.send(("error", f"{type(error).__name__}: {error}"))
            return
        control.send(("done", busy))


def run_in_process(
    questions: list[dict[str, Any]], cluster, processes: int, torch_threads: int | None, warm_up: int
) -> dict[str, Any]:
    """The job's rows stored as `m2io submit` stores them, without messages; then `processes`
    in-process workers take its queries from one shared list, in order."""
    import multiprocessing

    from sqlalchemy import select

    from services.common.models import Query
    from services.jobs.commands import job_config, submit_job
    from services.jobs.questions import from_records
    from services.jobs.status import job_status

    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited connections
    work = context.Queue()
    pipes, children = [], []
    for _ in range(processes):
        parent_end, child_end = context.Pipe()
        child = context.Process(target=in_process_worker, args=(torch_threads, work, child_end), daemon=True)
        child.start()
        pipes.append(parent_end)
        children.append(child)
    threads = [pipe.recv()[1] for pipe in pipes]

    def run_job(batch: list[dict[str, Any]], name: str, meter: CpuMeter | None = None):
        config = job_config(batch[0]["collection"], generator=GENERATOR, inserter=INSERTER)
        job_id = submit_job(from_records(batch), config, name=name, enqueue=False)
        with session_scope() as session:
            query_ids = session.scalars(
                select(Query.id).where(Query.job_id == job_id, Query.status == "queued").order_by(Query.line)
            ).all()
        if meter:
            meter.start()
        for query_id in query_ids:
            work.put(str(query_id))
        for _ in pipes:
            work.put("END")
        for pipe in pipes:
            pipe.send("round")
        busy = {stage.value: 0.0 for stage in PIPELINE}
        for pipe in pipes:
            kind, value = pipe.recv()
            if kind == "error":
                raise RuntimeError(f"an in-process worker failed: {value}")
            for stage, seconds in value.items():
                busy[stage] += seconds
        cpu = meter.stop() if meter else None
        return job_status(job_id), busy, cpu

    try:
        run_job(questions[: warm_up * processes], "bench job_load warm-up (in-process)")
        meter = CpuMeter({"this process and its in-process workers": os.getpid(), **server_pids(cluster)})
        status, busy, cpu = run_job(questions, f"bench job_load in-process:{processes} ({len(questions)})", meter)
    finally:
        for pipe in pipes:
            pipe.send("exit")
        for child in children:
            child.join(timeout=30)
    return summarise(
        status,
        len(questions),
        {
            "mode": "in-process",
            "processes": processes,
            "torch_threads": threads[0],
            "task_seconds": {stage: round(seconds, 1) for stage, seconds in busy.items()},
            "cpu": cpu,
        },
    )


def run_bound(questions: list[dict[str, Any]], cluster) -> dict[str, Any]:
    """The work no pipeline can avoid per question, alone, in this process: the question embedded, one
    hybrid search (the production vector and full-text SQL), the bookkeeping our reliability rules need
    (per stage an attempt begun and finished, the answer row, the query's status) and one S3 put. Its
    CPU seconds per question (this process and the servers) give the bound on questions/s for the
    machine's cores; the cluster's throughput is reported against it."""
    import statistics

    import torch
    from sqlalchemy import insert, select, text, update
    from sqlalchemy.dialects.postgresql import insert as upsert

    from infra.sizing import TORCH_THREADS
    from services.common.db import vector_literal
    from services.common.models import Answer, Query, StageRun
    from services.common.storage import get_store
    from services.jobs.commands import job_config, submit_job
    from services.jobs.questions import from_records
    from services.retriever.search import POOL, text_ranks, vector_ranks

    torch.set_num_threads(TORCH_THREADS)  # as a worker of m2io up's plan embeds
    embedder = get_embedder(DEFAULT_EMBEDDING_MODEL)
    embedder.encode(["warm-up"])
    store = get_store()
    config = job_config(questions[0]["collection"], generator=GENERATOR, inserter=INSERTER)
    job_id = submit_job(from_records(questions), config, name="bench job_load bound", enqueue=False)
    with session_scope() as session:
        rows = session.execute(
            select(Query.id, Query.question, Query.collection).where(Query.job_id == job_id).order_by(Query.line)
        ).all()
        collections = {name: get_collection(session, name) for name in {row.collection for row in rows}}
    parts: dict[str, list[float]] = {"embed": [], "search": [], "writes": [], "s3": []}
    meter = CpuMeter({"this process": os.getpid(), **server_pids(cluster)})
    meter.start()
    started = time.perf_counter()
    for row in rows:
        clock = time.perf_counter()
        vector = vector_literal(embedder.encode([row.question])[0])
        parts["embed"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        with session_scope() as session:
            collection = collections[row.collection]
            vector_ranks(session, "chunks", collection, vector, POOL)
            text_ranks(session, collection, row.question, POOL)
        parts["search"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        for stage in PIPELINE:
            with session_scope() as session:
                session.execute(text("SET LOCAL synchronous_commit = off"))
                run_id = session.execute(
                    insert(StageRun)
                    .values(query_id=row.id, stage=stage.value, attempt=1, status="running")
                    .returning(StageRun.id)
                ).scalar_one()
            with session_scope() as session:
                session.execute(
                    update(StageRun).where(StageRun.id == run_id).values(status="succeeded", output={"bound": True})
                )
        with session_scope() as session:
            session.execute(upsert(Answer).values(query_id=row.id, markdown=row.question, blocks=[]))
            session.execute(update(Query).where(Query.id == row.id).values(status="succeeded"))
        parts["writes"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        store.put_named(f"answers/{row.id}/bound.md", row.question.encode(), "text/markdown")
        parts["s3"].append(time.perf_counter() - clock)
    wall = time.perf_counter() - started
    cpu = meter.stop()
    cpu_per_question = (cpu["cpu_s_ours"] or 0.0) / len(rows)
    cores = psutil.cpu_count() or 1
    return {
        "mode": "bound",
        "questions": len(rows),
        "wall_ms_per_question": round(wall / len(rows) * 1000, 2),
        "p50_ms": {name: round(statistics.median(values) * 1000, 2) for name, values in parts.items()},
        "cpu_ms_per_question": round(cpu_per_question * 1000, 2),
        # all cores busy with nothing but this work
        "bound_questions_per_s": round(cores / cpu_per_question, 1) if cpu_per_question else None,
        "one_process_questions_per_s": round(len(rows) / wall, 2),
        "cpu": cpu,
    }


def restart_workers(cluster, concurrency: int, torch_threads: int | None, per_stage: dict[str, int]) -> None:
    from infra.processes import stop
    from services.common.celery_app import worker_argv
    from services.common.health import online_workers, workers_of

    if torch_threads is None:
        os.environ.pop("M2IO_TORCH_THREADS", None)
    else:
        os.environ["M2IO_TORCH_THREADS"] = str(torch_threads)
    for name in cluster.worker_names():
        print(f"{name}: {stop(cluster.table, name)}", flush=True)
    cluster.worker_concurrency = concurrency
    # As LocalCluster.worker_argv, with the stages of `cluster:1:inserter=2` given their own count.
    # BENCH_WORKER_ARGS (e.g. "--pool threads"): extra worker options, to compare pools and bootsteps.
    extra = os.environ.get("BENCH_WORKER_ARGS", "").split()
    cluster.worker_argv = lambda stage: (
        worker_argv(stage.queue, f"{stage.value}@%h", per_stage.get(stage.value, concurrency)) + extra
    )
    cluster.ensure_workers(cluster.cluster_env(), echo=lambda line: print(line, flush=True))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        online, _ = online_workers(get_settings().redis_url)
        if all(workers_of(stage, online) for stage in PIPELINE):
            return
        time.sleep(1)
    raise RuntimeError("the restarted workers did not answer ping within 120 s")


def wait_lightly(job_id, stall: float, poll_s: float = 2.0):
    """Wait for the job with the cheap status (counts only): the detailed one reads every stage run
    of the job, which at 1,000 questions costs the client and Postgres CPU the workers need."""
    from services.jobs.status import job_status

    last_change, last_print, seen = time.monotonic(), 0.0, None
    while True:
        status = job_status(job_id, detail=False)
        if status.done:
            return job_status(job_id)
        if status.counts != seen:
            seen, last_change = status.counts, time.monotonic()
        if time.monotonic() - last_change > stall:
            raise TimeoutError(f"job {job_id}: no progress for {stall:.0f}s ({status.counts})")
        if time.monotonic() - last_print > 60:
            last_print = time.monotonic()
            print(f"  {status.state} {status.counts} {status.elapsed_s:.0f}s", flush=True)
        time.sleep(poll_s)


def worker_pool_sizes() -> dict[str, int]:
    from services.common.celery_app import app

    stats = app.control.inspect(timeout=5).stats() or {}
    return {name: info.get("pool", {}).get("max-concurrency") for name, info in sorted(stats.items())}


def run_cluster(
    questions: list[dict[str, Any]],
    cluster,
    concurrency: int,
    per_stage: dict[str, int],
    torch_threads: int | None,
    warm_up: int,
    stall: float,
) -> dict[str, Any]:
    from services.client import Client

    restart_workers(cluster, concurrency, torch_threads, per_stage)
    client = Client()
    # Every pool process loads its models on its first task: a warm-up job of a few per process.
    warm = client.submit(
        questions[: warm_up * max([concurrency, *per_stage.values()])],
        questions[0]["collection"],
        generator=GENERATOR,
        inserter=INSERTER,
        name="bench job_load warm-up",
    )
    wait_lightly(warm, stall)
    pids = {f"worker-{stage.value}": cluster.table.live(f"worker-{stage.value}").pid for stage in PIPELINE}
    meter = CpuMeter({**pids, **server_pids(cluster), "this process (client)": os.getpid()})
    meter.start()
    job_id = client.submit(
        questions,
        questions[0]["collection"],
        generator=GENERATOR,
        inserter=INSERTER,
        name=f"bench job_load cluster:{concurrency} ({len(questions)})",
    )
    status = wait_lightly(job_id, stall)
    cpu = meter.stop()
    memory = {name: peak_rss_mb(pid) for name, pid in pids.items()}
    looked = status_latency(job_id)
    return summarise(
        status,
        len(questions),
        {
            "mode": "cluster",
            "job_id": str(job_id),
            "workers_per_stage": {stage.value: per_stage.get(stage.value, concurrency) for stage in PIPELINE},
            "pools": worker_pool_sizes(),
            "torch_threads": torch_threads,
            "cpu": cpu,
            "peak_rss_mb": memory,
            "status_latency": looked,
        },
    )


def peak_rss_mb(pid: int) -> dict[str, float]:
    """The peak resident memory (VmHWM) of a worker's main process and of its largest pool process, MB."""

    def hwm(one: int) -> float:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return 0.0

    return {"main": hwm(pid), "largest_pool_process": max((hwm(child) for child in descendants(pid)), default=0.0)}


def status_latency(job_id) -> dict[str, float]:
    """How long the job's status takes once it is done: the read model in this process (median of 3) and
    `m2io status JOB` as a user runs it (a new process: imports included)."""
    import statistics
    import sys

    from services.jobs.status import job_status

    times = []
    for _ in range(3):
        started = time.perf_counter()
        job_status(job_id)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "services.cli", "status", str(job_id)], capture_output=True, check=False)
    return {"read_model_s": round(statistics.median(times), 3), "cli_s": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------- report
def cpu_per_question(run: dict[str, Any]) -> float | None:
    cpu = run.get("cpu") or {}
    return cpu.get("cpu_s_ours") / run["questions"] if cpu.get("cpu_s_ours") else None


def compare(runs: dict[str, Any]) -> dict[str, Any]:
    """Each cluster run against the bound, and against each in-process run of the same suffix (same torch threads):
    throughput ratio (cluster / in-process; overhead = 1 - ratio) and CPU seconds per question
    ratio (cluster / in-process: the work the queues add, whatever else ran on the machine)."""
    ratios: dict[str, Any] = {}
    bounds = {key: run for key, run in runs.items() if run.get("mode") == "bound" and run.get("bound_questions_per_s")}
    for key, run in runs.items():
        if run.get("mode") != "cluster" or not run.get("questions_per_s"):
            continue
        for bound_key, bound in bounds.items():  # how close the cluster comes to the bound
            ratios.setdefault(key, {})[bound_key] = {
                "share_of_bound": round(run["questions_per_s"] / bound["bound_questions_per_s"], 3)
            }
        for base_key, base in runs.items():
            if base.get("mode") != "in-process" or base.get("suffix", "") != run.get("suffix", ""):
                continue
            if not base.get("questions_per_s"):
                continue
            ratio = run["questions_per_s"] / base["questions_per_s"]
            cpu_run, cpu_base = cpu_per_question(run), cpu_per_question(base)
            ratios.setdefault(key, {})[base_key] = {
                "throughput_ratio": round(ratio, 3),
                "overhead": round(1 - ratio, 3),
                "cpu_per_question_ratio": round(cpu_run / cpu_base, 3) if cpu_run and cpu_base else None,
            }
    return ratios


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["in-process", "cluster:1", "cluster:2"])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--questions", type=int, default=1000, help="questions of the cluster jobs")
    parser.add_argument("--in-process-questions", type=int, default=0, help="0: as many as --questions")
    parser.add_argument("--warm-up", type=int, default=8, help="warm-up questions (per worker process)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch threads per worker process (M2IO_TORCH_THREADS) and in the in-process run; default: the "
        "workers get what `m2io up` plans (infra/sizing.py: 1), the in-process run torch's own (one per core)",
    )
    parser.add_argument("--suffix", default="", help="appended to the run keys, e.g. t1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stall-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("bench/results/job_load.json"))
    args = parser.parse_args()

    from infra.cluster import LocalCluster

    settings = load_settings()
    cluster = LocalCluster(settings, start_dashboard=False)
    ensure_collections(args.corpora, DEFAULT_EMBEDDING_MODEL)
    questions, per_corpus = build_questions(args.corpora, args.questions, args.seed)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.setdefault("runs", {})
    for run in args.runs:
        run = "in-process:1" if run == "in-process" else run
        label = run.replace(":", "-").replace("=", "") + (f"-{args.suffix}" if args.suffix else "")
        print(f"== {label}", flush=True)
        started = datetime.now(UTC)
        if run == "in-process" or run.startswith("in-process:"):
            processes = int(run.partition(":")[2] or 1)
            count = args.in_process_questions or args.questions
            result = run_in_process(questions[:count], cluster, processes, args.torch_threads, args.warm_up)
        elif run == "bound":  # torch threads as m2io up's plan gives a worker
            result = run_bound(questions[: args.in_process_questions or args.questions], cluster)
        elif run.startswith("cluster:"):
            # cluster:N, or cluster:N:stage=M:... for stages with another process count
            count, *overrides = run.split(":")[1:]
            per_stage = {stage: int(n) for stage, _, n in (item.partition("=") for item in overrides)}
            result = run_cluster(
                questions, cluster, int(count), per_stage, args.torch_threads, args.warm_up, args.stall_timeout
            )
        else:
            parser.error(f"unknown run {run!r}: use in-process[:N], cluster:N or bound")
        result = {"label": label, "suffix": args.suffix, "started_at": started.isoformat(timespec="seconds"), **result}
        report["runs"][label] = result
        report.update(
            {
                "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                f"{round(psutil.virtual_memory().total / 2**30)} GiB",
                "commit": git_commit(),
                "corpora": per_corpus,
                "backends": {"generator": GENERATOR, "inserter": INSERTER},
            }
        )
        report["ratios"] = compare(report["runs"])
        print(json.dumps(result, indent=2), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
