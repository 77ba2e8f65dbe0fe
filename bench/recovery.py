"""Recovery after kill -9 of each answer-stage worker: the counterpart of tests/test_job_faults.py's kill test.

For each stage, a few trials: a small job flows through real worker processes (two of the stage under test, one
of each other stage); a worker of the stage is killed with SIGKILL (main process and pool, as when its container
dies) while it runs a task of the job; the bench records the time from the kill to the redelivered attempt's
start (on the other worker of the stage), and to the interrupted query's answer. A replacement worker is started
before the next trial. Settings are the cluster's defaults (visibility timeout 300 s as the backstop, heartbeat
every 2 s with a 10 s TTL, sweep every 5 s): the messages come back by the dead worker's stopped heartbeat.

Run against a local cluster (`m2io up --no-dashboard`); it stops that cluster's workers, runs its own, and starts
the cluster's again at the end:
    PYTHONPATH=. python -m bench.recovery [--trials 3] [--stages retriever generator inserter merger] \
        [--out bench/results/recovery.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from sqlalchemy import text

from bench.job_load import ensure_collections
from bench.retrieval_quality import DEFAULT_CORPORA
from services.common.db import get_engine
from services.common.embedding import DEFAULT_EMBEDDING_MODEL
from services.common.queues import PIPELINE, Stage
from services.common.settings import get_settings, load_settings
from services.jobs.status import job_status, percentile

QUESTIONS = [
    "How do I make Apple Chicken?",
    "How do I make Apple Pie?",
    "How do I make Apple strudel?",
    "How hot should the oven be for the pie?",
    "What goes into the pie crust?",
    "How long does the chicken cook?",
]
RUNNING_OF_STAGE = text(
    "SELECT r.id, r.worker FROM stage_runs r JOIN queries q ON q.id = r.query_id "
    "WHERE q.job_id = :job AND r.stage = :stage AND r.status = 'running' ORDER BY r.id LIMIT 1"
)
RUN = text("SELECT query_id, stage, attempt, status FROM stage_runs WHERE id = :id")
NEXT_ATTEMPT_START = text(
    "SELECT started_at FROM stage_runs WHERE query_id = :query AND stage = :stage AND attempt = :attempt"
)
ANSWERED_AT = text(
    "SELECT finished_at FROM stage_runs WHERE query_id = :query AND stage = 'merger' AND status = 'succeeded'"
)


@dataclass
class BenchWorker:
    stage: str
    name: str
    process: subprocess.Popen


class Pool:
    """Worker processes of this bench, started as `m2io up` starts them, killed as a container dies."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: list[BenchWorker] = []
        self.count = 0

    def start(self, stage: str) -> BenchWorker:
        from services.common.celery_app import worker_argv

        self.count += 1
        name = f"{stage}-bench{self.count}@recovery"
        argv = worker_argv(stage, name) + ["--without-mingle", "--without-gossip"]
        with open(self.log_dir / f"bench-recovery-{stage}-{self.count}.log", "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        worker = BenchWorker(stage, name, process)
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout: float = 180.0) -> None:
        from services.common.celery_app import app

        pending = {w.name for w in self.live()}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in app.control.ping(destination=sorted(pending), timeout=1.0) or []:
                pending -= set(reply)
        if pending:
            raise RuntimeError(f"workers did not answer ping in {timeout:.0f}s: {sorted(pending)}")

    def live(self, stage: str | None = None) -> list[BenchWorker]:
        return [w for w in self.workers if w.process.poll() is None and stage in (None, w.stage)]

    def kill(self, name: str) -> None:
        (worker,) = [w for w in self.live() if w.name == name]
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)

    def stop_all(self) -> None:
        """A warm shutdown (SIGTERM) of every live worker; SIGKILL for those still there after 30 s."""
        live = [psutil.Process(worker.process.pid) for worker in self.live()]
        for process in live:
            os.killpg(process.pid, signal.SIGTERM)
        for process in psutil.wait_procs(live, timeout=30)[1]:
            os.killpg(process.pid, signal.SIGKILL)


def submit(collection: str, count: int, label: str) -> uuid.UUID:
    from services.client import Client

    records = [{"id": f"{label}-{n}", "question": QUESTIONS[n % len(QUESTIONS)]} for n in range(count)]
    return Client().submit(records, collection, name=label, generator="extractive", inserter="rule")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def trial(pool: Pool, stage: Stage, collection: str, label: str) -> dict | None:
    """One kill of a worker of `stage` mid-task; None when the kill fell between two tasks."""
    job_id = submit(collection, 6, label)
    with get_engine().connect() as conn:

        def running():
            found = conn.execute(RUNNING_OF_STAGE, {"job": job_id, "stage": stage.value}).first()
            conn.rollback()
            return found

        run_id, worker = wait_until(running, 120, f"a running {stage.value} attempt", interval=0.002)
        killed_at = datetime.now(UTC)
        pool.kill(worker)
        query_id, _, attempt, status = conn.execute(RUN, {"id": run_id}).one()
        conn.rollback()
    wait_until(lambda: job_status(job_id, detail=False).done, 300, "the job to end", interval=0.5)
    if status != "running":
        return None  # the task had ended just before the kill
    with get_engine().connect() as conn:
        restarted = conn.execute(
            NEXT_ATTEMPT_START, {"query": query_id, "stage": stage.value, "attempt": attempt + 1}
        ).scalar()
        answered = conn.execute(ANSWERED_AT, {"query": query_id}).scalar()
        lost = conn.execute(RUN, {"id": run_id}).one().status
    final = job_status(job_id)
    return {
        "job": str(job_id),
        "killed": worker,
        "interrupted_attempt": {"status": lost, "attempt": attempt},
        "kill_to_redelivered_start_s": round((restarted - killed_at).total_seconds(), 2),
        "kill_to_answer_s": round((answered - killed_at).total_seconds(), 2),
        "job_state": final.state,
        "answered": final.counts.get("succeeded", 0),
        "successes_per_stage": {s.stage: s.succeeded for s in final.stages},
    }


def summarise(trials: list[dict]) -> dict:
    starts = [t["kill_to_redelivered_start_s"] for t in trials]
    answers = [t["kill_to_answer_s"] for t in trials]
    return {
        "trials": len(trials),
        "kill_to_redelivered_start_s": {"p50": percentile(starts, 0.5), "max": max(starts)},
        "kill_to_answer_s": {"p50": percentile(answers, 0.5), "max": max(answers)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="kills that land mid-task, per stage")
    parser.add_argument("--stages", nargs="+", default=[stage.value for stage in PIPELINE])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--out", type=Path, default=Path("bench/results/recovery.json"))
    args = parser.parse_args()

    from infra.cluster import LocalCluster
    from infra.processes import stop

    settings = load_settings()
    cluster = LocalCluster(settings, start_dashboard=False)
    os.environ.update(cluster.cluster_env())
    get_settings.cache_clear()
    ensure_collections(args.corpora, DEFAULT_EMBEDDING_MODEL)
    for name in cluster.worker_names():
        print(f"{name}: {stop(cluster.table, name)}", flush=True)
    log_dir = settings.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = Pool(log_dir)
    results: dict[str, dict] = {}
    try:
        for stage in PIPELINE:
            pool.start(stage.value)
        for value in args.stages:
            stage = Stage(value)
            pool.start(stage.value)  # a second worker of the stage: it takes the killed one's message
            pool.wait_ready()
            trials: list[dict] = []
            attempts = 0
            while len(trials) < args.trials and attempts < 4 * args.trials:
                attempts += 1
                outcome = trial(pool, stage, "bench-recipes", f"recovery-{stage.value}-{attempts}")
                print(f"{stage.value} #{attempts}: {outcome}", flush=True)
                if outcome is not None:
                    trials.append(outcome)
                while len(pool.live(stage.value)) < 2:
                    pool.start(stage.value)
                pool.wait_ready()
            results[stage.value] = {**summarise(trials), "runs": trials} if trials else {"trials": 0}
            for worker in pool.live(stage.value)[1:]:  # back to one worker of the stage
                os.killpg(worker.process.pid, signal.SIGTERM)
                worker.process.wait(timeout=60)
    finally:
        pool.stop_all()
        cluster.ensure_workers(cluster.cluster_env(), echo=lambda line: print(line, flush=True))
    earlier = json.loads(args.out.read_text()).get("stages", {}) if args.out.exists() else {}
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "visibility_timeout_s": settings.visibility_timeout_s,
            "unacked_restore_interval_s": settings.unacked_restore_interval_s,
            "worker_heartbeat_s": settings.worker_heartbeat_s,
            "worker_heartbeat_ttl_s": settings.worker_heartbeat_ttl_s,
        },
        "stages": {**earlier, **results},  # a run of some stages keeps the others' results
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for stage, result in results.items():
        print(stage, {k: v for k, v in result.items() if k != "runs"})


if __name__ == "__main__":
    main()
