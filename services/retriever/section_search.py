"""Question -> section: which section of the top passages' documents answers the question, with its
answer units (whole sections, with provenance), from the documents' stored units and section vectors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from services.common.contracts import Passage, SourceSection
from services.common.models import Image
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
