"""Hybrid search: pgvector IVFFlat (cosine, halfvec) and Postgres full-text, fused by reciprocal rank, per collection.

Candidate images are the images inside the retrieved passages plus the images whose description
(caption + context + the words inside the image) is close to the question, de-duplicated by source
name and scored by the same reciprocal-rank fusion.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from services.common.contracts import (
    DEFAULT_CANDIDATES,
    DEFAULT_TOP_K,
    CandidateImage,
    Passage,
    Retrieval,
    SourceSection,
)
from services.common.db import vector_literal
from services.common.embedding import Embedder
from services.common.models import Collection, Document, Image
from services.common.settings import get_settings
from services.common.vectors import QueryVectors, unpack
from services.retriever.sections import (
    Section,
    StoredUnit,
    answer_units,
    document_sections,
    section_body,
    stored_units,
    terms,
    wants_subsections,
)
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
    rows = session.execute(
        text(vector_search_sql(table, collection.embedding_dim)),
        {"collection": collection.id, "query": query_vector, "limit": limit},
    ).all()
    return [row.id for row in rows]


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
) -> Retrieval:
    if not 1 <= top_k <= MAX_RESULTS:
        raise ValueError(f"top_k={top_k}: use 1..{MAX_RESULTS} passages")
    if not 0 <= max_candidates <= MAX_RESULTS:
        raise ValueError(f"candidates={max_candidates}: use 0..{MAX_RESULTS} images")
    vectors = QueryVectors(embedder, session)
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


# ------------------------------------------------------------------ question -> section
SECTION_DOCUMENTS = 3  # documents of the top passages whose sections compete
SECTIONS_KEPT = 3  # sections handed to the generator, best first
# What each kind of evidence adds to the heading path's cosine similarity (MiniLM cosines of a
# question and its section's heading run 0.6-0.95): all of the question's words in the heading path
# are worth about as much as the gap between a right and a wrong heading's similarity, and the
# passages inside a section break ties between similar headings.
LEXICAL_WEIGHT = 0.5
SUPPORT_WEIGHT = 0.3


def source_sections(
    session: Session, question: str, query: np.ndarray, passages: list[Passage], vectors: QueryVectors
) -> list[SourceSection]:
    """The sections of the top passages' documents that may answer the question, best first, each
    with its answer units (whole: own text, sub-sections when the question asks for a procedure).

    A section scores by three kinds of evidence: its heading path's similarity to the question
    (dense), the share of the question's content words its heading path holds (full text, stemmed),
    and the retrieved passages inside its own text (the fused search, relative to the top passage).
    A sub-section whose own heading says nothing the question asks about gives way to the section
    around it ("How do I make X?" is about the recipe X, not its "Directions")."""
    document_ids: list[int] = []
    for passage in passages:
        if passage.document_id not in document_ids:
            document_ids.append(passage.document_id)
    if not document_ids:
        return []
    documents = load_documents(session, document_ids)
    chunk_of = chunk_positions(session, [document.row.id for document in documents])
    entries: list[SectionEntry] = []
    for document in documents:
        add_passage_units(passages, document.row, document.units, document.sections, chunk_of)
        if document_ids.index(document.row.id) < SECTION_DOCUMENTS:  # by its passages' rank
            entries += [
                SectionEntry(document.row, document.units, document.sections, s, document.labels)
                for s in document.sections
            ]
    if not entries:
        return []
    question_terms = terms(question)
    dense = label_vectors(entries, vectors) @ query
    top_score = passages[0].score or 1.0
    for entry, heading_similarity in zip(entries, dense, strict=True):
        section = entry.section
        support = max(
            (
                p.score
                for p in passages
                if p.document_id == entry.row.id
                and p.first_unit is not None
                and p.first_unit <= section.own_end
                and p.last_unit >= section.heading
            ),
            default=0.0,
        )
        path_terms = terms(section.label)
        lexical = len(question_terms & path_terms) / len(question_terms) if question_terms else 0.0
        entry.novel = terms(section.path[-1]) - terms(" ".join(section.path[:-1]))
        entry.evidence = {
            "heading_similarity": round(float(heading_similarity), 4),
            "heading_terms": round(lexical, 4),
            "passages": round(support / top_score, 4),
        }
        entry.score = float(heading_similarity) + LEXICAL_WEIGHT * lexical + SUPPORT_WEIGHT * support / top_score
    entries.sort(key=lambda entry: -entry.score)
    best = climb_to_parent(entries[0], entries, question_terms)
    ranked = [best, *(entry for entry in entries if entry is not best)]
    result = []
    for entry in ranked[:SECTIONS_KEPT]:
        subsections = wants_subsections(entry.section, entry.units, question)
        numbers, truncated = section_body(entry.section, entry.units, subsections=subsections, sections=entry.sections)
        if not numbers and entry.section.heading:
            numbers = [entry.section.heading]  # a section of images only: its heading says what they show
        result.append(
            SourceSection(
                document_id=entry.row.id,
                doc_key=entry.row.doc_key,
                path=entry.section.label,
                level=entry.section.level,
                units=answer_units(numbers, entry.units, entry.sections, entry.row.id, entry.row.doc_key, chunk_of),
                subsections=subsections,
                truncated=truncated,
                score=round(entry.score, 4),
                evidence=entry.evidence,
            )
        )
    return result


def label_vectors(entries: list[SectionEntry], vectors: QueryVectors) -> np.ndarray:
    """The sections' heading-path vectors, stored at ingest; those not stored (a document indexed
    before they were) are embedded now."""
    rows: list[np.ndarray | None] = [entry.labels.get(entry.section.label) for entry in entries]
    missing = [index for index, row in enumerate(rows) if row is None]
    if missing:
        for index, vector in zip(missing, vectors.embed([entries[i].section.label for i in missing]), strict=True):
            rows[index] = vector
    return np.stack(rows)


@dataclass
class DocumentUnits:
    row: Any  # documents row: id, doc_key, title, units
    units: list[StoredUnit]
    sections: list[Section]  # those with a heading path (a title-less lead has none to match)
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # heading path -> its stored vector


def load_documents(session: Session, document_ids: list[int]) -> list[DocumentUnits]:
    """The documents' stored units, sections and section vectors, in the order of `document_ids`;
    documents indexed before units were kept are left out."""
    rows = session.execute(
        text(
            "SELECT id, doc_key, title, units, section_labels, label_vectors FROM documents "
            "WHERE id = ANY(:ids) AND units IS NOT NULL"
        ),
        {"ids": document_ids},
    ).all()
    documents = []
    for row in sorted(rows, key=lambda r: document_ids.index(r.id)):
        units = stored_units(row.units)
        sections = [s for s in document_sections(units, row.title) if s.path]
        labels = row.section_labels or []
        matrix = unpack(row.label_vectors, len(labels))
        stored = dict(zip(labels, matrix, strict=True)) if matrix is not None else {}
        documents.append(DocumentUnits(row, units, sections, stored))
    return documents


@dataclass(eq=False)
class SectionEntry:
    row: Any  # documents row: id, doc_key, title, units
    units: list[StoredUnit]
    sections: list[Section]
    section: Section
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # the document's stored label vectors
    score: float = 0.0
    evidence: dict[str, float] = field(default_factory=dict)
    novel: frozenset[str] = frozenset()  # its own heading's terms that its parents' headings lack


def climb_to_parent(best: SectionEntry, entries: list[SectionEntry], question_terms: frozenset[str]) -> SectionEntry:
    """While the best section's own heading adds no word the question asks about, the section around
    it answers instead (it holds the sub-section, and more of what was asked)."""
    by_path = {(entry.row.id, entry.section.path): entry for entry in entries}
    while len(best.section.path) > 1 and not best.novel & question_terms:
        parent = None
        for length in range(len(best.section.path) - 1, 0, -1):
            parent = by_path.get((best.row.id, best.section.path[:length]))
            if parent is not None:
                break
        if parent is None:
            break
        best = parent
    return best


def chunk_positions(session: Session, document_ids: list[int]) -> dict[tuple[int, int], int]:
    """(document id, unit number) -> the chunk holding it, for the given documents."""
    positions: dict[tuple[int, int], int] = {}
    for chunk in session.execute(
        text(
            "SELECT id, document_id, first_unit, last_unit FROM chunks "
            "WHERE document_id = ANY(:ids) AND first_unit IS NOT NULL"
        ),
        {"ids": document_ids},
    ):
        for number in range(chunk.first_unit, chunk.last_unit + 1):
            positions.setdefault((chunk.document_id, number), chunk.id)
    return positions


def add_passage_units(
    passages: list[Passage], row, units: list[StoredUnit], sections: list[Section], chunk_of: dict
) -> None:
    """Each passage of the document gets its units with provenance (its heading units left out: the
    passage's heading path says them), for answers made of sentences of the passages."""
    for passage in passages:
        if passage.document_id != row.id or passage.first_unit is None or passage.last_unit is None:
            continue
        numbers = [
            n
            for n in range(passage.first_unit, min(passage.last_unit, len(units)) + 1)
            if units[n - 1].kind != "heading"
        ]
        passage.units = answer_units(numbers, units, sections, row.id, row.doc_key, chunk_of)


def images_of_section(session: Session, section: SourceSection) -> list[int]:
    """The images standing in the section's answer (after its heading or one of its units), in order."""
    if not section.units:
        return []
    positions = [unit.source.position for unit in section.units if unit.source]
    low = min(positions) - 1  # right after the heading: before the first unit
    rows = session.execute(
        select(Image.id, Image.position)
        .where(Image.document_id == section.document_id, Image.position >= low, Image.position <= max(positions))
        .order_by(Image.position, Image.id)
    ).all()
    held = set(positions) | {low}
    return [row.id for row in rows if row.position in held]
