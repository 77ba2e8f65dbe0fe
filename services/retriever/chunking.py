"""Chunking of parsed documents for indexing.

Chunks group consecutive units of one section (under one heading path) up to a word budget that
fits the embedding model, splitting only between units, and know which images stand inside them.
Parsing (units, sentences, image references) lives in `services.common.text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.text import ParsedDocument

# all-MiniLM-L6-v2 reads 256 word pieces; ~160 words of prose stay under that with the heading.
DEFAULT_CHUNK_WORDS = 160


@dataclass
class Chunk:
    ordinal: int
    heading: str
    text: str
    first_unit: int  # 1-based, inclusive
    last_unit: int
    image_indexes: list[int] = field(default_factory=list)  # into ParsedDocument.images


def chunk_document(document: ParsedDocument, max_words: int = DEFAULT_CHUNK_WORDS) -> list[Chunk]:
    """Consecutive units of one section, up to `max_words`; never splits a unit."""
    chunks: list[Chunk] = []
    current: list[int] = []  # 0-based unit indexes
    words = 0

    def close() -> None:
        nonlocal words
        if not current:
            return
        first, last = current[0], current[-1]
        heading = " > ".join(document.units[first].heading_path)
        # The chunk opens with its full heading path (the section's own heading included), so a
        # chunk deep in a section still says what it is about.
        body_units = current[1:] if document.units[first].kind == "heading" else current
        body = "\n".join(document.units[i].text for i in body_units)
        text = f"{heading}\n{body}".strip() if heading else body
        chunks.append(Chunk(ordinal=len(chunks), heading=heading, text=text, first_unit=first + 1, last_unit=last + 1))
        current.clear()
        words = 0

    for i, unit in enumerate(document.units):
        unit_words = len(unit.text.split())
        new_section = unit.kind == "heading"
        if current and (new_section or words + unit_words > max_words):
            # keep a heading with what follows it rather than alone at a chunk's end
            close()
        current.append(i)
        words += unit_words
    close()
    for index, ref in enumerate(document.images):
        owner = chunk_for_position(chunks, ref.position)
        if owner is not None:
            owner.image_indexes.append(index)
    return chunks


def chunk_for_position(chunks: list[Chunk], position: int) -> Chunk | None:
    """The chunk an image belongs to: the one holding the unit it follows (the first one if it
    opens the document)."""
    if not chunks:
        return None
    if position <= 0:
        return chunks[0]
    for chunk in chunks:
        if chunk.first_unit <= position <= chunk.last_unit:
            return chunk
    return chunks[-1]
