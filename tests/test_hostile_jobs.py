"""Hostile input to batch jobs, through the real `m2io` CLI (a subprocess) against the session's real
Postgres, Redis and S3: a NUL or a lone surrogate fails its line alone, backends that can never run are
refused before anything is stored, an export never lets an image overwrite a question's file and escapes
document HTML, and a server that is down (or a path that is not what it should be) is one line naming
the server and the fix, never a traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid

from sqlalchemy import func, select

from services.common.contracts import AnswerBlock, JobConfig, Retrieval
from services.common.db import session_scope
from services.common.models import Answer, Job, Query, StageRun
from services.common.storage import get_store
from services.merger.core import to_html, to_markdown
from tests.conftest import purge_queues
from tests.corpus_fixtures import png, stored_candidates, write_markdown_corpus
from tests.test_ingest import ingest_in_process
from tests.test_jobs import QUESTIONS, last_line, m2io, write_questions


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_env(**changes: str):
    """os.environ changed for the CLI subprocesses `m2io()` starts, as a context manager."""
    import contextlib

    @contextlib.contextmanager
    def changed():
        saved = {key: os.environ.get(key) for key in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return changed()


def job_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job))


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Error(" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_nul_or_a_lone_surrogate_fails_its_line_alone(servers, tmp_path):
    name = f"nul-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    poison = [
        {"id": "n", "question": "apple\u0000pie"},
        {"id": "gold", "question": "How?", "gold_answer": "a\u0000b"},
        {"id": "bad\u0000id", "question": "How?"},
        {"id": "images", "question": "How?", "gold_images": ["ok.jpg", "x\u0000.jpg"]},
        {"id": "section", "question": "How?", "section": {"k\u0000": "v"}},
        {"id": "where", "question": "How?", "collection": "c\u0000"},
        {"id": "surrogate", "question": "pie \ud800"},
        {"id": "doc", "question": "How?", "doc_id": "\udcff"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in [*QUESTIONS, *poison]), encoding="utf-8")
    try:
        submitted = m2io("submit", str(path), "--collection", name)
        assert submitted.returncode == 0, submitted.stderr
        assert "Traceback" not in submitted.stderr
        job_id = uuid.UUID(last_line(submitted.stdout))
        assert f"{len(QUESTIONS) + len(poison)} questions queued, {len(poison)} refused" in submitted.stderr
        with session_scope() as session:
            rows = {q.external_id: q for q in session.scalars(select(Query).where(Query.job_id == job_id))}
        assert {key for key, row in rows.items() if row.status == "queued"} == {q["id"] for q in QUESTIONS}
        errors = {key: row.error for key, row in rows.items() if row.status == "failed"}
        assert errors == {
            "n": "line 3: `question` holds a NUL character (U+0000) at position 5",
            "gold": "line 4: `gold_answer` holds a NUL character (U+0000) at position 1",
            "line-5": "line 5: `id` holds a NUL character (U+0000) at position 3",
            "images": "line 6: `gold_images`[1] holds a NUL character (U+0000) at position 1",
            "section": "line 7: a key of `section` holds a NUL character (U+0000) at position 1",
            "where": "line 8: `collection` holds a NUL character (U+0000) at position 1",
            "surrogate": "line 9: `question` holds a lone surrogate (U+D800) at position 4",
            "doc": "line 10: `doc_id` holds a lone surrogate (U+DCFF) at position 0",
        }
        assert all(rows[key].error_stage == "input" and rows[key].gold == {} for key in errors)

        odd = write_questions(tmp_path / "q\udcff.jsonl", QUESTIONS)  # a file name that is not UTF-8
        named = m2io("submit", str(odd), "--collection", name)
        assert named.returncode == 0, named.stderr
        with session_scope() as session:
            assert session.get(Job, uuid.UUID(last_line(named.stdout))).name == "q\\udcff.jsonl"  # the job's name
    finally:
        purge_queues()


def test_submit_refuses_backends_that_can_never_run(servers, tmp_path):
    name = f"backends-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    questions = str(write_questions(tmp_path / "q.jsonl", QUESTIONS))
    before = job_count()
    refusals = {
        ("--inserter", "checkpoint:does-not-exist"): "no registered inserter model 'does-not-exist' (registered:",
        ("--generator", "openai"): "set M2IO_OPENAI_BASE_URL",
        ("--generator", "local:/etc"): "/etc is not a transformers model folder (no config.json)",
        ("--inserter", "llm:local:/nonexistent"): "model folder /nonexistent does not exist",
        ("--inserter", "llm:/nonexistent"): "unknown LLM '/nonexistent': use local, local:<name or path>",
    }
    for (option, backend), reason in refusals.items():
        refused = m2io("submit", questions, "--collection", name, option, backend)
        assert_one_line_error(refused, f"{option.removeprefix('--')} backend {backend!r} cannot run", reason)
    assert_one_line_error(m2io("submit", questions, "--collection", ""), "collection name is empty")
    assert_one_line_error(m2io("eval", questions, "--collection", " "), "collection name is empty")
    assert job_count() == before  # nothing was stored


def stored_answer(question_id: str, blocks: list[AnswerBlock], images: dict[str, bytes]) -> uuid.UUID:
    """A job with one answered question, as the merger leaves it: its retrieval's candidate images in S3,
    the answer's blocks and Markdown in Postgres, its HTML page in S3."""
    store = get_store()
    store.ensure_bucket()
    candidates = stored_candidates(store, images)
    question = "How do <b>I</b> fry?"
    with session_scope() as session:
        job = Job(kind="answer", name="stored", config=JobConfig(collection="stored").model_dump(mode="json"))
        session.add(job)
        session.flush()
        query = Query(job_id=job.id, external_id=question_id, question=question, line=1, status="succeeded")
        session.add(query)
        session.flush()
        retrieval = Retrieval(collection="stored", question=question, passages=[], candidates=candidates)
        session.add(
            StageRun(query_id=query.id, stage="retriever", attempt=1, status="succeeded", output=retrieval.model_dump())
        )
        page, _ = to_html(question, blocks, candidates, store)
        html_key = f"answers/{query.id}/answer.html"
        store.put_named(html_key, page.encode(), "text/html")
        session.add(
            Answer(
                query_id=query.id,
                markdown=to_markdown(blocks),
                blocks=[block.model_dump() for block in blocks],
                html_key=html_key,
            )
        )
        return job.id


def test_export_keeps_images_off_question_files_and_escapes_document_html(servers, tmp_path):
    names = ["clash.json", "index.html", "clash.md/inner.png", "images/pic.png"]
    images = {name: png((10 * n, 20, 30)) for n, name in enumerate(names)}
    blocks = [
        AnswerBlock(type="text", text="Heat <script>alert(1)</script> the pan & [go](javascript:alert(2))."),
        *[AnswerBlock(type="image", source_name=name, caption="<img src=x onerror=alert(3)>") for name in names],
        AnswerBlock(type="text", text="[ref]: JavaScript:alert(4)"),
    ]
    job_id = stored_answer("clash", blocks, images)
    out = tmp_path / "export"
    exported = m2io("export", str(job_id), "--out", str(out))
    assert exported.returncode == 0, exported.stderr

    record = json.loads((out / "clash.json").read_text())
    assert record["id"] == "clash" and record["status"] == "succeeded"  # the question's JSON, not an image
    assert (out / "index.html").read_text().startswith("<!doctype html>")
    assert "m2io job stored" in (out / "index.html").read_text()
    assert (out / "clash.md").is_file() and (out / "clash.html").read_text().startswith("<!doctype html>")
    for name in ("clash.json", "index.html", "clash.md/inner.png"):
        assert f"image {name!r} would overwrite another file of the export; written as images/{name}" in (
            exported.stderr
        )
    markdown = (out / "clash.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert links == ["images/clash.json", "images/index.html", "images/clash.md/inner.png", "images/pic.png"]
    for link, name in zip(links, names, strict=True):
        assert (out / link).read_bytes() == images[name]  # every link resolves, to its own image

    assert "<script" not in markdown and "<img" not in markdown and "<b>" not in markdown
    assert "javascript:" not in markdown.lower()
    assert "&lt;script>alert(1)&lt;/script>" in markdown and "[go](#)" in markdown
    assert markdown.startswith("# How do &lt;b>I&lt;/b> fry?\n")


def test_server_and_path_errors_are_one_line(servers, tmp_path):
    job_id = stored_answer("one", [AnswerBlock(type="text", text="Fry.")], {})
    port = closed_port()

    with with_env(M2IO_S3_ENDPOINT=f"127.0.0.1:{port}"):
        s3_down = m2io("export", str(job_id), "--out", str(tmp_path / "s3-down"))
    assert_one_line_error(s3_down, f"cannot reach S3 at 127.0.0.1:{port}", "Connection refused", "`m2io up`")
    assert "M2IO_S3_ENDPOINT" in s3_down.stderr and "MaxRetryError" not in s3_down.stderr
    assert "object at 0x" not in s3_down.stderr

    real = servers.database_url
    down = re.sub(r"@([^:/]+):(\d+)/", f"@127.0.0.1:{port}/", real)
    with with_env(M2IO_DATABASE_URL=down):
        db_down = m2io("status")
    assert_one_line_error(db_down, "cannot reach PostgreSQL at postgresql+psycopg://127.0.0.1:", "`m2io up`")
    assert "M2IO_DATABASE_URL" in db_down.stderr
    from sqlalchemy.engine import make_url

    password = make_url(real).password
    assert not password or password not in db_down.stderr  # the URL is printed without its secret

    with with_env(M2IO_REDIS_URL=f"redis://:secret-word@127.0.0.1:{port}/0"):
        redis_down = m2io("ingest", str(write_markdown_corpus(tmp_path / "corpus")), "--collection", "no-broker")
    assert_one_line_error(redis_down, f"cannot reach Redis at redis://127.0.0.1:{port}/0", "`m2io up`")
    assert "M2IO_REDIS_URL" in redis_down.stderr and "secret-word" not in redis_down.stderr

    a_file = tmp_path / "answers.txt"
    a_file.write_text("not a folder")
    assert_one_line_error(m2io("export", str(job_id), "--out", str(a_file)), "answers.txt is a file, not a folder")


def test_search_options_and_questions_files(servers, tmp_path):
    name = f"search-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    assert_one_line_error(m2io("search", "--collection", name, "--top-k", "-5", "pancakes"), "top_k=-5: use 1..100")
    assert_one_line_error(m2io("search", "--collection", name, "--candidates", "500", "pancakes"), "use 0..100")
    assert_one_line_error(m2io("search", "--collection", "", "pancakes"), "--collection is empty")
    assert_one_line_error(m2io("search", "--collection", "c" * 3000, "pancakes"), "3,000 characters (limit 200)")

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        json.dumps({"id": "ok", "question": "How do I fry pancakes?"}).encode() + b"\n"
        b'{"id": "crepe", "question": "Cr\xeape?"}\n'
    )
    searched = m2io("search", "--collection", name, "--questions", str(latin1), "--json", "--top-k", "2")
    assert searched.returncode == 0 and "Traceback" not in searched.stderr, searched.stderr
    assert "line 2 skipped: invalid UTF-8 at byte 31" in searched.stderr
    (answered,) = [json.loads(line) for line in searched.stdout.splitlines() if line.startswith("{")]
    assert answered["id"] == "ok" and len(answered["passages"]) == 2


def test_no_server_configured_at_all_is_one_line_too(tmp_path):
    """No `m2io up` cluster and no M2IO_* setting: the commands say what to do, without a traceback."""
    bare = {key: value for key, value in os.environ.items() if not key.startswith("M2IO_")}
    env = {**bare, "M2IO_STATE_DIR": str(tmp_path / "nothing-here"), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    for args in (("status",), ("export", str(uuid.uuid4()), "--out", str(tmp_path / "out"))):
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert_one_line_error(result, "no database configured", "`m2io up`", "M2IO_DATABASE_URL")


def test_ingest_refuses_an_empty_collection_name(tmp_path):
    assert_one_line_error(
        m2io("ingest", str(write_markdown_corpus(tmp_path / "corpus")), "--collection", " "), "--collection is empty"
    )
