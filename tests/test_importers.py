"""Importers on small real corpora: every bad input is skipped with its reason, the rest goes in."""

import pytest

from services.retriever.importers import read_corpus, read_single_file
from services.retriever.ingest import stage_document
from services.retriever.sources import Skipped, SourceDocument
from tests.corpus_fixtures import write_markdown_corpus, write_mramg_corpus


def split(items):
    documents = {item.doc_key: item for item in items if isinstance(item, SourceDocument)}
    skipped = [item for item in items if isinstance(item, Skipped)]
    return documents, skipped


@pytest.mark.unit
def test_markdown_folder_with_bad_inputs(tmp_path):
    documents, skipped = split(list(read_corpus(write_markdown_corpus(tmp_path))))
    assert set(documents) == {"pancakes", "tomato-soup", "bad-images"}
    assert documents["pancakes"].title == "Pancakes"
    assert documents["pancakes"].meta == {"tags": ["breakfast"]}
    assert [image.source_name for image in documents["pancakes"].images] == ["images/pancakes.png", "images/frying.jpg"]
    reasons = {item.what: item.reason for item in skipped}
    assert reasons["docs.jsonl line 2"].startswith("malformed metadata line")
    assert reasons["docs/latin1.md"] == "invalid UTF-8 at byte 5"
    assert reasons["docs/empty.md"] == "empty document"
    assert reasons["images/missing.png (in bad-images)"] == "missing image file images/missing.png"


def test_bad_image_bytes_are_refused_with_reasons(tmp_path, servers):
    from services.common.storage import get_store

    documents, _ = split(list(read_corpus(write_markdown_corpus(tmp_path))))
    store = get_store()
    store.ensure_bucket()
    payload, skipped = stage_document(store, documents["bad-images"])
    reasons = {item.what.split(" ")[0]: item.reason for item in skipped}
    assert reasons["images/corrupt.png"].startswith("corrupt image")
    assert reasons["images/notes.png"] == "not an image (Pillow does not recognise the bytes)"
    assert "decompression bomb" in reasons["images/bomb.png"]
    assert [image.source_name for image in payload.images] == ["images/fine.png"]
    stored = payload.images[0]
    assert store.get(stored.s3_key) == (tmp_path / "images" / "fine.png").read_bytes()
    assert (stored.width, stored.height, stored.mime_type) == (48, 32, "image/png")


@pytest.mark.unit
def test_mramg_release_layout(tmp_path):
    documents, skipped = split(list(read_corpus(write_mramg_corpus(tmp_path))))
    assert set(documents) == {"toy/d1", "toy/d2"}
    d2 = documents["toy/d2"]
    assert d2.pic_images == ["toy_2", "toy_3"]
    assert [(i.source_name, i.caption) for i in d2.images] == [
        ("IMAGE/images/toy/harbour.png", "Fishing boats moored in a small harbour")
    ]
    reasons = {item.what: item.reason for item in skipped}
    assert reasons["image toy_3 (in toy/d2)"] == "missing image file toy/missing.png"
    assert reasons["doc_toy.jsonl line 3"].startswith("malformed line")
    assert reasons["doc_toy.jsonl line 4"] == "empty document"


@pytest.mark.unit
def test_single_html_file(tmp_path):
    (tmp_path / "pics").mkdir()
    from tests.corpus_fixtures import png

    (tmp_path / "pics" / "chart.png").write_bytes(png((0, 0, 255)))
    page = tmp_path / "report.html"
    page.write_text(
        "<html><body><h1>Quarterly report</h1><p>Sales grew. Costs fell.</p>"
        "<figure><img src='pics/chart.png' alt='bar chart'><figcaption>Sales by month</figcaption></figure>"
        "<ol><li>Hire two engineers.</li><li>Open an office.</li></ol><script>alert(1)</script></body></html>"
    )
    [document] = [item for item in read_single_file(page, tmp_path) if isinstance(item, SourceDocument)]
    assert document.doc_key == "report"
    assert "# Quarterly report" in document.markdown
    assert '![bar chart](pics/chart.png "Sales by month")' in document.markdown
    assert "1. Hire two engineers." in document.markdown and "alert" not in document.markdown
    assert [image.source_name for image in document.images] == ["pics/chart.png"]


@pytest.mark.unit
def test_single_markdown_file(tmp_path):
    page = tmp_path / "note.md"
    page.write_text("# Note\n\nJust text, no images.\n")
    [document] = list(read_single_file(page, tmp_path))
    assert document.doc_key == "note" and document.images == []
