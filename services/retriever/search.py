"""Hybrid search: pgvector IVFFlat (cosine, halfvec) and Postgres full-text, fused by reciprocal rank, per collection.

Candidate images are the images inside the retrieved passages plus the images whose description
(caption + context + the words inside the image) is close to the question, de-duplicated by source
name and scored by the same reciprocal-rank fusion.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from services.common.contracts import (
    DEFAULT_CANDIDATES,
    DEFAULT_TOP_K,
    CandidateImage,
    Passage,
    Retrieval,
)
from services.common.db import vector_literal
from services.common.embedding import Embedder
from services.common.models import Collection, Document, Image
from services.common.settings import get_settings
from services.common.vectors import QueryVectors
from services.retriever.section_search import images_of_section, source_sections
from services.retriever.vector_index import search_expression

RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion; robust across lists
POOL = 50  # how deep each list is read before fusion
MAX_RESULTS = 100  # top_k and candidates, as JobConfig bounds them: more is a typo, not a question


class UnknownCollection(LookupError):
    pass


def get_collection(session: Session, name: str) -> Collection:
    collection = session.execute(select(Collection).where(Collection.name == name)).scalar_one_or_none()
    if collection is None:
        known = session.scalars(select(Collection.name).order_by(Collection.name)).all()
        raise UnknownCollection(f"no collection named {name!r} (known: {', '.join(known) or 'none; ingest first'})")
    return collection


def rrf(rank: int | None) -> float:
    return 0.0 if rank is None else 1.0 / (RRF_K + rank)


def vector_search_sql(table: str, dim: int) -> str:
    """Nearest neighbours by cosine on the table's IVFFlat index for `dim` (its expression, its predicate)."""
    expression = search_expression(dim)
    return (
        f"SELECT id FROM {table} WHERE collection_id = :collection AND embedding_dim = {dim} "
        f"ORDER BY {expression} <=> CAST(:query AS halfvec({dim})) LIMIT :limit"
    )


def vector_ranks(session: Session, table: str, collection: Collection, query_vector: str, limit: int) -> list[int]:
    use_search_settings(session)
    rows = session.execute(
        text(vector_search_sql(table, collection.embedding_dim)),
        {"collection": collection.id, "query": query_vector, "limit": limit},
    ).all()
    return [row.id for row in rows]


def use_search_settings(session: Session) -> None:
    """The IVFFlat settings of every vector search, for this transaction."""
    settings = get_settings()
    # One round trip for the transaction's settings. Iterative scans read further lists while fewer
    # than `limit` rows of the collection were found, up to max_probes (a small collection in a large table).
    session.execute(
        text(
            "SELECT set_config('ivfflat.probes', :probes, true), set_config('ivfflat.max_probes', :max_probes, true), "
            "set_config('ivfflat.iterative_scan', 'relaxed_order', true)"
        ),
        {"probes": str(settings.ivfflat_probes), "max_probes": str(settings.ivfflat_max_probes)},
    )


def text_ranks(session: Session, collection: Collection, question: str, limit: int) -> list[int]:
    """Full-text ranks; the question's terms are OR-ed (a question rarely shares all its words)."""
    rows = session.execute(
        text(
            "WITH q AS (SELECT NULLIF(replace(plainto_tsquery('english', :question)::text, ' & ', ' | '), '') "
            "AS terms) "
            "SELECT c.id FROM chunks c, q "
            "WHERE q.terms IS NOT NULL AND c.collection_id = :collection AND c.tsv @@ to_tsquery('english', q.terms) "
            "ORDER BY ts_rank_cd(c.tsv, to_tsquery('english', q.terms)) DESC, c.id LIMIT :limit"
        ),
        {"question": question, "collection": collection.id, "limit": limit},
    ).all()
    return [row.id for row in rows]


def retrieve(
    session: Session,
    collection: Collection,
    question: str,
    embedder: Embedder,
    top_k: int = DEFAULT_TOP_K,
    max_candidates: int = DEFAULT_CANDIDATES,
    query: np.ndarray | None = None,
) -> Retrieval:
    """Passages, sections and candidate images for a question in one collection. `query`: the question's
    vector when the caller has embedded it already (the router has), else it is embedded here."""
    if not 1 <= top_k <= MAX_RESULTS:
        raise ValueError(f"top_k={top_k}: use 1..{MAX_RESULTS} passages")
    if not 0 <= max_candidates <= MAX_RESULTS:
        raise ValueError(f"candidates={max_candidates}: use 0..{MAX_RESULTS} images")
    vectors = QueryVectors(embedder, session)
    if query is None:
        query = vectors.embed([question])[0]
    query_vector = vector_literal(query)
    pool = max(POOL, top_k * 4)
    by_vector = {
        chunk_id: rank
        for rank, chunk_id in enumerate(vector_ranks(session, "chunks", collection, query_vector, pool), 1)
    }
    by_text = {chunk_id: rank for rank, chunk_id in enumerate(text_ranks(session, collection, question, pool), 1)}
    fused = sorted(
        ((rrf(by_vector.get(cid)) + rrf(by_text.get(cid)), cid) for cid in set(by_vector) | set(by_text)),
        key=lambda pair: (-pair[0], pair[1]),
    )[:top_k]
    passages: list[Passage] = []
    if fused:
        rows = session.execute(
            text(
                "SELECT c.id, c.document_id, d.doc_key, c.heading, c.text, c.image_ids, c.first_unit, c.last_unit "
                "FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id = ANY(:ids)"
            ),
            {"ids": [cid for _, cid in fused]},
        ).all()
        by_id = {row.id: row for row in rows}
        for score, cid in fused:
            row = by_id[cid]
            passages.append(
                Passage(
                    chunk_id=cid,
                    document_id=row.document_id,
                    doc_key=row.doc_key,
                    heading=row.heading,
                    text=row.text,
                    score=round(score, 6),
                    vector_rank=by_vector.get(cid),
                    text_rank=by_text.get(cid),
                    first_unit=row.first_unit,
                    last_unit=row.last_unit,
                )
            )
        passage_images = [
            (rank, image_id) for rank, (_, cid) in enumerate(fused, 1) for image_id in by_id[cid].image_ids
        ]
    else:
        passage_images = []
    sections = source_sections(session, question, query, passages, vectors)
    section_images = images_of_section(session, sections[0]) if sections else []
    candidates = candidate_images(session, collection, query_vector, passage_images, max_candidates, section_images)
    return Retrieval(
        collection=collection.name,
        question=question,
        passages=passages,
        candidates=candidates,
        sections=sections,
        question_vector=[round(float(x), 7) for x in query],
        embedded=vectors.embedded,
    )


def candidate_images(
    session: Session,
    collection: Collection,
    query_vector: str,
    passage_images: list[tuple[int, int]],
    limit: int,
    section_images: list[int] | None = None,
) -> list[CandidateImage]:
    """Fuse images of retrieved passages (ranked by their passage) with images whose description
    matches the question; one entry per source name, the best-scored occurrence kept. The images of
    the best section (`section_images`, in document order) come first, each in the occurrence that
    stands in that section, even past `limit`: the answer is made from that section."""
    section_images = section_images or []
    scores: dict[int, float] = defaultdict(float)
    reasons: dict[int, set[str]] = defaultdict(set)
    for rank, image_id in enumerate(section_images, 1):
        scores[image_id] += 1.0 + rrf(rank)  # above any fused score (each list adds at most 1/61)
        reasons[image_id].add("section")
    for rank, image_id in passage_images:
        if "passage" not in reasons[image_id]:
            scores[image_id] += rrf(rank)
            reasons[image_id].add("passage")
    for rank, image_id in enumerate(vector_ranks(session, "images", collection, query_vector, POOL), 1):
        scores[image_id] += rrf(rank)
        reasons[image_id].add("description")
    if not scores:
        return []
    images = session.execute(
        select(
            Image.id,
            Image.source_name,
            Image.s3_key,
            Image.caption,
            Image.context_before,
            Image.context_after,
            Image.image_text,
            Image.document_id,
            Image.position,
            Document.doc_key,
        )
        .join(Document, Document.id == Image.document_id)
        .where(Image.id.in_(list(scores)))
    ).all()
    best: dict[str, CandidateImage] = {}
    for image in images:
        candidate = candidate_of(image, image.doc_key, round(scores[image.id], 6), reasons[image.id])
        kept = best.get(image.source_name)
        if kept is None or candidate.score > kept.score:
            best[image.source_name] = candidate
    ranked = sorted(best.values(), key=lambda c: (-c.score, c.source_name))
    return ranked[: max(limit, sum("section" in c.reasons for c in ranked))]


def candidate_of(image, doc_key: str, score: float, reasons) -> CandidateImage:
    """A candidate from an `images` row (an ORM object or a selected row with the same columns)."""
    return CandidateImage(
        image_id=image.id,
        source_name=image.source_name,
        s3_key=image.s3_key,
        caption=image.caption,
        context_before=image.context_before,
        context_after=image.context_after,
        image_text=image.image_text,
        doc_key=doc_key,
        score=score,
        reasons=sorted(reasons),
        document_id=image.document_id,
        position=image.position,
    )
