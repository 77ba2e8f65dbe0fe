"""Ingestion core: stage a source document (verify and store its images), then index it (chunks,
images and their embeddings in Postgres). Both are plain functions; the CLI stages, the retriever
worker indexes, and a benchmark can call either in one process.

Re-ingesting is idempotent: a document whose content hash (text, image bytes, chunker, model) is
unchanged is left alone; a changed one replaces its old chunks and images in one transaction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from services.common.embedding import Embedder
from services.common.models import Chunk, Collection, Document, Image
from services.common.storage import ObjectStore
from services.common.text import ImageRef
from services.retriever.chunking import chunk_document
from services.retriever.images import ImageRejected, verify_image
from services.retriever.importers import LinkedImage, Skipped, SourceDocument, parse_source

# Bump when chunking changes, so re-ingesting rebuilds every document's chunks.
CHUNKER_VERSION = "1"


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
def stage_document(store: ObjectStore, document: SourceDocument) -> tuple[dict[str, Any], list[Skipped]]:
    """Verify each linked image, store its bytes in S3 (once, by sha256), and build the payload the
    worker indexes. A bad image is skipped with its reason; the document still goes in."""
    images: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    for linked in document.images:
        where = f"{linked.source_name} (in {document.doc_key})"
        try:
            verified = verify_image(linked.path.read_bytes())
        except OSError as error:
            skipped.append(Skipped(where, f"cannot read image: {error.strerror or error}", doc_key=document.doc_key))
            continue
        except ImageRejected as error:
            skipped.append(Skipped(where, str(error), doc_key=document.doc_key))
            continue
        stored = store.put_content(verified.data, verified.mime_type, prefix="images")
        images.append(
            {
                "link": linked.link,
                "source_name": linked.source_name,
                "caption": linked.caption,
                "s3_key": stored.key,
                "sha256": verified.sha256,
                "mime_type": verified.mime_type,
                "width": verified.width,
                "height": verified.height,
            }
        )
    payload = {
        "doc_key": document.doc_key,
        "markdown": document.markdown,
        "source_path": document.source_path,
        "title": document.title,
        "pic_images": document.pic_images,
        "meta": document.meta,
        "images": images,
    }
    return payload, skipped


# ------------------------------------------------------------------ indexing (worker side)
@dataclass
class IndexOutcome:
    doc_key: str
    status: str  # ingested | unchanged
    chunks: int = 0
    images: int = 0
    warnings: list[str] = field(default_factory=list)


def content_hash(payload: dict[str, Any], model: str) -> str:
    basis = {
        "markdown": payload["markdown"],
        "pic_images": payload.get("pic_images", []),
        "title": payload.get("title"),
        "chunker": CHUNKER_VERSION,
        "model": model,
        "images": sorted((image["link"], image["sha256"], image.get("caption", "")) for image in payload["images"]),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def describe_image(ref: ImageRef, heading: str) -> str:
    """What an image is about, in words: caption, alt text, section and surrounding text (M2RAG's
    finding: such descriptions beat raw pixels for placing images)."""
    parts = [
        ref.caption,
        ref.alt if ref.alt != ref.caption else "",
        heading,
        ref.context_before,
        ref.context_after,
    ]
    return ". ".join(part.strip() for part in parts if part and part.strip())


def index_documents(
    session: Session, collection: Collection, payloads: list[dict[str, Any]], embedder: Embedder
) -> list[IndexOutcome]:
    """Index staged documents into the collection; embeddings are computed in one batch for all."""
    outcomes: dict[int, IndexOutcome] = {}  # by position in `payloads`, returned in that order
    work: list[tuple[int, dict[str, Any], str, Any, list, dict[str, dict]]] = []
    for position, payload in enumerate(payloads):
        digest = content_hash(payload, collection.embedding_model)
        existing = session.execute(
            select(Document).where(Document.collection_id == collection.id, Document.doc_key == payload["doc_key"])
        ).scalar_one_or_none()
        if existing is not None and existing.content_sha256 == digest:
            outcomes[position] = IndexOutcome(payload["doc_key"], "unchanged")
            continue
        source = SourceDocument(
            doc_key=payload["doc_key"],
            markdown=payload["markdown"],
            source_path=payload["source_path"],
            title=payload.get("title"),
            pic_images=payload.get("pic_images") or [],
            images=[
                LinkedImage(link=i["link"], source_name=i["source_name"], path=None, caption=i.get("caption", ""))
                for i in payload["images"]
            ],
        )
        parsed, _ = parse_source(source)
        chunks = chunk_document(parsed)
        stored_by_link = {image["link"]: image for image in payload["images"]}
        work.append((position, payload, digest, parsed, chunks, stored_by_link))

    texts: list[str] = []
    for _, payload, _, parsed, chunks, _ in work:
        title = payload.get("title") or parsed.title
        for chunk in chunks:
            texts.append(chunk.text if not title or chunk.text.startswith(title) else f"{title}\n{chunk.text}")
        heading_of_image = {index: chunk.heading for chunk in chunks for index in chunk.image_indexes}
        for index, ref in enumerate(parsed.images):
            texts.append(describe_image(ref, heading_of_image.get(index) or title or ""))
    vectors = embedder.encode(texts) if texts else []

    cursor = 0
    for position, payload, digest, parsed, chunks, stored_by_link in work:
        title = payload.get("title") or parsed.title
        document_id = session.execute(
            insert(Document)
            .values(
                collection_id=collection.id,
                doc_key=payload["doc_key"],
                title=title,
                source_path=payload["source_path"],
                content_sha256=digest,
                text=parsed.text,
                meta=payload.get("meta") or {},
            )
            .on_conflict_do_update(
                index_elements=["collection_id", "doc_key"],
                set_={
                    "title": title,
                    "source_path": payload["source_path"],
                    "content_sha256": digest,
                    "text": parsed.text,
                    "meta": payload.get("meta") or {},
                    "updated_at": func.now(),
                },
            )
            .returning(Document.id)
        ).scalar_one()
        session.execute(delete(Chunk).where(Chunk.document_id == document_id))
        session.execute(delete(Image).where(Image.document_id == document_id))
        chunk_vectors = vectors[cursor : cursor + len(chunks)]
        cursor += len(chunks)
        image_vectors = vectors[cursor : cursor + len(parsed.images)]
        cursor += len(parsed.images)
        image_ids: list[int] = []
        for ref, vector in zip(parsed.images, image_vectors, strict=True):
            stored = stored_by_link[ref.source]
            image_ids.append(
                session.execute(
                    insert(Image)
                    .values(
                        collection_id=collection.id,
                        document_id=document_id,
                        source_name=stored["source_name"],
                        sha256=stored["sha256"],
                        s3_key=stored["s3_key"],
                        mime_type=stored["mime_type"],
                        width=stored["width"],
                        height=stored["height"],
                        alt_text=ref.alt or None,
                        caption=ref.caption or None,
                        context_before=ref.context_before or None,
                        context_after=ref.context_after or None,
                        position=ref.position,
                        embedding=vector.tolist(),
                        embedding_dim=collection.embedding_dim,
                    )
                    .on_conflict_do_nothing(index_elements=["document_id", "source_name", "position"])
                    .returning(Image.id)
                ).scalar()
                or 0
            )
        for chunk, vector in zip(chunks, chunk_vectors, strict=True):
            session.add(
                Chunk(
                    document_id=document_id,
                    collection_id=collection.id,
                    ordinal=chunk.ordinal,
                    heading=chunk.heading or None,
                    text=chunk.text,
                    embedding=vector.tolist(),
                    embedding_dim=collection.embedding_dim,
                    image_ids=[image_ids[i] for i in chunk.image_indexes if image_ids[i]],
                )
            )
        session.flush()
        outcomes[position] = IndexOutcome(payload["doc_key"], "ingested", chunks=len(chunks), images=len(parsed.images))
    return [outcomes[position] for position in range(len(payloads))]
