"""The words inside images (OCR at ingest): cleaning, the real tesseract on an image with words, the
cache by sha256, and images whose reading fails (the document still goes in, with a warning)."""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from services.common.contracts import AnswerUnit, CandidateImage, StagedDocument, StagedImage
from services.common.db import session_scope
from services.common.models import Collection, Document, IngestItem
from services.common.models import Image as ImageRow
from services.common.models import ImageText as ImageTextRow
from services.common.settings import get_settings
from services.common.text import ImageRef
from services.retriever import ocr
from services.retriever.ingest import content_hash, describe_image
from services.retriever.ocr import ImageTextReader, Reading, clean_image_text

needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None,
    reason="the tesseract binary is not installed (infra/setup.sh installs tesseract-ocr)",
)


# ------------------------------------------------------------------ pure
@pytest.mark.unit
def test_cleaning_keeps_words_and_drops_junk_lines():
    raw = "  Start   Mission \n|| ~ =\n 12.5 %\n\nSlide to\tconfirm\nSTART MISSION\n  a b c  \nÉtat du drône\n"
    assert clean_image_text(raw) == "Start Mission Slide to confirm État du drône"
    assert clean_image_text("") == ""
    assert clean_image_text("| — |\n0 1 2") == ""
    long = " ".join(["calibrate"] * 100)
    cut = clean_image_text(long)
    assert len(cut) <= 300 and cut.endswith("calibrate")  # at a word boundary
    assert clean_image_text("x" * 400, limit=10) == "x" * 10  # one long word is cut where it must be


@pytest.mark.unit
def test_only_documents_with_images_change_hash_with_ocr():
    image = StagedImage(
        link="a.png",
        source_name="images/a.png",
        s3_key="images/aa",
        sha256="a" * 64,
        mime_type="image/png",
        width=4,
        height=4,
    )
    plain = StagedDocument(doc_key="d", markdown="# D\n\ntext", source_path="docs/d.md")
    pictured = plain.model_copy(update={"images": [image]})
    engine = "tesseract 5.3.0 eng r1"
    assert content_hash(plain, "m", engine) == content_hash(plain, "m")  # no images: nothing to read
    assert content_hash(pictured, "m", None) == content_hash(pictured, "m")  # off: the hash of before OCR
    assert content_hash(pictured, "m", engine) != content_hash(pictured, "m")  # on: indexed again
    assert content_hash(pictured, "m", engine) != content_hash(pictured, "m", "tesseract 5.4.0 eng r1")


@pytest.mark.unit
def test_the_embedded_description_ends_with_the_words_inside_the_image():
    ref = ImageRef(source="radio.png", caption="The radio page", context_before="Open the radio setup.")
    assert describe_image(ref, "Radio") == "The radio page. Radio. Open the radio setup."
    described = describe_image(ref, "Radio", "Calibrate Radio Controller")
    assert described.startswith(describe_image(ref, "Radio")) and described.endswith(". Calibrate Radio Controller")


@pytest.mark.unit
def test_a_reading_that_timed_out_or_never_ran_is_transient():
    assert Reading("a", error="timeout: tesseract took over 1 s").transient
    assert Reading("a", error="not read", attempted=False).transient
    assert not Reading("a", error="cannot decode: corrupt image").transient
    assert not Reading("a", text="words").transient


@pytest.mark.unit
def test_the_ocr_setting():
    from pydantic import ValidationError

    from services.common.settings import Settings

    assert Settings().ocr == "off"  # bench/README.md, "OCR": no gain measured on the dev corpora
    assert Settings(ocr=" Auto ").ocr == "auto"
    with pytest.raises(ValidationError):
        Settings(ocr="sometimes")
    with pytest.raises(ValidationError):
        Settings(ocr_timeout_s=0)


@pytest.mark.unit
def test_reader_without_engine_or_store_reads_nothing():
    reader = ImageTextReader(None, "tesseract 5.3.0 eng r1")
    assert reader.engine is None and "object store" in reader.reason
    assert ocr.find_engine("off") == (None, "M2IO_OCR=off")


# ------------------------------------------------------------------ the rule inserter
def candidate(name: str, image_id: int, caption: str | None = None, image_text: str | None = None) -> CandidateImage:
    return CandidateImage(
        image_id=image_id,
        source_name=name,
        s3_key=f"k/{name}",
        caption=caption,
        context_before=None,
        context_after=None,
        image_text=image_text,
        doc_key=f"doc-{image_id}",
        score=0.1,
        reasons=["description"],
    )


def test_rule_inserter_takes_image_text_as_evidence():
    from services.common.embedding import get_embedder
    from services.inserter.core import rule_plan

    units = [
        AnswerUnit(text="Open the vehicle setup view."),
        AnswerUnit(text="Click Calibrate Compass and rotate the vehicle."),
    ]
    # weighted like a caption (0.85): only words that say what the unit says pass the 0.8 threshold
    screenshot = candidate("images/compass.png", 1, image_text="Click Calibrate Compass, rotate the vehicle")
    captioned = candidate("images/setup.png", 2, caption="Open the vehicle setup view.")
    blank = candidate("images/blank.png", 3)
    plan = rule_plan(units, [screenshot, captioned, blank], get_embedder(), match_min=0.8)
    by_image = {p.image: p for p in plan}
    assert by_image["images/compass.png"].after == 2
    assert by_image["images/compass.png"].evidence == "image_text"
    assert by_image["images/compass.png"].similarity > 0.95
    assert by_image["images/setup.png"].evidence == "caption" and by_image["images/setup.png"].after == 1
    assert "images/blank.png" not in by_image


# ------------------------------------------------------------------ ingest with the real tesseract
def words_png(text: str, size: tuple[int, int] = (1000, 160)) -> bytes:
    picture = Image.new("RGB", size, "white")
    ImageDraw.Draw(picture).text((20, 50), text, fill="black", font=ImageFont.load_default(size=40))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_corpus(root: Path, docs: dict[str, tuple[str, str]], images: dict[str, bytes]) -> Path:
    """docs: key -> (caption, image file); each document links its one image."""
    (root / "docs").mkdir(parents=True)
    (root / "images").mkdir()
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    for key, (caption, image) in docs.items():
        (root / "docs" / f"{key}.md").write_text(
            f"# {key.title()}\n\nThe settings page of the ground station.\n\n![{caption}](images/{image})\n\n"
            "Change what you need, then go back.\n"
        )
    return root


@pytest.fixture
def ocr_on(monkeypatch):
    monkeypatch.setenv("M2IO_OCR", "on")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("M2IO_OCR")
    get_settings.cache_clear()


@pytest.fixture
def count_reads(monkeypatch):
    """How many images tesseract was run on."""
    calls: list[int] = []
    real = ocr.ocr_lines

    def counted(data: bytes, timeout_s: float) -> str:
        calls.append(len(data))
        return real(data, timeout_s)

    monkeypatch.setattr(ocr, "ocr_lines", counted)
    return calls


def ingest(path: Path, name: str) -> uuid.UUID:
    from tests.test_ingest import ingest_in_process

    return ingest_in_process(path, name)


def image_rows(name: str) -> list[ImageRow]:
    with session_scope() as session:
        rows = session.scalars(
            select(ImageRow).join(Collection, Collection.id == ImageRow.collection_id).where(Collection.name == name)
        ).all()
        session.expunge_all()
    return list(rows)


def item_warnings(run_id: uuid.UUID) -> dict[str, list[str]]:
    with session_scope() as session:
        items = session.scalars(select(IngestItem).where(IngestItem.run_id == run_id)).all()
        return {item.doc_key: list(item.warnings) for item in items if item.doc_key}


@needs_tesseract
def test_words_in_an_image_reach_the_row_the_description_and_the_candidate(ocr_on, count_reads, tmp_path):
    from services.common.embedding import get_embedder
    from services.retriever.search import get_collection, retrieve

    marker = uuid.uuid4().hex[:6]  # fresh bytes: the cache of an earlier run must not answer
    corpus = write_corpus(
        tmp_path / "corpus",
        {"radio": ("The radio page", "radio.png"), "again": ("The same page", "radio.png")},
        {"radio.png": words_png(f"Calibrate Radio Controller {marker}")},
    )
    name = f"ocr-{uuid.uuid4().hex[:8]}"
    run_id = ingest(corpus, name)
    rows = image_rows(name)
    assert len(rows) == 2 and len(count_reads) == 1  # one screenshot in two documents: read once
    for row in rows:
        assert "Calibrate Radio Controller" in row.image_text
    with session_scope() as session:
        cached = session.get(ImageTextRow, rows[0].sha256)
        assert "Calibrate Radio Controller" in cached.text and cached.error is None
        assert cached.engine.startswith("tesseract ") and cached.engine.endswith(f"r{ocr.OCR_RECIPE}")
    assert item_warnings(run_id) == {"radio": [], "again": []}

    # the candidate carries the words; a question in the image's own words finds it
    with session_scope() as session:
        collection = get_collection(session, name)
        found = retrieve(session, collection, "How do I calibrate the radio controller?", get_embedder())
    assert found.candidates and all("Calibrate Radio Controller" in c.image_text for c in found.candidates)

    # again: nothing changed, nothing read; into another collection: the cache answers
    ingest(corpus, name)
    ingest(corpus, f"{name}-b")
    assert len(count_reads) == 1
    assert all("Calibrate Radio Controller" in row.image_text for row in image_rows(f"{name}-b"))


@needs_tesseract
def test_an_image_that_cannot_be_read_still_goes_in_with_a_warning(ocr_on, tmp_path):
    from services.common.storage import content_key, get_store

    good = words_png(f"Vehicle Setup {uuid.uuid4().hex[:6]}")
    broken = words_png(f"Broken Screen {uuid.uuid4().hex[:6]}")
    corpus = write_corpus(
        tmp_path / "corpus",
        {"fine": ("A fine page", "fine.png"), "broken": ("A broken page", "broken.png")},
        {"fine.png": good, "broken.png": broken},
    )
    # the bytes in S3 of one image are not what was staged (a corrupted object): the reader refuses them
    from services.common.storage import sha256_hex

    store = get_store()
    store.ensure_bucket()
    key = content_key(sha256_hex(broken), prefix="images")
    store.put_named(key, broken[: len(broken) // 2])  # before staging: put_content keeps an existing key
    name = f"ocr-{uuid.uuid4().hex[:8]}"
    run_id = ingest(corpus, name)
    store.put_named(key, broken)  # put back, for whoever shares the bucket

    warnings = item_warnings(run_id)
    assert warnings["fine"] == []
    assert len(warnings["broken"]) == 1
    assert "images/broken.png: image text not read:" in warnings["broken"][0]
    assert "do not match its sha256" in warnings["broken"][0]
    rows = {row.source_name: row for row in image_rows(name)}
    assert set(rows) == {"images/fine.png", "images/broken.png"}  # both went in
    assert rows["images/broken.png"].image_text is None and "Vehicle Setup" in rows["images/fine.png"].image_text
    with session_scope() as session:
        assert "do not match" in session.get(ImageTextRow, sha256_hex(broken)).error
        status = session.scalars(select(IngestItem.status).where(IngestItem.run_id == run_id)).all()
    assert sorted(status) == ["ingested", "ingested"]


@needs_tesseract
def test_a_timeout_is_read_again_at_the_next_ingest(ocr_on, monkeypatch, tmp_path):
    corpus = write_corpus(
        tmp_path / "corpus",
        {"slow": ("A slow page", "slow.png")},
        {"slow.png": words_png(f"Flight Modes {uuid.uuid4().hex[:6]}")},
    )
    name = f"ocr-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("M2IO_OCR_TIMEOUT_S", "0.001")
    get_settings.cache_clear()
    first = ingest(corpus, name)
    assert "timeout" in item_warnings(first)["slow"][0]
    assert image_rows(name)[0].image_text is None

    monkeypatch.delenv("M2IO_OCR_TIMEOUT_S")
    get_settings.cache_clear()
    second = ingest(corpus, name)  # the document is not "unchanged": its reading was incomplete
    with session_scope() as session:
        status = session.scalars(select(IngestItem.status).where(IngestItem.run_id == second)).all()
        digest = session.scalars(select(Document.content_sha256).join(Collection).where(Collection.name == name)).one()
    assert status == ["ingested"] and item_warnings(second)["slow"] == []
    assert "Flight Modes" in image_rows(name)[0].image_text
    third = ingest(corpus, name)  # complete now: left alone
    with session_scope() as session:
        assert session.scalars(select(IngestItem.status).where(IngestItem.run_id == third)).all() == ["unchanged"]
        assert (
            session.scalars(select(Document.content_sha256).join(Collection).where(Collection.name == name)).one()
            == digest
        )


def test_ocr_off_reads_nothing_and_missing_tesseract_with_on_warns(monkeypatch, tmp_path):
    corpus = write_corpus(
        tmp_path / "corpus",
        {"page": ("A page", "page.png")},
        {"page.png": words_png(f"Safety Setup {uuid.uuid4().hex[:6]}")},
    )
    monkeypatch.setenv("M2IO_OCR", "off")
    get_settings.cache_clear()
    name = f"ocr-{uuid.uuid4().hex[:8]}"
    run_id = ingest(corpus, name)
    assert image_rows(name)[0].image_text is None and item_warnings(run_id) == {"page": []}

    # on, but no binary: the image goes in without its words, and the item says why
    monkeypatch.setenv("M2IO_OCR", "on")
    get_settings.cache_clear()
    monkeypatch.setattr(ocr, "resolve_engine", lambda setting: (None, "the tesseract binary is not installed"))
    run_id = ingest(corpus, f"{name}-on")
    assert item_warnings(run_id) == {"page": ["image text not read: the tesseract binary is not installed"]}
    assert image_rows(f"{name}-on")[0].image_text is None
    get_settings.cache_clear()
