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
from services.retriever.evidence import filter_passages
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
    # The distance is selected as well as ordered by: the same expression, so the index still serves
    # the ORDER BY, and the caller learns each row's cosine without a second round trip.
    return (
        f"SELECT id, {expression} <=> CAST(:query AS halfvec({dim})) AS distance FROM {table} "
        f"WHERE collection_id = :collection AND embedding_dim = {dim} "
        f"ORDER BY {expression} <=> CAST(:query AS halfvec({dim})) LIMIT :limit"
    )


def vector_ranks(session: Session, table: str, collection: Collection, query_vector: str, limit: int) -> list[int]:
    """The nearest rows' ids, nearest first."""
    return [row_id for row_id, _ in vector_hits(session, table, collection, query_vector, limit)]


def vector_hits(
    session: Session, table: str, collection: Collection, query_vector: str, limit: int
) -> list[tuple[int, float]]:
    """The nearest rows, nearest first, each as (id, cosine similarity to the query)."""
    use_search_settings(session)
    rows = session.execute(
        text(vector_search_sql(table, collection.embedding_dim)),
        {"collection": collection.id, "query": query_vector, "limit": limit},
    ).all()
    return [(row.id, 1.0 - float(row.distance)) for row in rows]


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
    """Full-text ranks (ids, best first)."""
    return [chunk_id for chunk_id, _ in text_hits(session, collection, question, limit)]


def text_hits(session: Session, collection: Collection, question: str, limit: int) -> list[tuple[int, float]]:
    """Full-text matches, best first, each as (id, ts_rank_cd); the question's terms are OR-ed (a
    question rarely shares all its words)."""
    rows = session.execute(
        text(
            "WITH q AS (SELECT NULLIF(replace(plainto_tsquery('english', :question)::text, ' & ', ' | '), '') "
            "AS terms) "
            "SELECT c.id, ts_rank_cd(c.tsv, to_tsquery('english', q.terms)) AS text_score FROM chunks c, q "
            "WHERE q.terms IS NOT NULL AND c.collection_id = :collection AND c.tsv @@ to_tsquery('english', q.terms) "
            "ORDER BY text_score DESC, c.id LIMIT :limit"
        ),
        {"question": question, "collection": collection.id, "limit": limit},
    ).all()
    return [(row.id, float(row.text_score)) for row in rows]


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
    vector_found = vector_hits(session, "chunks", collection, query_vector, pool)
    text_found = text_hits(session, collection, question, pool)
    by_vector = {chunk_id: rank for rank, (chunk_id, _) in enumerate(vector_found, 1)}
    by_text = {chunk_id: rank for rank, (chunk_id, _) in enumerate(text_found, 1)}
    dense_of, text_score_of = dict(vector_found), dict(text_found)
    fused = sorted(
        ((rrf(by_vector.get(cid)) + rrf(by_text.get(cid)), cid) for cid in set(by_vector) | set(by_text)),
        key=lambda pair: (-pair[0], pair[1]),
    )[:top_k]
    passages: list[Passage] = []
    if fused:
        # A passage the full text found beyond the vector search's depth gets its cosine here, in the
        # same query that reads it (the vector search's own expression, so the two agree).
        dim = collection.embedding_dim
        rows = session.execute(
            text(
                "SELECT c.id, c.document_id, d.doc_key, c.heading, c.text, c.image_ids, c.first_unit, c.last_unit, "
                f"CASE WHEN c.embedding_dim = {dim} THEN 1 - (c.{search_expression(dim)} <=> "
                f"CAST(:query AS halfvec({dim}))) END AS dense "
                "FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id = ANY(:ids)"
            ),
            {"ids": [cid for _, cid in fused], "query": query_vector},
        ).all()
        by_id = {row.id: row for row in rows}
        for score, cid in fused:
            row = by_id[cid]
            dense = dense_of.get(cid, row.dense)
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
                    dense=None if dense is None else round(float(dense), 4),
                    text_score=round(text_score_of[cid], 4) if cid in text_score_of else None,
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
    # Last, once the answer's section is known: it keeps the passages it holds (services/retriever/evidence.py).
    kept, rejected = filter_passages(passages, sections)
    return Retrieval(
        collection=collection.name,
        question=question,
        passages=kept,
        rejected=rejected,
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
