"""Ingestion through the queue with a real retriever worker, then search, on real servers and the
real offline embedding model."""

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

from services.common.db import session_scope
from services.common.models import Chunk, Collection, Document, Image, IngestItem, Job, Query, StageRun
from tests.corpus_fixtures import write_markdown_corpus, write_mramg_corpus

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


def m2io(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def collection_counts(name: str) -> dict[str, int]:
    with session_scope() as session:
        collection = session.execute(select(Collection).where(Collection.name == name)).scalar_one()
        count = lambda model: session.scalar(  # noqa: E731
            select(func.count()).select_from(model).where(model.collection_id == collection.id)
        )
        return {"documents": count(Document), "chunks": count(Chunk), "images": count(Image)}


def test_ingest_through_the_queue_reports_skips_and_is_idempotent(workers, tmp_path):
    workers.start("retriever")
    corpus = write_markdown_corpus(tmp_path / "corpus")
    name = f"fixture-{uuid.uuid4().hex[:8]}"

    first = m2io("ingest", str(corpus), "--collection", name)
    assert first.returncode == 0, first.stdout + first.stderr
    run_id = uuid.UUID(first.stdout.strip().splitlines()[-1])  # the run id alone on the last line
    for reason in (
        "invalid UTF-8",
        "empty document",
        "malformed metadata line",
        "missing image file",
        "decompression bomb",
        "corrupt image",
        "not an image",
    ):
        assert reason in first.stdout, reason
    with session_scope() as session:
        items = session.scalars(select(IngestItem).where(IngestItem.run_id == run_id)).all()
    by_key = {item.doc_key: item for item in items if item.doc_key}
    assert {k: v.status for k, v in by_key.items()} == {
        "pancakes": "ingested",
        "tomato-soup": "ingested",
        "bad-images": "ingested",
    }
    assert len(by_key["bad-images"].warnings) == 4
    assert sorted(item.reason for item in items if item.status == "skipped") == [
        "empty document",
        "invalid UTF-8 at byte 5",
        "malformed metadata line: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ]
    counts = collection_counts(name)
    assert counts["documents"] == 3 and counts["images"] == 4 and counts["chunks"] >= 5
    with session_scope() as session:
        pancake_images = session.execute(
            select(Image.source_name, Image.position, Image.caption)
            .join(Document)
            .join(Collection, Collection.id == Document.collection_id)
            .where(Collection.name == name, Document.doc_key == "pancakes")
            .order_by(Image.position)
        ).all()
        dims = session.scalars(select(Chunk.embedding_dim).join(Collection).where(Collection.name == name)).all()
    assert [(row.source_name, row.caption) for row in pancake_images] == [
        ("images/pancakes.png", "A stack of pancakes"),
        ("images/frying.jpg", "Pancake frying in a pan"),
    ]
    assert set(dims) == {384}

    again = m2io("ingest", str(corpus), "--collection", name)
    assert again.returncode == 0, again.stderr
    assert collection_counts(name) == counts  # no duplicates
    rerun = uuid.UUID(again.stdout.strip().splitlines()[-1])
    with session_scope() as session:
        statuses = session.scalars(
            select(IngestItem.status).where(IngestItem.run_id == rerun, IngestItem.doc_key.is_not(None))
        ).all()
    assert sorted(statuses) == ["unchanged"] * 3

    soup = corpus / "docs" / "tomato-soup.md"
    soup.write_text(soup.read_text().replace("Blend with stock until smooth.", "Blend with cream and basil."))
    changed = m2io("ingest", str(corpus), "--collection", name)
    assert changed.returncode == 0, changed.stderr
    with session_scope() as session:
        soup_text = " ".join(
            session.scalars(
                select(Chunk.text)
                .join(Document)
                .join(Collection)
                .where(Collection.name == name, Document.doc_key == "tomato-soup")
            ).all()
        )
    assert "cream and basil" in soup_text and "Blend with stock" not in soup_text
    assert collection_counts(name)["documents"] == 3

    mismatch = m2io("ingest", str(corpus), "--collection", name, "--model", "BAAI/bge-m3")
    assert mismatch.returncode != 0
    assert "cannot take vectors of 'BAAI/bge-m3'" in " ".join(mismatch.stderr.split())


def ingest_in_process(path: Path, name: str) -> uuid.UUID:
    """The same functions as the CLI and the worker, called in this process."""
    from services.common.contracts import IngestBatch
    from services.common.embedding import DEFAULT_EMBEDDING_MODEL
    from services.common.storage import get_store
    from services.retriever.ingest_runs import index_batch, stage_run

    store = get_store()
    store.ensure_bucket()
    staged = stage_run(path, name, DEFAULT_EMBEDDING_MODEL, store)
    for batch in staged.batches:
        index_batch(IngestBatch(run_id=staged.run_id, item_ids=batch))
    return staged.run_id


def test_mramg_layout_search_cli_and_retrieve_task(workers, tmp_path):
    corpus = write_mramg_corpus(tmp_path / "mramg")
    name = f"mramg-{uuid.uuid4().hex[:8]}"
    ingest_in_process(corpus, name)
    assert collection_counts(name) == {"documents": 2, "chunks": 2, "images": 2}
    with session_scope() as session:
        harbour = (
            session.execute(
                select(Image).where(Image.source_name == "IMAGE/images/toy/harbour.png").order_by(Image.id.desc())
            )
            .scalars()
            .first()
        )
    assert harbour.caption == "Fishing boats moored in a small harbour" and harbour.position == 1

    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"id": "q1", "question": "Where do fishing boats moor?"})
        + "\n"
        + "not json\n"
        + json.dumps({"id": "q2", "question": "What guides ships at night?"})
        + "\n"
    )
    found = m2io("search", "--collection", name, "--questions", str(questions), "--json", "--top-k", "2")
    assert found.returncode == 0, found.stderr
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["q1", "q2"]
    assert lines[0]["documents"][0] == "toy/d2"
    assert lines[0]["images"][0]["source_name"] == "IMAGE/images/toy/harbour.png"
    assert lines[1]["documents"][0] == "toy/d1"
    assert "line 2 skipped" in found.stderr

    unknown = m2io("search", "--collection", "no-such-collection", "anything")
    assert unknown.returncode != 0 and "no collection named" in unknown.stderr

    # the retriever stage through its queue, for a query of a job
    workers.start("retriever")
    with session_scope() as session:
        job = Job(kind="answer", config={"collection": name, "top_k": 2})
        session.add(job)
        session.flush()
        query = Query(job_id=job.id, external_id="q1", question="Which image shows the lighthouse?")
        session.add(query)
        session.flush()
        query_id = query.id
    from services.common.celery_app import app

    app.send_task("retriever.retrieve", args=[{"query_id": str(query_id)}])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope() as session:
            run = session.execute(select(StageRun).where(StageRun.query_id == query_id)).scalar_one_or_none()
            if run is not None and run.status in ("succeeded", "failed"):
                break
        time.sleep(0.3)
    assert run is not None and run.status == "succeeded", run and run.error
    assert run.output["passages"][0]["doc_key"] == "toy/d1"
    assert run.output["candidates"][0]["source_name"] == "IMAGE/images/toy/lighthouse.png"


def test_retrieval_quality_on_the_recipe_corpus():
    """The real corpus with the default offline model: the bench's aims, held as a floor."""
    from bench.retrieval_quality import score_corpus
    from services.cli.demo import DEMO_CORPUS  # the copy of ../shared/corpora/recipes shipped in the repo
    from services.common.embedding import DEFAULT_EMBEDDING_MODEL

    name = f"recipes-{uuid.uuid4().hex[:8]}"
    ingest_in_process(DEMO_CORPUS, name)
    report = score_corpus(DEMO_CORPUS, name, DEFAULT_EMBEDDING_MODEL, top_k=5, candidates=12)
    assert report["doc_recall@5"] >= 0.95
    assert report["gold_image_coverage"] >= 0.95
