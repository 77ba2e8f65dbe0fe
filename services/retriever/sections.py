"""Sections of a document, and which of them answers a question.

A document's units (`documents.units`, numbered from 1 as images' positions count them) fall into
**sections**: a heading and the units up to the next heading of any level (its *own* text), inside
the units up to the next heading of the same or a higher level (its *subtree*). Text before the
first heading is a section of its own (level 0).

An answer is cut from sections, never from sentence picks: its own text, whole, and its
sub-sections too when the question asks how to do something and the own text holds no steps (a
recipe's "Ingredients" and "Directions" under its title). A length budget trims only at a section
boundary, or at a list's end; a list (a procedure) is kept whole.

Pure functions over plain values: the retriever (`search.retrieve`) loads the units and scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import snowballstemmer

from services.common.contracts import AnswerUnit, UnitSource

# An answer's length budget in words. The longest whole recipe of the development corpora is ~730
# words (a sourdough loaf with its notes); a manual section's own text rarely passes 300. Past this
# a reader wants the section's start and a pointer, not a page.
MAX_ANSWER_WORDS = 1000

# "How do I ...?", "How to ...", "How can you ...", "Steps to ...": the reader wants a procedure.
PROCEDURAL = re.compile(
    r"^\s*(how\s+(do|does|can|could|should|would|to|did|is|are)\b|what\s+are\s+the\s+steps\b|steps?\s+(to|for)\b"
    r"|instructions?\s+(to|for)\b|procedure\s+(to|for)\b)",
    re.IGNORECASE,
)
ORDERED_ITEM = re.compile(r"^\s*\d{1,3}[.)]\s")
WORD = re.compile(r"[^\W_]{2,}")
# English function words: they say nothing about which section a question is about.
STOP_WORDS = frozenset(
    "a an and are as at be by can could do does for from how i if in into is it its me my of on or our should "
    "the their there this to was we what when where which who why will with would you your".split()
)


@dataclass(frozen=True)
class StoredUnit:
    kind: str
    text: str
    level: int = 0


@dataclass(frozen=True)
class Section:
    path: tuple[str, ...]  # heading texts, outermost first
    level: int  # 0: text before the first heading
    heading: int  # the unit number of its heading; 0 for a level-0 section
    own_end: int  # its last own unit (inclusive); < start when it has no text of its own
    end: int  # its subtree's last unit (inclusive)

    @property
    def start(self) -> int:
        """Its first body unit (the one after its heading)."""
        return self.heading + 1

    @property
    def label(self) -> str:
        return " > ".join(self.path)

    @property
    def has_subsections(self) -> bool:
        return self.end > self.own_end


def stored_units(rows: Sequence[Sequence]) -> list[StoredUnit]:
    """`documents.units` rows ([kind, text, level]) as units."""
    return [StoredUnit(str(row[0]), str(row[1]), int(row[2] or 0)) for row in rows]


def document_sections(units: Sequence[StoredUnit], title: str | None = None) -> list[Section]:
    """Every section of a document, in document order.

    >>> units = stored_units([["heading", "Pie", 1], ["sentence", "Good.", 0], ["heading", "Steps", 2],
    ...                       ["item", "1. Bake.", 0], ["heading", "Other", 1], ["sentence", "X.", 0]])
    >>> [(s.label, s.heading, s.own_end, s.end) for s in document_sections(units)]
    [('Pie', 1, 2, 4), ('Pie > Steps', 3, 4, 4), ('Other', 5, 6, 6)]
    """
    sections: list[Section] = []
    headings = [(number, unit) for number, unit in enumerate(units, 1) if unit.kind == "heading"]
    first_heading = headings[0][0] if headings else len(units) + 1
    if first_heading > 1:  # text before any heading: the page's lead, under its title
        sections.append(Section((title,) if title else (), 0, 0, first_heading - 1, first_heading - 1))
    stack: list[tuple[int, str]] = []
    for index, (number, unit) in enumerate(headings):
        level = max(1, unit.level or 1)
        stack = [(lvl, text) for lvl, text in stack if lvl < level] + [(level, unit.text)]
        own_end = headings[index + 1][0] - 1 if index + 1 < len(headings) else len(units)
        end = len(units)
        for later, other in headings[index + 1 :]:
            if max(1, other.level or 1) <= level:
                end = later - 1
                break
        sections.append(Section(tuple(text for _, text in stack), level, number, own_end, end))
    return sections


def section_of(sections: Sequence[Section], position: int) -> Section | None:
    """The innermost section whose own text holds unit `position` (its heading included)."""
    for section in sections:
        if section.heading <= position <= section.own_end:
            return section
    return None


@lru_cache(maxsize=1)
def english_stemmer():
    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=65536)  # headings recur in every query on their document; Snowball in Python is slow
def terms(text: str) -> frozenset[str]:
    """The content words of a text, stemmed (Snowball): what a heading and a question share.

    >>> sorted(terms("How do I manage the Presets?")) == sorted(terms("Managing presets"))
    True
    """
    words = [word for word in WORD.findall(text.lower()) if word not in STOP_WORDS]
    return frozenset(english_stemmer().stemWords(words))


def is_procedural(question: str) -> bool:
    """Whether the question asks how to do something.

    >>> [is_procedural(q) for q in ["How do I make Pho?", "What is Fly View?", "Fly View: Camera?"]]
    [True, False, False]
    """
    return bool(PROCEDURAL.match(question))


def has_steps(units: Sequence[StoredUnit]) -> bool:
    return any(unit.kind == "item" and ORDERED_ITEM.match(unit.text) for unit in units)


def wants_subsections(section: Section, units: Sequence[StoredUnit], question: str) -> bool:
    """Sub-sections belong to the answer when the question asks for a procedure that the section's own
    text does not hold (a recipe's title section: its steps are under "Directions"), or when the
    section has no text of its own. Otherwise the section's own text answers, and its sub-sections —
    topics of their own, with questions of their own — stay out."""
    if not section.has_subsections:
        return False
    own = units[section.start - 1 : section.own_end]
    if not own:
        return True
    if not is_procedural(question) or has_steps(own):
        return False
    return has_steps(units[section.own_end : section.end])


def blocks_of(units: Sequence[StoredUnit], first: int, last: int) -> list[tuple[int, int]]:
    """Units first..last as blocks that must not be cut: a run of list items is one block, every
    other unit its own. (start, end) unit numbers, inclusive."""
    blocks: list[tuple[int, int]] = []
    number = first
    while number <= last:
        end = number
        if units[number - 1].kind == "item":
            while end + 1 <= last and units[end].kind == "item":
                end += 1
        blocks.append((number, end))
        number = end + 1
    return blocks


def section_body(
    section: Section,
    units: Sequence[StoredUnit],
    *,
    subsections: bool,
    max_words: int = MAX_ANSWER_WORDS,
    sections: Sequence[Section] | None = None,
) -> tuple[list[int], bool]:
    """The unit numbers of the section's answer, and whether the budget cut it. Cuts fall between
    sub-sections, or between blocks of the own text (a list is one block); the first block is always
    kept, so an answer is never empty when the section has text. `sections`: the document's sections,
    when the caller has them (else they are read from `units`)."""
    chosen: list[int] = []
    words = 0
    # Sub-sections are whole units of budget: a sub-section that does not fit ends the answer.
    spans = [(section.start, section.own_end)]
    if subsections:
        spans += child_spans(section, sections if sections is not None else document_sections(units))
    for start, end in spans:
        if start > end:
            continue
        span_words = sum(len(unit.text.split()) for unit in units[start - 1 : end])
        if words + span_words <= max_words or not chosen and start > section.own_end:
            chosen += range(start, end + 1)
            words += span_words
            continue
        if chosen:  # a sub-section that does not fit ends the answer
            return chosen, True
        # the own text alone is over the budget: cut it between blocks
        for block_start, block_end in blocks_of(units, start, end):
            block_words = sum(len(unit.text.split()) for unit in units[block_start - 1 : block_end])
            if chosen and words + block_words > max_words:
                return chosen, True
            chosen += range(block_start, block_end + 1)
            words += block_words
    return chosen, False


def child_spans(section: Section, sections: Sequence[Section]) -> list[tuple[int, int]]:
    """The section's direct sub-sections (among the document's `sections`) as (heading, end of
    subtree) spans, in order (deeper ones are inside them)."""
    spans: list[tuple[int, int]] = []
    for child in sections:
        if section.own_end < child.heading <= section.end and (not spans or child.heading > spans[-1][1]):
            spans.append((child.heading, child.end))
    return spans


def answer_units(
    numbers: Sequence[int],
    units: Sequence[StoredUnit],
    sections: Sequence[Section],
    document_id: int,
    doc_key: str,
    chunk_of: dict[tuple[int, int], int] | None = None,
) -> list[AnswerUnit]:
    """Units of a document as answer units that know where they stood (`chunk_of`: (document id, unit
    number) -> chunk id)."""
    result = []
    for number in numbers:
        unit = units[number - 1]
        owner = section_of(sections, number)
        result.append(
            AnswerUnit(
                text=unit.text,
                kind=unit.kind,
                level=unit.level if unit.kind == "heading" and unit.level else None,
                source=UnitSource(
                    document_id=document_id,
                    doc_key=doc_key,
                    position=number,
                    chunk_id=(chunk_of or {}).get((document_id, number)),
                    section=owner.label if owner else None,
                ),
            )
        )
    return result
