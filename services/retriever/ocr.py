"""The words inside an image, read at ingest (OCR): screenshots carry their own words, and a question
about a button or a menu item often names them.

Engine: Debian's `tesseract-ocr` through `pytesseract` (infra/setup.sh and infra/Dockerfile install
both). `M2IO_OCR` chooses: `auto` reads when the binary is there, `on` too but warns on each document
with images when it is not, `off` never. Missing OCR is never an error: the image goes in with its
caption and context, and the reason is logged (and, with `on`, kept in the ingest item's warnings).

What is read is cached by the image's sha256 in `image_texts` (see `models.ImageText` for why a table
of its own): an image is read once, whatever document or collection it turns up in again.

Only the bytes stored in S3 under the image's content address are read, and only if they hash to the
image's sha256: a payload cannot point the reader at another object, nor at a file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from services.common.contracts import StagedImage
from services.common.models import ImageText
from services.common.settings import Settings, get_settings
from services.common.storage import ObjectMissing, ObjectStore, content_key, sha256_hex
from services.retriever.images import ImageRejected, verify_image

log = logging.getLogger(__name__)

# Bump when the reading below changes (scaling, confidence, language): the engine id names it, so
# cached texts of another recipe are read again (and documents with images are indexed again).
OCR_RECIPE = "1"
LANGUAGE = "eng"
# Tesseract's per-word confidence (0-100). On the manual's screenshots, words under ~50 are mostly
# icons and widget borders read as letters ("ied fax suropuae"); 60 keeps the UI labels.
MIN_CONFIDENCE = 60
# The corpora's screenshots are downscaled to ~512 px wide, where UI text is 6-8 px high, under what
# tesseract reads: at twice the size it reads most labels (0.17 s for nothing vs 1.3 s for the text
# of a 512x320 screenshot). Larger images are read as they are.
UPSCALE_UP_TO = 1600  # px, the longer side
MAX_TEXT_CHARS = 300  # of the cleaned text: it joins the caption and context in one embedded description
TIMEOUT_PREFIX = "timeout"  # an error that says so is transient: the image is read again next time

WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row, in any script


def clean_image_text(raw: str, limit: int = MAX_TEXT_CHARS) -> str:
    """OCR output as one line of words: whitespace collapsed, lines without a word of 2+ letters
    (borders, icons, numbers alone) and repeated lines dropped, cut at a word boundary.

    >>> clean_image_text("Start  Mission\\n|| = ~\\n 12.5 \\nSlide to confirm\\nstart mission")
    'Start Mission Slide to confirm'
    >>> clean_image_text("Battery capacity Reset all to defaults", limit=20)
    'Battery capacity'
    """
    kept: list[str] = []
    seen: set[str] = set()
    for line in raw.splitlines():
        line = " ".join(line.split())
        if not WORD.search(line) or line.casefold() in seen:
            continue
        seen.add(line.casefold())
        kept.append(line)
    text = " ".join(kept)
    if len(text) > limit:
        cut = text[: limit + 1]
        text = cut[: cut.rfind(" ")] if " " in cut else text[:limit]
    return text.strip()


@dataclass(frozen=True)
class Reading:
    """What OCR made of one image: its words (uncleaned lines), or why there are none."""

    sha256: str
    text: str = ""
    error: str | None = None
    attempted: bool = True  # False: not read at all this time (the batch's OCR time was spent)

    @property
    def transient(self) -> bool:
        """Read again at the next ingest: a timeout, or not attempted."""
        return not self.attempted or bool(self.error and self.error.startswith(TIMEOUT_PREFIX))


@lru_cache(maxsize=4)
def resolve_engine(setting: str) -> tuple[str | None, str]:
    """The engine id ("tesseract 5.3.0 eng r1"), or None and why OCR is off. Once per process."""
    engine, reason = find_engine(setting)
    if engine:
        log.info("image text (OCR): %s", engine)
    else:
        log.info("image text (OCR) off: %s", reason)
    return engine, reason


def find_engine(setting: str) -> tuple[str | None, str]:
    if setting == "off":
        return None, "M2IO_OCR=off"
    try:
        import pytesseract
    except ImportError:
        return None, "pytesseract is not installed (infra/setup.sh installs it)"
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        return None, "the tesseract binary is not installed (apt-get install tesseract-ocr)"
    try:
        version = pytesseract.get_tesseract_version()
        languages = pytesseract.get_languages()
    # pytesseract exits (SystemExit) on a version string it cannot parse
    except (pytesseract.TesseractNotFoundError, pytesseract.TesseractError, OSError, SystemExit) as error:
        return None, f"tesseract does not run: {error}"
    if LANGUAGE not in languages:
        return None, f"tesseract has no {LANGUAGE!r} language data (apt-get install tesseract-ocr-{LANGUAGE})"
    return f"tesseract {version} {LANGUAGE} r{OCR_RECIPE}", ""


class ImageTextReader:
    """Reads the words of staged images from their bytes in S3, with a time limit per image and per
    batch; looks up and records readings in `image_texts`. Cheap to construct (once per batch)."""

    def __init__(
        self,
        store: ObjectStore | None,
        engine: str | None,
        reason: str = "",
        *,
        warn_when_off: bool = False,
        timeout_s: float = 15.0,
        budget_s: float = 100.0,
    ):
        if engine and store is None:
            engine, reason = None, "no object store to read the images from"
        self.store = store
        self.engine = engine
        self.reason = reason
        self.warn_when_off = warn_when_off
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        if self.engine:
            use_one_thread()

    @classmethod
    def from_settings(cls, store: ObjectStore | None, settings: Settings | None = None) -> ImageTextReader:
        settings = settings or get_settings()
        engine, reason = resolve_engine(settings.ocr)
        return cls(
            store,
            engine,
            reason,
            warn_when_off=settings.ocr == "on",
            timeout_s=settings.ocr_timeout_s,
            # A batch's OCR must end well inside the visibility timeout, or its message is delivered
            # again while it still runs; embedding and writing need the rest. What is left unread is
            # read at the next ingest (the document is marked incomplete).
            budget_s=settings.visibility_timeout_s / 3,
        )

    # ------------------------------------------------------------------ the cache
    def known(self, session: Session, sha256s: Iterable[str]) -> dict[str, Reading]:
        """Readings already made by this engine; timeouts are not kept as known (read again)."""
        wanted = sorted(set(sha256s))
        if not self.engine or not wanted:
            return {}
        rows = session.execute(
            select(ImageText.sha256, ImageText.text, ImageText.error).where(
                ImageText.sha256.in_(wanted),
                ImageText.engine == self.engine,
                func.coalesce(ImageText.error, "").not_like(f"{TIMEOUT_PREFIX}%"),
            )
        ).all()
        return {row.sha256: Reading(row.sha256, row.text, row.error) for row in rows}

    def remember(self, session: Session, readings: Iterable[Reading]) -> None:
        for reading in readings:
            if not reading.attempted:
                continue
            values = {"text": reading.text, "error": reading.error, "engine": self.engine}
            session.execute(
                insert(ImageText)
                .values(sha256=reading.sha256, **values)
                .on_conflict_do_update(index_elements=["sha256"], set_={**values, "created_at": func.now()})
            )

    # ------------------------------------------------------------------ reading
    def read_all(self, images: Iterable[StagedImage]) -> dict[str, Reading]:
        """Each image read once (by sha256), until the batch's OCR time is spent."""
        readings: dict[str, Reading] = {}
        started = time.monotonic()
        for image in images:
            if image.sha256 in readings:
                continue
            if time.monotonic() - started > self.budget_s:
                spent = f"not read: the batch's OCR time ({self.budget_s:.0f} s) was spent"
                readings[image.sha256] = Reading(image.sha256, error=spent, attempted=False)
                continue
            readings[image.sha256] = self.read(image)
        return readings

    def read(self, image: StagedImage) -> Reading:
        """The words of one image; any failure is a Reading with its error, never an exception."""
        sha = image.sha256
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            return Reading(sha, error="not a sha256; the image is not read")
        try:
            data = self.store.get(content_key(sha, prefix="images"))
        except ObjectMissing as error:
            return Reading(sha, error=str(error))
        except Exception as error:  # noqa: BLE001 - S3 unreachable: no words this time, read again next time
            return Reading(sha, error=f"cannot fetch from S3: {type(error).__name__}: {error}"[:1000], attempted=False)
        if sha256_hex(data) != sha:
            return Reading(sha, error="the bytes stored for this image do not match its sha256")
        try:
            return Reading(sha, text=ocr_lines(data, self.timeout_s))
        except ImageRejected as error:
            return Reading(sha, error=f"cannot decode: {error}")
        except OcrTimeout:
            return Reading(sha, error=f"{TIMEOUT_PREFIX}: tesseract took over {self.timeout_s:g} s")
        except Exception as error:  # noqa: BLE001 - an OCR failure never fails the document; it is recorded
            return Reading(sha, error=f"tesseract failed: {type(error).__name__}: {error}"[:1000])


class OcrTimeout(RuntimeError):
    pass


def use_one_thread() -> None:
    """Tesseract's OpenMP threads spin against each other and the embedder's torch threads: one thread
    read a 1024x740 screenshot in 0.58 s, two in 1.99 s, on a 2-core machine. pytesseract passes its
    module's `environ` to every tesseract process, so the limit goes there, not into this process's
    own environment (where torch's OpenMP runtime would read it too)."""
    import pytesseract

    module: Any = pytesseract.pytesseract
    if module.environ.get("OMP_THREAD_LIMIT") != "1":
        module.environ = {**os.environ, "OMP_THREAD_LIMIT": "1"}


def prepared_picture(data: bytes) -> Image.Image:
    """The image as tesseract reads it best: the staging checks again (these bytes come from S3),
    then grey on white (transparency flattened), small ones enlarged."""
    verify_image(data)
    with Image.open(io.BytesIO(data)) as opened:
        opened.seek(0)  # the first frame of an animation
        picture = opened.convert("RGBA")
    flat = Image.new("RGBA", picture.size, "white")
    flat.alpha_composite(picture)
    grey = flat.convert("L")
    if max(grey.size) <= UPSCALE_UP_TO:
        grey = grey.resize((grey.width * 2, grey.height * 2), Image.Resampling.LANCZOS)
    return grey


def ocr_lines(data: bytes, timeout_s: float) -> str:
    """The confident words of the image, one text line per line."""
    import pytesseract

    picture = prepared_picture(data)
    try:
        found = pytesseract.image_to_data(
            picture, lang=LANGUAGE, timeout=timeout_s, output_type=pytesseract.Output.DICT
        )
    except RuntimeError as error:
        if "timeout" in str(error).lower():  # pytesseract's own words when it kills the process
            raise OcrTimeout(str(error)) from error
        raise
    lines: dict[tuple[int, int, int], list[str]] = {}
    for block, paragraph, line, confidence, word in zip(
        found["block_num"], found["par_num"], found["line_num"], found["conf"], found["text"], strict=True
    ):
        word = str(word).strip()
        if word and float(confidence) >= MIN_CONFIDENCE:
            lines.setdefault((int(block), int(paragraph), int(line)), []).append(word)
    return "\n".join(" ".join(words) for words in lines.values())
