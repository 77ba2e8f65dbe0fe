"""Ingestion core: stage a source document (verify and store its images), then index it (chunks,
images and their embeddings in Postgres). Both are plain functions; the CLI stages, the retriever
worker indexes, and a benchmark can call either in one process.

Indexing is four steps over a batch of staged documents: `prepare` (skip unchanged ones, parse and
chunk the rest), `read_image_texts` (the words inside their images, OCR, cached by sha256), `embed`
(every text of the batch in one call of the model: chunks and image descriptions for search, and
every text a query compares — each unit, each section's heading path, each image's caption, the
sentences around it and its words — so that queries embed only the question), `write` (documents,
images and chunks, with their vectors).

Re-ingesting is idempotent: a document whose content hash (text, image bytes, chunker, model, and for
a document with images the OCR engine) is unchanged is left alone; a changed one replaces its old
chunks and images in one transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from services.common.contracts import StagedDocument, StagedImage
from services.common.embedding import Embedder
from services.common.models import Chunk, Collection, Document, Image
from services.common.storage import ObjectStore
from services.common.text import ImageRef, ParsedDocument
from services.common.vectors import TextEmbeddings, image_texts, pack
from services.retriever.chunking import Chunk as DocumentChunk
from services.retriever.chunking import chunk_document
from services.retriever.images import MAX_IMAGE_BYTES, ImageRejected, verify_image
from services.retriever.importers import parse_source
from services.retriever.ocr import ImageTextReader, Reading, clean_image_text
from services.retriever.sections import document_sections, stored_units
from services.retriever.sources import FileRefused, Skipped, SourceDocument, read_regular_file

# Bump when chunking changes, so re-ingesting rebuilds every document's chunks.
# 2: documents keep their units, chunks their unit range; 3: the query-time vectors are stored too
CHUNKER_VERSION = "3"


class CollectionModelMismatch(ValueError):
    pass


def ensure_collection(session: Session, name: str, model: str, dimension: int) -> Collection:
    """The collection, created on first use; its model and dimension are fixed from then on."""
    collection = session.execute(select(Collection).where(Collection.name == name)).scalar_one_or_none()
    if collection is None:
        session.execute(
            insert(Collection)
            .values(name=name, embedding_model=model, embedding_dim=dimension)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        collection = session.execute(select(Collection).where(Collection.name == name)).scalar_one()
    if collection.embedding_model != model or collection.embedding_dim != dimension:
        raise CollectionModelMismatch(
            f"collection {name!r} holds {collection.embedding_dim}-d vectors of {collection.embedding_model!r}; "
            f"it cannot take {dimension}-d vectors of {model!r}. Use that model (--model "
            f"{collection.embedding_model}) or another collection name."
        )
    return collection


# ------------------------------------------------------------------ staging (CLI side)
def stage_document(store: ObjectStore, document: SourceDocument) -> tuple[StagedDocument, list[Skipped]]:
    """Verify each linked image, store its bytes in S3 (once, by sha256), and build the payload the
    worker indexes. A bad image is skipped with its reason; the document still goes in."""
    images: list[StagedImage] = []
    skipped: list[Skipped] = []
    for linked in document.images:
        where = f"{linked.source_name} (in {document.doc_key})"
        try:
            verified = verify_image(read_regular_file(linked.path, MAX_IMAGE_BYTES))
        except FileRefused as error:
            skipped.append(Skipped(where, str(error), doc_key=document.doc_key))
            continue
        except OSError as error:
            skipped.append(Skipped(where, f"cannot read image: {error.strerror or error}", doc_key=document.doc_key))
            continue
        except ImageRejected as error:
            skipped.append(Skipped(where, str(error), doc_key=document.doc_key))
            continue
        stored = store.put_content(verified.data, verified.mime_type, prefix="images")
        images.append(
            StagedImage(
                link=linked.link,
                source_name=linked.source_name,
                caption=linked.caption,
                s3_key=stored.key,
                sha256=verified.sha256,
                mime_type=verified.mime_type,
                width=verified.width,
                height=verified.height,
            )
        )
    staged = StagedDocument(
        doc_key=document.doc_key,
        markdown=document.markdown,
        source_path=document.source_path,
        title=document.title,
        pic_images=document.pic_images,
        meta=document.meta,
        images=images,
    )
    return staged, skipped


# ------------------------------------------------------------------ indexing (worker side)
@dataclass
class IndexOutcome:
    doc_key: str
    status: str  # ingested | unchanged
    chunks: int = 0
    images: int = 0
    warnings: list[str] = field(default_factory=list)


def content_hash(document: StagedDocument, model: str, ocr_engine: str | None = None) -> str:
    basis = {
        "markdown": document.markdown,
        "pic_images": document.pic_images,
        "title": document.title,
        "chunker": CHUNKER_VERSION,
        "model": model,
        "images": sorted((image.link, image.sha256, image.caption) for image in document.images),
    }
    # Only what OCR changes: a document with images is indexed again when OCR is switched on or off
    # or its engine changes (the words are cached by sha256, so that costs embedding, not reading);
    # one without images, or any document while OCR is off, keeps the hash it had before OCR existed.
    if ocr_engine and document.images:
        basis["ocr"] = ocr_engine
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def describe_image(ref: ImageRef, heading: str, image_text: str = "") -> str:
    """What an image is about, in words: caption, alt text, section and surrounding text (M2RAG's
    finding: such descriptions beat raw pixels for placing images), then the words inside it."""
    parts = [
        ref.caption,
        ref.alt if ref.alt != ref.caption else "",
        heading,
        ref.context_before,
        ref.context_after,
        image_text,
    ]
    return ". ".join(part.strip() for part in parts if part and part.strip())


@dataclass
class PreparedDocument:
    """A staged document that changed, parsed and chunked; `embed` fills in its vectors."""

    position: int  # in the batch
    document: StagedDocument
    digest: str
    parsed: ParsedDocument
    chunks: list[DocumentChunk]
    chunk_vectors: list[np.ndarray] = field(default_factory=list)
    image_vectors: list[np.ndarray] = field(default_factory=list)
    # what queries compare, packed (services.common.vectors): per chunk its units' vectors, per image
    # its four texts' vectors, and the document's section labels with theirs
    unit_vectors: list[bytes] = field(default_factory=list)
    image_text_vectors: list[bytes] = field(default_factory=list)
    section_labels: list[str] = field(default_factory=list)
    label_vectors: bytes | None = None
    image_texts: dict[str, str] = field(default_factory=dict)  # by link: the cleaned words inside the image
    warnings: list[str] = field(default_factory=list)
    ocr_incomplete: bool = False  # an image's words are still to be read (a timeout): read again next time

    @property
    def title(self) -> str | None:
        return self.document.title or self.parsed.title

    @property
    def stored_digest(self) -> str:
        """The content hash as stored: an incomplete reading stores another one, so that the next
        ingest of the same document finds it changed and reads what is missing."""
        if not self.ocr_incomplete:
            return self.digest
        return hashlib.sha256(f"{self.digest}:ocr-incomplete".encode()).hexdigest()

    def take_readings(self, readings: dict[str, Reading]) -> None:
        for image in self.document.images:
            reading = readings.get(image.sha256)
            if reading is None:
                continue
            if reading.error:
                self.warnings.append(f"{image.source_name}: image text not read: {reading.error}")
            self.ocr_incomplete |= reading.transient
            text = clean_image_text(reading.text)
            if text:
                self.image_texts[image.link] = text

    def texts(self) -> tuple[list[str], list[str]]:
        """What is embedded: each chunk (under the document's title), and each image's description."""
        title = self.title
        chunk_texts = [
            chunk.text if not title or chunk.text.startswith(title) else f"{title}\n{chunk.text}"
            for chunk in self.chunks
        ]
        heading_of_image = {index: chunk.heading for chunk in self.chunks for index in chunk.image_indexes}
        image_texts = [
            describe_image(ref, heading_of_image.get(index) or title or "", self.image_texts.get(ref.source, ""))
            for index, ref in enumerate(self.parsed.images)
        ]
        return chunk_texts, image_texts

    def chunk_units(self) -> list[list[str]]:
        """Each chunk's units' texts, from its first unit to its last (the rows of `chunks.unit_vectors`)."""
        units = self.parsed.units
        return [
            [unit.text for unit in units[chunk.first_unit - 1 : chunk.last_unit]]
            if chunk.first_unit is not None and chunk.last_unit is not None
            else []
            for chunk in self.chunks
        ]

    def labels(self) -> list[str]:
        """The heading paths of the document's sections, as the retriever will compute them."""
        sections = document_sections(stored_units(units_column(self.parsed)), self.title)
        return list(dict.fromkeys(section.label for section in sections if section.path))

    def compared_texts(self) -> list[list[str]]:
        """Each image's four compared texts (`services.common.vectors.image_texts`), as stored."""
        return [
            image_texts(ref.caption or None, ref.context_before, ref.context_after, self.image_texts.get(ref.source))
            for ref in self.parsed.images
        ]


def prepare(
    session: Session, collection: Collection, documents: list[StagedDocument], ocr_engine: str | None = None
) -> tuple[list[PreparedDocument], dict[int, IndexOutcome]]:
    """The documents that changed, parsed and chunked; and the outcomes of those left as they are."""
    prepared: list[PreparedDocument] = []
    unchanged: dict[int, IndexOutcome] = {}
    for position, document in enumerate(documents):
        digest = content_hash(document, collection.embedding_model, ocr_engine)
        existing = session.execute(
            select(Document.content_sha256).where(
                Document.collection_id == collection.id, Document.doc_key == document.doc_key
            )
        ).scalar_one_or_none()
        if existing == digest:
            unchanged[position] = IndexOutcome(document.doc_key, "unchanged")
            continue
        parsed, _ = parse_source(document)
        prepared.append(PreparedDocument(position, document, digest, parsed, chunk_document(parsed)))
    return prepared, unchanged


def read_image_texts(
    prepared: list[PreparedDocument],
    reader: ImageTextReader | None,
    open_session: Callable[[], AbstractContextManager[Session]],
) -> None:
    """The words inside the images of the changed documents: each distinct image (by sha256) looked up
    in `image_texts`, the rest read from S3 with no transaction open meanwhile, and recorded. Never
    fails a document: an image that cannot be read goes in without its words, with a warning."""
    with_images = [entry for entry in prepared if entry.document.images]
    if reader is None or not with_images:
        return
    if not reader.engine:
        if reader.warn_when_off:
            for entry in with_images:
                entry.warnings.append(f"image text not read: {reader.reason}")
        return
    wanted = {image.sha256: image for entry in with_images for image in entry.document.images}
    with open_session() as session:
        readings = reader.known(session, wanted)
    fresh = reader.read_all(image for sha, image in wanted.items() if sha not in readings)
    if any(reading.attempted for reading in fresh.values()):
        with open_session() as session:
            reader.remember(session, fresh.values())
    readings |= fresh
    for entry in with_images:
        entry.take_readings(readings)


def embed(prepared: list[PreparedDocument], embedder: Embedder) -> int:
    """Every text of the batch in one call of the model, each distinct text once; each document gets
    its vectors. Returns the number of texts the model embedded."""
    search = TextEmbeddings(embedder, blank_is_zero=False)  # a search vector is never zero (cosine)
    compared = TextEmbeddings(embedder)
    plans = []
    for entry in prepared:
        chunk_texts, description_texts = entry.texts()
        search.want(chunk_texts + description_texts)
        units, labels, images = entry.chunk_units(), entry.labels(), entry.compared_texts()
        for texts in [*units, labels, *images]:
            compared.want(texts)
        plans.append((entry, chunk_texts, description_texts, units, labels, images))
    count = TextEmbeddings.encode_together(search, compared)
    for entry, chunk_texts, description_texts, units, labels, images in plans:
        entry.chunk_vectors = list(search.matrix(chunk_texts))
        entry.image_vectors = list(search.matrix(description_texts))
        entry.unit_vectors = [pack(compared.matrix(texts)) for texts in units]
        entry.image_text_vectors = [pack(compared.matrix(texts)) for texts in images]
        entry.section_labels = labels
        entry.label_vectors = pack(compared.matrix(labels)) if labels else None
    return count


def units_column(parsed: ParsedDocument) -> list[list]:
    """The document's units as `documents.units` keeps them: [kind, text, heading level], in order."""
    return [[unit.kind, unit.text, unit.level] for unit in parsed.units]


def write(session: Session, collection: Collection, entry: PreparedDocument) -> IndexOutcome:
    """The document row (upserted by key), and its images and chunks in place of the old ones."""
    document, parsed, title = entry.document, entry.parsed, entry.title
    values = {
        "title": title,
        "source_path": document.source_path,
        "content_sha256": entry.stored_digest,
        "text": parsed.text,
        "units": units_column(parsed),
        "section_labels": entry.section_labels,
        "label_vectors": entry.label_vectors,
        "meta": document.meta,
    }
    document_id = session.execute(
        insert(Document)
        .values(collection_id=collection.id, doc_key=document.doc_key, **values)
        .on_conflict_do_update(index_elements=["collection_id", "doc_key"], set_={**values, "updated_at": func.now()})
        .returning(Document.id)
    ).scalar_one()
    session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    session.execute(delete(Image).where(Image.document_id == document_id))
    stored_by_link = {image.link: image for image in document.images}
    image_ids: list[int] = []
    for ref, vector, compared in zip(parsed.images, entry.image_vectors, entry.image_text_vectors, strict=True):
        stored = stored_by_link[ref.source]
        image_ids.append(
            session.execute(
                insert(Image)
                .values(
                    collection_id=collection.id,
                    document_id=document_id,
                    source_name=stored.source_name,
                    sha256=stored.sha256,
                    s3_key=stored.s3_key,
                    mime_type=stored.mime_type,
                    width=stored.width,
                    height=stored.height,
                    alt_text=ref.alt or None,
                    caption=ref.caption or None,
                    context_before=ref.context_before or None,
                    context_after=ref.context_after or None,
                    position=ref.position,
                    image_text=entry.image_texts.get(ref.source),
                    embedding=vector.tolist(),
                    embedding_dim=collection.embedding_dim,
                    text_vectors=compared,
                )
                .on_conflict_do_nothing(index_elements=["document_id", "source_name", "position"])
                .returning(Image.id)
            ).scalar()
            or 0
        )
    for chunk, vector, unit_vectors in zip(entry.chunks, entry.chunk_vectors, entry.unit_vectors, strict=True):
        session.add(
            Chunk(
                document_id=document_id,
                collection_id=collection.id,
                ordinal=chunk.ordinal,
                heading=chunk.heading or None,
                text=chunk.text,
                first_unit=chunk.first_unit,
                last_unit=chunk.last_unit,
                embedding=vector.tolist(),
                embedding_dim=collection.embedding_dim,
                unit_vectors=unit_vectors,
                image_ids=[image_ids[i] for i in chunk.image_indexes if image_ids[i]],
            )
        )
    session.flush()
    return IndexOutcome(
        document.doc_key, "ingested", chunks=len(entry.chunks), images=len(parsed.images), warnings=entry.warnings
    )


def index_documents(
    session: Session,
    collection: Collection,
    documents: list[StagedDocument],
    embedder: Embedder,
    reader: ImageTextReader | None = None,
) -> list[IndexOutcome]:
    """Index staged documents into the collection (prepare, read image texts when a reader is given,
    embed in one batch, write), all in the caller's session; the outcomes come back in the documents' order."""
    prepared, outcomes = prepare(session, collection, documents, reader.engine if reader else None)
    read_image_texts(prepared, reader, lambda: nullcontext(session))
    embed(prepared, embedder)
    for entry in prepared:
        outcomes[entry.position] = write(session, collection, entry)
    return [outcomes[position] for position in range(len(documents))]
