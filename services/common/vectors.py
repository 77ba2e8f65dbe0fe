"""Vectors read once, at ingest: stored with the rows they belong to, looked up at query time.

Ingest embeds every text a query will compare (each chunk's units, each section's heading path, each
image's caption, the sentences that stood around it and the words inside it) and stores them as
float32 matrices (`bytea`: one read, no parsing) beside the chunk, document and image rows. At
query time only the question is embedded; `QueryVectors` gives the stages the stored vectors and
embeds only what was never stored (an LM's sentences, a collection indexed before vectors were
kept), counting it so that the stage's output can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from services.common.contracts import AnswerUnit, CandidateImage
from services.common.embedding import Embedder
from services.common.text import first_sentence, last_sentence

DTYPE = np.dtype("<f4")  # little-endian float32 whatever the machine: the bytes are the format
IMAGE_ROWS = ("before", "after", "caption", "image_text")  # the rows of `images.text_vectors`


def pack(vectors: np.ndarray) -> bytes:
    """A matrix (rows x dim) as stored; the row count is known from what it belongs to."""
    return np.ascontiguousarray(vectors, dtype=DTYPE).tobytes()


def unpack(data: bytes | memoryview | None, rows: int) -> np.ndarray | None:
    """The stored matrix, or None when nothing (or something of another shape) was stored."""
    if data is None or rows <= 0:
        return None
    flat = np.frombuffer(bytes(data), dtype=DTYPE)
    if flat.size == 0 or flat.size % rows:
        return None
    return flat.reshape(rows, flat.size // rows).astype(np.float32)


def image_texts(caption: str | None, before: str | None, after: str | None, image_text: str | None) -> list[str]:
    """The four texts an image is compared by, in the rows' order: the sentence it followed, the one
    it preceded, its caption, the words inside it ("" where there is none)."""
    return [last_sentence(before), first_sentence(after), (caption or "").strip(), (image_text or "").strip()]


def candidate_texts(candidate: CandidateImage) -> list[str]:
    """A candidate's four compared texts (`image_texts`), as its stored vectors were made from them."""
    return image_texts(candidate.caption, candidate.context_before, candidate.context_after, candidate.image_text)


class TextEmbeddings:
    """A batch of texts, each distinct text embedded once (a sentence an image stood next to is also
    a unit). With `blank_is_zero` an empty text gets a zero vector (no evidence) and is not embedded."""

    def __init__(self, embedder: Embedder, blank_is_zero: bool = True):
        self.embedder = embedder
        self.blank_is_zero = blank_is_zero
        self.wanted: dict[str, int] = {}
        self.vectors = np.zeros((0, 0), dtype=np.float32)

    def want(self, texts: Sequence[str]) -> None:
        for item in texts:
            if item.strip() or not self.blank_is_zero:
                self.wanted.setdefault(item, len(self.wanted))

    def encode(self) -> int:
        """Embeds what was wanted (one call of the model); the number of distinct texts."""
        return TextEmbeddings.encode_together(self)

    @staticmethod
    def encode_together(*batches: TextEmbeddings) -> int:
        """Several batches in one call of the model (it sorts by length and pads per mini-batch);
        texts wanted by more than one batch are embedded once."""
        union: dict[str, int] = {}
        for batch in batches:
            for item in batch.wanted:
                union.setdefault(item, len(union))
        if not union:
            return 0
        vectors = batches[0].embedder.encode(list(union))
        for batch in batches:
            batch.vectors = vectors[[union[item] for item in batch.wanted]] if batch.wanted else vectors[:0]
        return len(union)

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, as embedded (zero for a blank text with `blank_is_zero`)."""
        dim = self.vectors.shape[1] or self.embedder.dimension  # nothing embedded: the model says
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, item in enumerate(texts):
            index = self.wanted.get(item)
            if index is not None:
                out[row] = self.vectors[index]
        return out


@dataclass
class ImageVectors:
    """The candidates' four vectors, one (candidates x dim) matrix each; zero rows where no text."""

    before: np.ndarray
    after: np.ndarray
    caption: np.ndarray
    image_text: np.ndarray


def query_vectors(source: QueryVectors | Embedder | None) -> QueryVectors:
    """`source` as QueryVectors: an Embedder (or None, where nothing needs embedding) stores nothing,
    so everything it is asked for is embedded now (an answer with no collection behind it)."""
    return source if isinstance(source, QueryVectors) else QueryVectors(source)


class QueryVectors:
    """What a query's stages compare, from the stored vectors where they exist (`session` given),
    else embedded now. `embedded` counts the texts embedded at query time: with an up-to-date
    collection and source-text answers it is the question alone."""

    def __init__(self, embedder: Embedder | None, session: Session | None = None):
        self.embedder = embedder
        self.session = session
        self.embedded = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.embedder is None:
            raise ValueError(f"{len(texts)} texts need vectors and no embedder was given")
        self.embedded += len(texts)
        return self.embedder.encode(texts)

    def of_units(self, units: Sequence[AnswerUnit]) -> np.ndarray:
        """One row per unit: a unit with provenance reads its chunk's stored row, the rest is embedded."""
        rows: list[np.ndarray | None] = [None] * len(units)
        chunk_ids = {u.source.chunk_id for u in units if u.source is not None and u.source.chunk_id is not None}
        if self.session is not None and chunk_ids:
            stored = self.session.execute(
                text("SELECT id, first_unit, last_unit, unit_vectors FROM chunks WHERE id = ANY(:ids)"),
                {"ids": sorted(chunk_ids)},
            ).all()
            matrices = {
                row.id: (row.first_unit, unpack(row.unit_vectors, row.last_unit - row.first_unit + 1))
                for row in stored
                if row.first_unit is not None and row.last_unit is not None
            }
            for index, unit in enumerate(units):
                first, matrix = matrices.get(unit.source.chunk_id, (None, None)) if unit.source else (None, None)
                if matrix is not None and 0 <= unit.source.position - first < len(matrix):
                    rows[index] = matrix[unit.source.position - first]
        missing = [index for index, row in enumerate(rows) if row is None]
        if missing:
            for index, vector in zip(missing, self.embed([units[i].text for i in missing]), strict=True):
                rows[index] = vector
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)  # no unit: nothing compares (and no model loads)
        return np.stack(rows).astype(np.float32, copy=False)

    def of_images(self, candidates: Sequence[CandidateImage]) -> ImageVectors:
        """The candidates' stored vectors (`images.text_vectors`); those without are embedded."""
        stored: dict[int, np.ndarray] = {}
        if self.session is not None and candidates:
            for row in self.session.execute(
                text("SELECT id, text_vectors FROM images WHERE id = ANY(:ids)"),
                {"ids": sorted({c.image_id for c in candidates})},
            ):
                matrix = unpack(row.text_vectors, len(IMAGE_ROWS))
                if matrix is not None:
                    stored[row.id] = matrix
        missing = [c for c in candidates if c.image_id not in stored]
        if missing:
            if self.embedder is None:
                raise ValueError(f"{len(missing)} images need vectors and no embedder was given")
            batch = TextEmbeddings(self.embedder)
            texts = {c.image_id: candidate_texts(c) for c in missing}
            for four in texts.values():
                batch.want(four)
            self.embedded += batch.encode()
            stored |= {image_id: batch.matrix(four) for image_id, four in texts.items()}
        if not candidates:
            empty = np.zeros((0, 0), dtype=np.float32)
            return ImageVectors(empty, empty, empty, empty)
        matrices = np.stack([stored[c.image_id] for c in candidates])  # candidates x 4 x dim
        return ImageVectors(*(matrices[:, row] for row in range(len(IMAGE_ROWS))))
