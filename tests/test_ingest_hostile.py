"""Hostile corpora (issue 17, items 3, 5-8, 11 and the minor ingest ones), with real files: a real
symlink out of the corpus, a real FIFO (os.mkfifo), a real file name that is not UTF-8 (bytes paths),
NUL characters, two files with one key. Each bad input is skipped with its reason; the rest goes in.
The unit tests read the corpus; the others ingest it on real servers and hold a real row lock."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from services.retriever.importers import read_corpus
from services.retriever.sources import MAX_DOCUMENT_BYTES, Skipped, SourceDocument
from tests.corpus_fixtures import png, write_markdown_corpus

NOT_UTF8 = b"caf\xff.md"


def write_hostile_corpus(root: Path, outside: Path) -> Path:
    """The fixture corpus plus one of each hostile input."""
    write_markdown_corpus(root)
    docs = root / "docs"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.md").write_text("# Secret\n\nThe password is swordfish.\n")
    os.symlink(outside / "secret.md", docs / "leak.md")  # item 5
    os.symlink(docs / "pancakes.md", docs / "alias.md")  # a symlink inside the corpus is fine
    os.mkfifo(docs / "pipe.md")  # item 8
    os.mkfifo(root / "images" / "pipe.png")
    (docs / "pipe-image.md").write_text("# Pipe image\n\nA page.\n\n![p](../images/pipe.png)\n")
    with open(os.path.join(os.fsencode(docs), NOT_UTF8), "wb") as handle:  # item 7
        handle.write(b"# Cafe\n\nA name that is not UTF-8.\n")
    (docs / "nul.md").write_text("# Nul\n\napple\x00pie\n")  # item 3
    (docs / "twice.markdown").write_text("# Twice\n\nThe first file of key twice, in name order.\n")  # item 6
    (docs / "twice.md").write_text("# Twice again\n\nThe same key.\n")
    (docs / "page.html").write_text("<h1>HTML</h1><p>Not read in a Markdown corpus.</p>")
    (docs / "huge.md").write_text("# Huge\n\n" + "word " * (MAX_DOCUMENT_BYTES // 5 + 10))  # item 11
    with (root / "docs.jsonl").open("a") as meta:
        meta.write(json.dumps({"doc_id": "tomato-soup", "title": "Tomato\u0000soup"}) + "\n")
        meta.write(json.dumps({"doc_id": "gone", "title": "No such document"}) + "\n")
        meta.write("[1, 2]\n")
        meta.write(json.dumps({"doc_id": "pancakes", "title": 5}) + "\n")
        meta.write(json.dumps({"doc_id": "pancakes", "title": "Again"}) + "\n")
    return root


EXPECTED_SKIPS = {
    "docs/leak.md": "a symlink pointing outside the corpus folder (only files inside it are read)",
    "docs/pipe.md": "not a regular file (a FIFO)",
    "docs/caf\\xff.md": "file name is not valid UTF-8 (rename it)",
    "docs/nul.md": "contains a NUL character (at character 12): not a text document",
    "docs/twice.md": "same document key 'twice' as docs/twice.markdown (rename one of them)",
    "docs/page.html": "an HTML file in a Markdown corpus is not read (ingest it on its own: m2io ingest FILE)",
    "docs/huge.md": "file is 1.0 MiB, over the 1 MiB limit (split it into smaller documents)",
    "docs.jsonl line 4": "malformed metadata line: contains a NUL character (at character 6)",
    "docs.jsonl line 6": "malformed metadata line: expected an object, got list",
    "docs.jsonl line 7": "malformed metadata line: title is not a string",
    "docs.jsonl line 5": "no document 'gone' in the corpus",
    "docs.jsonl line 8": "doc_id 'pancakes' again (line 1 kept)",
}


@pytest.mark.unit
def test_hostile_markdown_folder_skips_each_bad_input_with_its_reason(tmp_path):
    root = write_hostile_corpus(tmp_path / "corpus", tmp_path / "outside")
    items = list(read_corpus(root))  # a FIFO read would hang here
    documents = {item.doc_key: item for item in items if isinstance(item, SourceDocument)}
    reasons = {item.what: item.reason for item in items if isinstance(item, Skipped)}
    assert set(documents) == {"pancakes", "tomato-soup", "bad-images", "alias", "pipe-image", "twice"}
    for what, reason in EXPECTED_SKIPS.items():
        assert reasons.get(what) == reason, (what, reasons.get(what))
    assert reasons["../images/pipe.png (in pipe-image)"] == "../images/pipe.png is not a regular file"
    assert not any("swordfish" in item.markdown for item in documents.values())
    assert documents["twice"].markdown.startswith("# Twice\n")  # the first in name order, the other refused
    # a NUL in a metadata line never reaches a title: the line is skipped, the document keeps line 3
    assert documents["tomato-soup"].title == "Tomato soup"


@pytest.mark.unit
def test_nul_in_metadata_skips_the_line(tmp_path):
    root = write_markdown_corpus(tmp_path / "corpus")
    (root / "docs.jsonl").write_text(
        json.dumps({"doc_id": "pancakes", "title": "Pan\u0000cakes"})
        + "\n"
        + json.dumps({"doc_id": "x", "y": ["\udcff"]})
    )
    items = list(read_corpus(root))
    reasons = {item.what: item.reason for item in items if isinstance(item, Skipped)}
    assert reasons["docs.jsonl line 1"] == "malformed metadata line: contains a NUL character (at character 3)"
    assert reasons["docs.jsonl line 2"].startswith("malformed metadata line: holds a character that is not UTF-8")
    [pancakes] = [item for item in items if isinstance(item, SourceDocument) and item.doc_key == "pancakes"]
    assert pancakes.title is None


@pytest.mark.unit
def test_top_level_markdown_folder_does_not_walk_hidden_folders(tmp_path):
    (tmp_path / "note.md").write_text("# Note\n\nText.\n")
    for hidden in (".git", ".venv/lib"):
        (tmp_path / hidden).mkdir(parents=True)
        (tmp_path / hidden / "inside.md").write_text("# Hidden\n\nNot a document.\n")
    keys = [item.doc_key for item in read_corpus(tmp_path) if isinstance(item, SourceDocument)]
    assert keys == ["note"]


@pytest.mark.unit
def test_mramg_lines_with_nul_are_skipped(tmp_path):
    from tests.corpus_fixtures import write_mramg_corpus

    root = write_mramg_corpus(tmp_path)
    with (root / "doc_toy.jsonl").open("a") as lines:
        lines.write(json.dumps(["d5", "nul\u0000inside <PIC>", ["toy_1"]]) + "\n")
    catalogue = json.loads((root / "images_info" / "toy_imgs_collection.json").read_text())
    catalogue["toy_9"] = {"image_path": "toy/lighthouse.png", "image_caption": "bad\u0000caption"}
    (root / "images_info" / "toy_imgs_collection.json").write_text(json.dumps(catalogue))
    reasons = {item.what: item.reason for item in read_corpus(root) if isinstance(item, Skipped)}
    assert reasons["doc_toy.jsonl line 5"] == "malformed line: contains a NUL character (at character 3)"
    assert reasons["images_info/toy_imgs_collection.json entry toy_9"].startswith("image catalogue entry contains")


@pytest.mark.unit
def test_images_are_refused_by_size_before_they_are_read(tmp_path):
    from services.retriever.images import MAX_IMAGE_BYTES
    from services.retriever.sources import FileRefused, read_regular_file

    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: 30 MiB claimed, nothing written
        handle.truncate(30 * 2**20)
    with pytest.raises(FileRefused, match="file is 30.0 MiB, over the 25 MiB limit"):
        read_regular_file(big, MAX_IMAGE_BYTES)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(FileRefused, match="not a regular file"):
        read_regular_file(tmp_path / "pipe.png", MAX_IMAGE_BYTES)
    (tmp_path / "ok.png").write_bytes(png((1, 2, 3)))
    assert read_regular_file(tmp_path / "ok.png", MAX_IMAGE_BYTES) == (tmp_path / "ok.png").read_bytes()


# ------------------------------------------------------------------ on real servers
def ingest_in_process(path: Path, name: str) -> uuid.UUID:
    from tests.test_ingest import ingest_in_process as ingest

    return ingest(path, name)


def test_hostile_corpus_ingests_the_rest_and_the_run_is_done(tmp_path):
    from services.client import Client
    from services.common.db import session_scope
    from services.common.models import Document, IngestItem, IngestRun

    root = write_hostile_corpus(tmp_path / "corpus", tmp_path / "outside")
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    run_id = ingest_in_process(root, name)
    with session_scope() as session:
        items = session.scalars(select(IngestItem).where(IngestItem.run_id == run_id)).all()
        run = session.get(IngestRun, run_id)
        texts = session.scalars(select(Document.text).where(Document.collection_id == run.collection_id)).all()
    reasons = {item.what: item.reason for item in items if item.status == "skipped"}
    for what, reason in EXPECTED_SKIPS.items():
        assert reasons.get(what) == reason, (what, reasons.get(what))
    assert sorted(item.doc_key for item in items if item.status == "ingested") == [
        "alias",
        "bad-images",
        "pancakes",
        "pipe-image",
        "tomato-soup",
        "twice",
    ]
    assert not any("swordfish" in text for text in texts)
    assert Client().ingest_report(run_id).status == "done"


def test_run_state_comes_from_items_and_the_cli_never_waits_on_a_lock(tmp_path):
    """A worker (here: another connection) holds the run row; finishing answers within the lock
    timeout with the state of the items; a run left `incomplete` whose items all finished is done."""
    from sqlalchemy import update

    from services.client import Client
    from services.common.db import get_engine, session_scope
    from services.common.models import IngestItem, IngestRun
    from services.retriever.ingest_runs import finish_run

    root = write_markdown_corpus(tmp_path / "corpus")
    run_id = ingest_in_process(root, f"locks-{uuid.uuid4().hex[:8]}")
    with session_scope() as session:
        session.execute(update(IngestRun).where(IngestRun.id == run_id).values(status="incomplete"))
    assert Client().ingest_report(run_id).status == "done"

    held, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        with get_engine().connect() as connection, connection.begin():
            connection.execute(select(IngestRun.id).where(IngestRun.id == run_id).with_for_update())
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        assert finish_run(run_id).status == "done"
        assert time.monotonic() - started < 10
    finally:
        release.set()
        holder.join()
    with session_scope() as session:
        session.execute(
            update(IngestItem)
            .where(IngestItem.run_id == run_id, IngestItem.doc_key == "pancakes")
            .values(status="pending")
        )
        session.execute(update(IngestRun).where(IngestRun.id == run_id).values(status="running"))
    assert finish_run(run_id).status == "incomplete"


def test_a_redelivered_batch_writes_nothing_twice_and_closes_the_run(tmp_path):
    from services.common.contracts import IngestBatch
    from services.common.db import session_scope
    from services.common.embedding import DEFAULT_EMBEDDING_MODEL
    from services.common.models import IngestRun
    from services.common.storage import get_store
    from services.retriever.ingest_runs import index_batch, stage_run

    store = get_store()
    store.ensure_bucket()
    staged = stage_run(
        write_markdown_corpus(tmp_path / "corpus"), f"redo-{uuid.uuid4().hex[:8]}", DEFAULT_EMBEDDING_MODEL, store
    )
    with session_scope() as session:
        assert session.get(IngestRun, staged.run_id).status == "running"
    [batch] = staged.batches
    first = index_batch(IngestBatch(run_id=staged.run_id, item_ids=batch))
    again = index_batch(IngestBatch(run_id=staged.run_id, item_ids=batch))
    assert first == {"documents": 3} and again == {"already_done": True}
    with session_scope() as session:
        assert session.get(IngestRun, staged.run_id).status == "done"  # closed by the worker, not the CLI


def test_a_staging_crash_marks_the_run_failed(tmp_path):
    from services.common.db import session_scope
    from services.common.embedding import DEFAULT_EMBEDDING_MODEL
    from services.common.models import IngestRun
    from services.retriever.ingest_runs import stage_run

    class BrokenStore:
        def put_content(self, *args, **kwargs):
            raise ConnectionError("S3 went away")

    root = write_markdown_corpus(tmp_path / "corpus")
    name = f"crash-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConnectionError):
        stage_run(root, name, DEFAULT_EMBEDDING_MODEL, BrokenStore())
    with session_scope() as session:
        run = session.scalars(select(IngestRun).where(IngestRun.collection_name == name)).one()
    assert (run.status, run.error) == ("failed", "ConnectionError: S3 went away")
