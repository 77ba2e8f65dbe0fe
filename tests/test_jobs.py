"""Batch jobs as users run them: the real `m2io` CLI (a subprocess) and the Python client against real
workers, Postgres, Redis and S3: submit --wait, status, export, retry, cancel, eval, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.client import Client
from services.common.db import session_scope
from services.common.models import Answer, EvalRun, Query, StageRun
from tests.conftest import REPO_ROOT
from tests.corpus_fixtures import stored_candidates, write_markdown_corpus
from tests.test_ingest import ingest_in_process

PIPELINE = ("retriever", "generator", "inserter", "merger")

QUESTIONS = [
    {
        "id": "pancakes/fry",
        "question": "How do I fry pancakes?",
        "doc_id": "pancakes",
        "gold_answer": "1. Mix flour, eggs and milk into a batter.\n2. Fry each pancake in butter.\n<PIC>\n"
        "3. Serve with maple syrup.",
        "gold_images": ["frying.jpg"],
    },
    {
        "id": "soup",
        "question": "How do I make tomato soup?",
        "doc_id": "tomato-soup",
        "gold_answer": "A warm soup of roasted tomatoes.\n<PIC>\n1. Roast the tomatoes with garlic.\n"
        "2. Blend with stock until smooth.",
        "gold_images": ["soup.png"],
    },
]


def m2io(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, pointed at the session's servers (their settings are in os.environ).
    Wide, plain tables: messages are neither wrapped nor cut by colour codes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def write_questions(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def start_pipeline(workers) -> None:
    for stage in PIPELINE:
        workers.start(stage)


@pytest.mark.slow
def test_submit_wait_status_export_retry_eval(workers, tmp_path):
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    later = f"later-{uuid.uuid4().hex[:8]}"
    corpus = write_markdown_corpus(tmp_path / "corpus")
    ingest_in_process(corpus, name)
    start_pipeline(workers)
    questions = write_questions(
        tmp_path / "questions.jsonl",
        [*QUESTIONS, {"id": "elsewhere", "question": "How do I fry pancakes?", "collection": later}],
    )

    submitted = m2io("submit", str(questions), "--collection", name, "--wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = last_line(submitted.stdout)
    uuid.UUID(job_id)  # the id alone on the last line
    assert "retriever" in submitted.stderr and "merger" in submitted.stderr  # a bar per stage
    assert "partial" in submitted.stderr

    status = json.loads(m2io("status", job_id, "--json").stdout)
    assert status["state"] == "partial" and status["counts"] == {"succeeded": 2, "failed": 1}
    assert [(f["id"], f["stage"]) for f in status["failures"]] == [("elsewhere", "retriever")]
    assert f"no collection named '{later}'" in status["failures"][0]["error"]
    merger = next(s for s in status["stages"] if s["stage"] == "merger")
    assert merger["succeeded"] == 2 and merger["p50_s"] > 0 and status["end_to_end_p50_s"] > 0
    shown = m2io("status", job_id)
    assert shown.returncode == 0 and "elsewhere" in shown.stdout and "no collection named" in shown.stdout
    listing = m2io("status")
    assert job_id in listing.stdout and "questions.jsonl" in listing.stdout

    out = tmp_path / "export"
    exported = m2io("export", job_id, "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert last_line(exported.stdout) == str(out / "index.html")
    fry = json.loads((out / "pancakes_fry.json").read_text())
    assert set(fry) == {"id", "question", "status", "blocks", "answered_from", "placements", "evidence", "error"}
    assert fry["id"] == "pancakes/fry" and fry["status"] == "succeeded" and fry["error"] is None
    images = [b for b in fry["blocks"] if b["type"] == "image"]
    assert {"type": "image", "source_name": "images/frying.jpg", "caption": "Pancake frying in a pan"} in images
    assert all({"type", "text", "kind"} <= set(b) for b in fry["blocks"] if b["type"] == "text")
    assert fry["answered_from"]["mode"] in ("section", "sentences") and fry["answered_from"]["reason"]
    assert {p["image"] for p in fry["placements"]} == {b["source_name"] for b in images}
    evidence = fry["evidence"]  # what the answer was made from, and what placed each image (or not)
    assert [p["rank"] for p in evidence["passages"]] == list(range(1, len(evidence["passages"]) + 1))
    assert all(p["dense"] is not None and p["fused"] > 0 for p in evidence["passages"])
    assert {i["image"] for i in evidence["images"]} == {b["source_name"] for b in images}
    assert all(i["placed_by"] and i["sentence"] for i in evidence["images"])
    assert all(r["reason"] for r in evidence["rejected_images"] + evidence["rejected_passages"])
    assert "<summary>Evidence</summary>" in (out / "pancakes_fry.html").read_text()
    assert "![Pancake frying in a pan](images/frying.jpg)" in (out / "pancakes_fry.md").read_text()
    assert (out / "images" / "frying.jpg").read_bytes()[:2] == b"\xff\xd8"  # the Markdown's image, beside it
    assert "data:image/jpeg;base64," in (out / "pancakes_fry.html").read_text()
    failed = json.loads((out / "elsewhere.json").read_text())
    assert failed["status"] == "failed" and failed["blocks"] == [] and "no collection named" in failed["error"]
    index = (out / "index.html").read_text()
    for stem in ("pancakes_fry", "soup", "elsewhere"):
        assert f"href='{stem}.html'" in index and (out / f"{stem}.html").exists()

    # The client the dashboard uses: per-query stages and one answer with its plan, retrieval and gold.
    client = Client()
    views = {view.id: view for view in client.queries(job_id)}
    assert views["soup"].stages["inserter"]["status"] == "succeeded" and views["soup"].has_answer
    assert views["elsewhere"].stages["retriever"]["status"] == "failed" and not views["elsewhere"].has_answer
    answer = client.answer(views["pancakes/fry"].query_id)
    assert answer.plan.backend == "rule" and answer.retrieval.passages and answer.metrics["image_recall"] == 1.0

    # Retry re-runs only the failed query, from the stage that failed, once its collection exists.
    ingest_in_process(corpus, later)
    retried = m2io("retry", job_id)
    assert retried.returncode == 0 and "1 queries requeued (1 at retriever)" in retried.stdout
    final = client.wait(job_id, stall_timeout=120)
    assert final.state == "succeeded" and final.counts == {"succeeded": 3}
    with session_scope() as session:
        attempts = dict(
            session.execute(
                select(StageRun.stage, func.count())
                .join(Query, Query.id == StageRun.query_id)
                .where(Query.job_id == uuid.UUID(job_id), Query.external_id == "soup")
                .group_by(StageRun.stage)
            ).all()
        )
    assert attempts == dict.fromkeys(PIPELINE, 1)  # the succeeded queries were not run again

    report_path = tmp_path / "eval" / "report.json"
    evaluated = m2io("eval", "--job", job_id, "--out", str(report_path))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "image f1" in evaluated.stdout and name in evaluated.stdout  # a table per corpus
    report = json.loads(report_path.read_text())["jobs"][0]
    assert report["backends"] == "extractive+rule" and report["scored"] == 2  # `elsewhere` has no gold
    assert {row["id"] for row in report["per_question"]} == {"pancakes/fry", "soup"}
    assert report["aggregate"]["image_recall"] == 1.0 and report["aggregate"]["retrieval_doc_hit"] == 1.0
    assert report_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with session_scope() as session:
        run = session.get(EvalRun, uuid.UUID(report["eval_run_id"]))
        assert run.job_id == uuid.UUID(job_id) and run.score == report["aggregate"]["image_f1"]


@pytest.mark.slow
def test_cancel_resume_and_retry_from_a_later_stage(workers, tmp_path):
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)

    # No worker yet: the job waits in the queue, is cancelled, and its messages are then dropped.
    job_id = last_line(m2io("submit", str(questions), "--collection", name).stdout)
    cancelled = m2io("cancel", job_id)
    assert cancelled.returncode == 0 and "2 unfinished queries cancelled" in cancelled.stdout
    client = Client()
    assert client.status(job_id).state == "cancelled"
    start_pipeline(workers)
    from services.common.health import queue_depths
    from services.common.settings import get_settings

    deadline = time.monotonic() + 60
    while queue_depths(get_settings().redis_url).get("retriever", 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # the last message consumed is being skipped
    with session_scope() as session:
        runs = session.scalar(
            select(func.count()).select_from(StageRun).join(Query).where(Query.job_id == uuid.UUID(job_id))
        )
    assert runs == 0  # cancelled queries ran no stage
    resumed = m2io("retry", job_id)
    assert "2 queries requeued (2 at retriever)" in resumed.stdout
    assert client.wait(job_id, stall_timeout=120).state == "succeeded"

    # A job whose inserter cannot run fails there; a retry re-enters at the inserter, not before. Submit
    # refuses a checkpoint that is not registered, so this one is unregistered after the job is stored.
    broken = submit_then_unregister(QUESTIONS, name)
    status = client.wait(broken, stall_timeout=120)
    assert status.state == "failed" and {f.stage for f in status.failures} == {"inserter"}
    assert all("no registered inserter model" in f.error for f in status.failures)
    report = client.retry(broken)
    assert report.requeued == {"inserter": 2} and not report.not_retryable
    again = client.wait(broken, stall_timeout=120)
    inserter = next(s for s in again.stages if s.stage == "inserter")
    retriever = next(s for s in again.stages if s.stage == "retriever")
    assert again.state == "failed" and inserter.attempts == 4 and retriever.attempts == 2
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Answer).join(Query).where(Query.job_id == broken)) == 0


def submit_then_unregister(records: list[dict], collection: str) -> uuid.UUID:
    """A job on `checkpoint:<a model>` whose model is unregistered between submit and the first message."""
    from services.common.models import RegisteredModel
    from services.common.queues import Stage
    from services.jobs.commands import job_config, send_or_mark_failed, submit_job
    from services.jobs.questions import from_records

    model = f"gone-{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        session.add(RegisteredModel(name=model, kind="inserter", s3_prefix=f"models/{model}"))
    config = job_config(collection, inserter=f"checkpoint:{model}")
    job_id = submit_job(from_records(records), config, name="broken inserter", enqueue=False)
    with session_scope() as session:
        session.query(RegisteredModel).filter(RegisteredModel.name == model).delete()
        queued = session.scalars(select(Query.id).where(Query.job_id == job_id)).all()
    send_or_mark_failed(job_id, [(query_id, Stage.RETRIEVER) for query_id in queued])
    return job_id


def test_submit_refuses_what_cannot_run(servers, tmp_path):
    missing = m2io("submit", str(tmp_path / "nope.jsonl"), "--collection", "x")
    assert missing.returncode == 1 and "No such file" in missing.stderr
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    unknown = m2io("submit", str(questions), "--collection", f"absent-{uuid.uuid4().hex[:6]}")
    assert unknown.returncode == 1 and "no collection named" in unknown.stderr
    bad = m2io("submit", str(questions), "--collection", "x", "--inserter", "magic")
    assert bad.returncode == 1 and "unknown inserter backend 'magic'" in bad.stderr
    assert m2io("status", "not-a-job").returncode == 1
    assert "no job" in m2io("export", str(uuid.uuid4()), "--out", str(tmp_path / "o")).stderr


@pytest.mark.slow
@pytest.mark.timeout(900)  # ingests all 122 recipes: every unit and image text is embedded too (~2x the words)
def test_demo_answers_the_shipped_corpus(workers, tmp_path):
    """`m2io demo` (without starting a cluster: the test's servers and workers are the cluster)."""
    start_pipeline(workers)
    out = tmp_path / "demo"
    demo = m2io("demo", "--no-start", "--limit", "4", "--out", str(out), "--collection", "demo-test", timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "answered" in demo.stdout and "image f1" in demo.stdout and "time per stage" in demo.stdout
    assert "122 " in demo.stdout  # the ingest summary: the shipped recipes corpus, every document in
    pages = sorted(out.glob("*.html"))
    assert len(pages) == 5 and (out / "index.html") in pages  # 4 answers and the index
    with session_scope() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(EvalRun).where(EvalRun.config["collection"].astext == "demo-test")
            )
            == 1
        )


def test_a_dead_broker_leaves_no_query_waiting_forever(servers, tmp_path):
    """Submitting while Redis is down stores the job, marks its queries failed (retryable) and says
    so; `retry` sends them once the broker is back."""
    from infra.processes import free_port
    from tests.conftest import purge_queues

    name = f"broker-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    env_backup = os.environ["M2IO_REDIS_URL"]
    os.environ["M2IO_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    try:
        refused = m2io("submit", str(questions), "--collection", name)
    finally:
        os.environ["M2IO_REDIS_URL"] = env_backup
    assert refused.returncode == 1 and "could not be enqueued" in refused.stderr
    job_id = last_line(refused.stdout)
    status = Client().status(job_id)
    assert status.state == "failed" and {f.stage for f in status.failures} == {"enqueue"}
    assert "could not reach the broker" in status.failures[0].error
    try:
        report = Client().retry(job_id)
        assert report.requeued == {"retriever": 2}
        from services.common.health import queue_depths
        from services.common.settings import get_settings

        assert queue_depths(get_settings().redis_url)["retriever"] >= 2
        assert Client().status(job_id).counts == {"queued": 2}
    finally:
        purge_queues()


# ---------------------------------------------------------------- a job's scale: batches, aggregates, streams
def test_a_large_submit_is_stored_in_batches_and_each_message_sent_once(servers, tmp_path):
    """1,200 lines through the real CLI (two INSERT batches, three publish pipelines), one of them not
    JSON: it is reported as before and stored as a failed query; every other query is stored once and
    its message is on the retriever queue exactly once (no worker runs here to take it)."""
    import base64
    from collections import Counter

    import redis

    from services.common.settings import get_settings
    from tests.conftest import purge_queues

    name = collection_row()
    records = [{"id": f"q{n}", "question": f"How do I make dish number {n}?"} for n in range(1, 1201)]
    lines = [json.dumps(record) for record in records]
    lines[699] = '{"id": "q700", "question": '  # line 700: cut short
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    purge_queues()
    try:
        submitted = m2io("submit", str(path), "--collection", name)
        assert submitted.returncode == 0, submitted.stderr
        assert "1200 questions queued, 1 refused" in submitted.stderr
        assert "line 700: invalid JSON" in submitted.stderr
        job_id = uuid.UUID(last_line(submitted.stdout))
        with session_scope() as session:
            stored = session.execute(select(Query.id, Query.line, Query.status).where(Query.job_id == job_id)).all()
        assert sorted(line for _, line, _ in stored) == list(range(1, 1201))
        queued = {query_id for query_id, line, status in stored if status == "queued"}
        assert len(queued) == 1199 and all(status == "failed" for _, line, status in stored if line == 700)
        messages = redis.Redis.from_url(get_settings().redis_url).lrange("retriever", 0, -1)
        sent = Counter()
        for raw in messages:
            envelope = json.loads(raw)
            args, _, _ = json.loads(base64.b64decode(envelope["body"]))
            assert envelope["headers"]["task"] == "retriever.retrieve"
            sent[uuid.UUID(args[0]["query_id"])] += 1
        assert set(sent) == queued and set(sent.values()) == {1}
    finally:
        purge_queues()


def collection_row() -> str:
    """A collection for jobs that are stored but never run (submit checks only that it exists)."""
    from services.common.models import Collection

    name = f"rows-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        session.add(Collection(name=name, embedding_model="none", embedding_dim=384))
    return name


def test_a_broker_lost_mid_submit_fails_only_the_unsent_batches(servers, monkeypatch):
    """The publish pipelines that went out stay queued for their workers; the one that failed (its
    delivery uncertain) and every later one are marked failed, retryable, and EnqueueError counts them."""
    from services.common.queues import Stage
    from services.jobs import commands
    from services.jobs.questions import from_records

    monkeypatch.setattr(commands, "INSERT_BATCH", 7)  # several INSERTs in one transaction
    monkeypatch.setattr(commands, "PUBLISH_BATCH", 10)
    config = commands.job_config(collection_row())
    records = [{"id": f"q{n}", "question": f"question {n}?"} for n in range(25)]
    job_id = commands.submit_job(from_records(records), config, enqueue=False)
    with session_scope() as session:
        ids = session.scalars(select(Query.id).where(Query.job_id == job_id).order_by(Query.line)).all()
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise ConnectionError("broker went away")

    with pytest.raises(commands.EnqueueError, match="15 queries could not be enqueued"):
        commands.send_or_mark_failed(job_id, [(query_id, Stage.RETRIEVER) for query_id in ids], enqueue=flaky)
    assert calls == [10, 10]
    with session_scope() as session:
        states = dict(session.execute(select(Query.id, Query.status).where(Query.job_id == job_id)).all())
        stages = set(session.scalars(select(Query.error_stage).where(Query.job_id == job_id, Query.status == "failed")))
    assert [states[query_id] for query_id in ids] == ["queued"] * 10 + ["failed"] * 15 and stages == {"enqueue"}


def test_a_questions_file_of_blank_lines_stores_nothing(servers, tmp_path):
    from services.common.models import Job

    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n")
    with session_scope() as session:
        before = session.scalar(select(func.count()).select_from(Job))
    with pytest.raises(ValueError, match="holds no questions"):
        Client().submit(path, collection_row())
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == before


def reference_status(job_id: uuid.UUID, gone):
    """What `job_status` computed before its aggregates moved into SQL: every query and stage run of the
    job read into Python, walked query by query (the code as it was, kept here as the reference)."""
    import statistics

    from services.jobs.status import INPUT_STAGE, TERMINAL, QueryFailure, StageSummary, percentile

    with session_scope() as session:
        queries = session.execute(
            select(
                Query.id, Query.external_id, Query.status, Query.error, Query.error_stage, Query.line, Query.created_at
            ).where(Query.job_id == job_id)
        ).all()
        runs = session.execute(
            select(
                StageRun.query_id,
                StageRun.stage,
                StageRun.status,
                StageRun.started_at,
                StageRun.finished_at,
                StageRun.worker,
            )
            .join(Query, Query.id == StageRun.query_id)
            .where(Query.job_id == job_id)
            .order_by(StageRun.attempt, StageRun.id)
        ).all()
    by_query: dict = {}
    for run in runs:
        by_query.setdefault(run.query_id, {}).setdefault(run.stage, []).append(run)
    summaries = {stage: StageSummary(stage=stage) for stage in PIPELINE}
    durations: dict = {stage: [] for stage in PIPELINE}
    waits: dict = {stage: [] for stage in PIPELINE}
    latencies = []
    for query in queries:
        stages = by_query.get(query.id, {})
        previous_end = query.created_at
        for stage in PIPELINE:
            summary = summaries[stage]
            attempts = stages.get(stage, [])
            summary.attempts += len(attempts)
            summary.lost += sum(run.status == "lost" for run in attempts)
            won = next((run for run in attempts if run.status == "succeeded"), None)
            if won is not None:
                summary.succeeded += 1
                durations[stage].append((won.finished_at - won.started_at).total_seconds())
                first_start = min(run.started_at for run in attempts)
                if previous_end is not None:
                    waits[stage].append(max(0.0, (first_start - previous_end).total_seconds()))
                previous_end = won.finished_at
                if stage == PIPELINE[-1]:
                    latencies.append((won.finished_at - query.created_at).total_seconds())
                continue
            last = attempts[-1].status if attempts else None
            if last == "running" and gone(attempts[-1].worker, attempts[-1].started_at):
                summary.waiting += 1
            elif last == "running":
                summary.running += 1
            elif last == "retrying" and query.status not in TERMINAL:
                summary.retrying += 1
            elif last == "failed":
                summary.failed += 1
            elif query.status not in ("failed", "cancelled") or last is not None:
                summary.pending += 1
            previous_end = None
    for stage in PIPELINE:
        summary, values = summaries[stage], durations[stage]
        summary.p50_s, summary.p99_s = percentile(values, 0.5), percentile(values, 0.99)
        summary.mean_s = round(statistics.fmean(values), 4) if values else None
        summary.wait_p50_s, summary.wait_p99_s = percentile(waits[stage], 0.5), percentile(waits[stage], 0.99)
    failed_stage = {run.query_id: run.stage for run in runs if run.status == "failed"}
    failures = sorted(
        (
            QueryFailure(
                query_id=query.id,
                id=query.external_id,
                stage=query.error_stage or failed_stage.get(query.id) or INPUT_STAGE,
                error=query.error or "failed without a message",
                line=query.line,
            )
            for query in queries
            if query.status == "failed"
        ),
        key=lambda f: (f.line or 0, f.id),
    )
    return list(summaries.values()), (percentile(latencies, 0.5), percentile(latencies, 0.99)), failures


def test_status_aggregates_equal_the_row_by_row_computation(servers):
    """A job whose queries stand everywhere a query can (answered, redelivered, retrying, failed at a
    stage or at its line, running on a live or a stopped worker, cancelled, superseded, not started),
    with durations to the microsecond: the SQL aggregates equal the old walk over every row."""
    import random
    from datetime import timedelta

    from services.jobs import commands
    from services.jobs.questions import from_records
    from services.jobs.status import job_status, worker_gone

    rng = random.Random(7)
    records = [{"id": f"q{n:02d}", "question": f"question {n}?"} for n in range(60)]
    records.insert(30, {"id": "", "question": "no id"})  # an input failure, line 31
    job_id = commands.submit_job(from_records(records), commands.job_config(collection_row()), enqueue=False)
    with session_scope() as session:
        queries = session.scalars(select(Query).where(Query.job_id == job_id).order_by(Query.line)).all()
        valid = [query for query in queries if query.status == "queued"]

        def run(query, stage, attempt, status, start, seconds=None, worker="w@test"):
            at = query.created_at + timedelta(microseconds=start)
            end = at + timedelta(microseconds=seconds) if seconds is not None else None
            session.add(
                StageRun(
                    query_id=query.id,
                    stage=stage,
                    attempt=attempt,
                    status=status,
                    worker=worker,
                    started_at=at,
                    finished_at=end,
                )
            )
            return start + (seconds or 0)

        for number, query in enumerate(valid):
            t = rng.randrange(0, 2_000_000)
            kind = number % 10
            for position, stage in enumerate(PIPELINE):
                if kind == 1 and stage == "retriever":  # redelivered: a lost attempt, then the winner
                    t = run(query, stage, 1, "lost", t, rng.randrange(1, 900_000))
                    t = run(query, stage, 2, "succeeded", t + 5, rng.randrange(1, 900_000))
                    continue
                if kind == 2 and stage == "inserter":  # failed permanently
                    run(query, stage, 1, "failed", t + 3, 1234)
                    query.status, query.error, query.error_stage = "failed", "boom", stage
                    break
                if kind == 3 and stage == "generator":  # retrying, still running
                    run(query, stage, 1, "retrying", t + 1, 50)
                    query.status = "running"
                    break
                if kind == 4 and position == 0:  # running on a worker that stopped, or on an unnamed one
                    run(query, stage, 1, "running", t, worker="gone@test" if number % 20 == 4 else None)
                    query.status = "running"
                    break
                if kind == 5:  # never started
                    break
                if kind == 6 and stage == "generator":  # cancelled after a superseded attempt
                    run(query, stage, 1, "superseded", t, 10)
                    query.status = "cancelled"
                    break
                if kind == 7 and stage == "retriever":  # failed before error_stage existed; retrying left over
                    run(query, stage, 1, "retrying", t, 10)
                    run(query, stage, 2, "failed", t + 20, 10)
                    query.status, query.error = "failed", None
                    break
                if kind == 8 and stage == "merger":  # retrying, but its query failed meanwhile
                    run(query, stage, 1, "retrying", t, 10)
                    query.status, query.error, query.error_stage = "failed", "gave up", "merger"
                    break
                t = run(query, stage, 1, "succeeded", t + rng.randrange(0, 300_000), rng.randrange(1, 2_000_000))
            else:
                query.status = "succeeded"
    status = job_status(job_id)
    stages, latency, failures = reference_status(job_id, worker_gone())
    assert status.stages == stages
    assert (status.end_to_end_p50_s, status.end_to_end_p99_s) == latency
    assert status.failures == failures
    assert {s.stage: (s.waiting, s.running) for s in status.stages}["retriever"] == (3, 3)
    assert sum(s.failed for s in status.stages) == 12 and status.counts["failed"] == 19


def succeeded_run(query_id: uuid.UUID, stage: str, output) -> StageRun:
    return StageRun(query_id=query_id, stage=stage, attempt=1, status="succeeded", output=output.model_dump())


def stored_job_of_answers(blocks_of: dict[str, list | None], images: dict[str, bytes]) -> uuid.UUID:
    """A job as the merger leaves it, one query per entry of `blocks_of` in that order: answered with those
    blocks (the images of its retrieval in S3, its HTML page in S3 unless its id ends in `-rerender`), or,
    for None, failed. Lines 1, 4, 7... also get a text answer and a plan when answered."""
    from services.common.contracts import (
        AnswerBlock,
        InsertionPlan,
        JobConfig,
        Placement,
        Retrieval,
        TextAnswer,
    )
    from services.common.models import Job
    from services.common.storage import get_store
    from services.merger.core import to_html, to_markdown

    store = get_store()
    store.ensure_bucket()
    candidates = stored_candidates(store, images)
    with session_scope() as session:
        job = Job(kind="answer", name="streamed", config=JobConfig(collection="stored").model_dump(mode="json"))
        session.add(job)
        session.flush()
        for line, (external_id, blocks) in enumerate(blocks_of.items(), start=1):
            question = f"How do I {external_id}?"
            query = Query(job_id=job.id, external_id=external_id, question=question, line=line, status="succeeded")
            if blocks is None:
                query.status, query.error, query.error_stage = "failed", f"no luck at line {line}", "generator"
            session.add(query)
            session.flush()
            retrieval = Retrieval(collection="stored", question=question, passages=[], candidates=candidates)
            session.add(succeeded_run(query.id, "retriever", retrieval))
            if blocks is None:
                continue
            if line % 3 == 1:
                text_answer = TextAnswer(
                    units=[], backend="extractive", mode="section", sections=["Frying"], reason="a section"
                )
                plan = InsertionPlan(placements=[Placement(image="images/pic.png", after=1)], backend="rule")
                session.add(succeeded_run(query.id, "generator", text_answer))
                session.add(succeeded_run(query.id, "inserter", plan))
            answer_blocks = [AnswerBlock.model_validate(block) for block in blocks]
            html_key = None
            if not external_id.endswith("-rerender"):
                page, _ = to_html(question, answer_blocks, candidates, store)
                html_key = f"answers/{query.id}/answer.html"
                store.put_named(html_key, page.encode(), "text/html")
            session.add(
                Answer(query_id=query.id, markdown=to_markdown(answer_blocks), blocks=blocks, html_key=html_key)
            )
        return job.id


def test_a_streamed_export_writes_what_one_read_of_the_whole_job_wrote(servers, tmp_path, monkeypatch):
    """The export streams a job a batch at a time; with batches of 2 it writes, byte for byte, the files
    that one batch of the whole job writes (which is how it read a job before: all at once), including
    the names a clash renames, images placed off question files, and re-rendered pages."""
    from services.jobs import export
    from tests.corpus_fixtures import png

    images = {name: png((40 * n, 90, 30)) for n, name in enumerate(["images/pic.png", "index.html", "a_b.json"])}
    text = {"type": "text", "text": "Heat the pan & **fry**.", "kind": "paragraph"}
    blocks_of = {
        "a/b": [text, {"type": "image", "source_name": "images/pic.png", "caption": "pic"}],
        "a_b": [text, {"type": "image", "source_name": "index.html", "caption": "clash"}],
        "broken": None,
        "..": [{"type": "text", "text": "# Step", "kind": "heading", "level": 2}, text],
        "x-rerender": [text, {"type": "image", "source_name": "a_b.json", "caption": "clash too"}],
        "a/b ": None,
        "last": [text],
    }
    job_id = stored_job_of_answers(blocks_of, images)
    results = {}
    for batch in (2, 10_000):
        monkeypatch.setattr(export, "EXPORT_BATCH", batch)
        results[batch] = export.export_job(job_id, tmp_path / f"batch-{batch}")

    def tree(root):
        return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}

    streamed, whole = tree(tmp_path / "batch-2"), tree(tmp_path / "batch-10000")
    assert streamed == whole
    assert (results[2].questions, results[2].answered, results[2].images_written) == (7, 5, 3)
    assert results[2].warnings == results[10_000].warnings
    assert {"a_b.json", "a_b-2.json", "question.json", "images/index.html", "images/a_b.json"} <= set(streamed)
    record = json.loads(streamed["a_b-2.json"])
    assert record["id"] == "a_b" and record["blocks"][1]["source_name"] == "index.html"
    assert json.loads(streamed["last.json"])["answered_from"] == {
        "mode": "section",
        "sections": ["Frying"],
        "reason": "a section",
        "truncated": False,
    }
    assert json.loads(streamed["last.json"])["placements"][0]["image"] == "images/pic.png"
    index = streamed["index.html"].decode()
    assert index.index("a_b-2.html") < index.index("broken.html") < index.index("last.html")
    assert "generator: no luck at line 3" in index
