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
from tests.corpus_fixtures import write_markdown_corpus
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
    assert set(fry) == {"id", "question", "status", "blocks", "answered_from", "placements", "error"}
    assert fry["id"] == "pancakes/fry" and fry["status"] == "succeeded" and fry["error"] is None
    images = [b for b in fry["blocks"] if b["type"] == "image"]
    assert {"type": "image", "source_name": "images/frying.jpg", "caption": "Pancake frying in a pan"} in images
    assert all({"type", "text", "kind"} <= set(b) for b in fry["blocks"] if b["type"] == "text")
    assert fry["answered_from"]["mode"] in ("section", "sentences") and fry["answered_from"]["reason"]
    assert {p["image"] for p in fry["placements"]} == {b["source_name"] for b in images}
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
