"""The point-wise passage filter (MMRAG-RFT's first step): before generation, each retrieved passage is
judged on its own against the question, and one that does not answer it is dropped with the reason.

It is conservative by design: the fused search already ranked the passages, and a dropped passage is
text the generator never sees. So it never drops the best passage, nor a passage of the answer's
section (`Retrieval.sections[0]`: one it contains, or one inside which the section stands), and it
drops only on two pieces of evidence at once: the passage's vector is far from the question's, and
the full-text search did not find it (or found it only on a word or two, with a vector so far off
that the words cannot be the question's subject). And it judges only when the question is on the
collection's topics at all (some passage reaches `MIN_DENSE`): when every passage is as far as the
rest, the measure cannot tell them apart, and whether to answer is the router's call
(`Routing.answerable`), not the filter's; all are kept, as before there was a filter. The thresholds
are cosines of the sentence embedders m2io uses (MiniLM-class, normalised): general properties of
such models, not of a corpus.
"""

from __future__ import annotations

from services.common.contracts import Passage, RejectedPassage, SourceSection

# Below this cosine a passage is off the question's topic for a MiniLM-class embedder: paraphrases
# score 0.6-0.9, text on the question's topic 0.3-0.6, unrelated text of the same language 0.0-0.2.
# 0.25 leaves a margin above the unrelated band. Without a full-text match too, the passage goes.
MIN_DENSE = 0.25
# Below this cosine even a full-text match does not keep a passage: the question's terms are OR-ed,
# so one shared common word ("make", "set") is a match; at a cosine this low (the unrelated band's
# middle) that word is not the question's subject.
MIN_DENSE_WITH_TEXT = 0.1


def section_spans(section: SourceSection | None) -> dict[int, tuple[int, int]]:
    """Per document, the first and last unit position the answer section holds."""
    spans: dict[int, tuple[int, int]] = {}
    for unit in section.units if section else []:
        if unit.source is None:
            continue
        low, high = spans.get(unit.source.document_id, (unit.source.position, unit.source.position))
        spans[unit.source.document_id] = (min(low, unit.source.position), max(high, unit.source.position))
    return spans


def in_answer_section(passage: Passage, section: SourceSection | None, spans: dict[int, tuple[int, int]]) -> bool:
    """Whether the passage and the answer's section share text. A passage whose unit span is unknown
    (indexed before spans were kept), or a section without units of known place, counts as inside
    when it is of the section's document: it cannot be told apart, so it is kept. The section's
    heading stands one unit before its first unit of text, so a passage that ends on it counts too."""
    if section is None:
        return False
    span = spans.get(passage.document_id)
    if passage.first_unit is None or passage.last_unit is None or (span is None and not spans):
        return passage.document_id == section.document_id  # nothing finer to compare
    if span is None:
        return False
    low, high = span
    return passage.first_unit <= high and passage.last_unit >= low - 1


def rejection_reason(passage: Passage, min_dense: float = MIN_DENSE, min_dense_with_text: float = MIN_DENSE_WITH_TEXT):
    """Why the passage does not answer the question, or None when it may.

    >>> p = Passage(chunk_id=1, document_id=1, doc_key="a.md", heading=None, text="x", score=0.01, dense=0.12)
    >>> rejection_reason(p)
    'cosine 0.12 to the question, below 0.25, and no full-text match'
    >>> rejection_reason(p.model_copy(update={"text_rank": 3, "text_score": 0.1})) is None
    True
    >>> rejection_reason(p.model_copy(update={"dense": 0.05, "text_rank": 9, "text_score": 0.1}))
    'cosine 0.05 to the question, below 0.10: its full-text match (rank 9) is on a word or two, not its subject'
    """
    if passage.dense is None:
        return None  # no vector to judge by: the search's rank stands
    if passage.text_rank is None and passage.dense < min_dense:
        return f"cosine {passage.dense:.2f} to the question, below {min_dense:.2f}, and no full-text match"
    if passage.dense < min_dense_with_text:
        return (
            f"cosine {passage.dense:.2f} to the question, below {min_dense_with_text:.2f}: its full-text match "
            f"(rank {passage.text_rank}) is on a word or two, not its subject"
        )
    return None


def filter_passages(
    passages: list[Passage],
    sections: list[SourceSection] | None = None,
    min_dense: float = MIN_DENSE,
    min_dense_with_text: float = MIN_DENSE_WITH_TEXT,
) -> tuple[list[Passage], list[RejectedPassage]]:
    """The passages that may answer the question (in their order) and those dropped, with why. The
    first passage and the passages of the answer's section (`sections[0]`) are always kept, and all of
    them when none reaches `min_dense` (a question off the collection's topics)."""
    if not any(p.dense is not None and p.dense >= min_dense for p in passages):
        return list(passages), []
    section = sections[0] if sections else None
    spans = section_spans(section)
    kept: list[Passage] = []
    rejected: list[RejectedPassage] = []
    for index, passage in enumerate(passages):
        reason = None
        if index > 0 and not in_answer_section(passage, section, spans):
            reason = rejection_reason(passage, min_dense, min_dense_with_text)
        if reason is None:
            kept.append(passage)
        else:
            rejected.append(
                RejectedPassage(
                    chunk_id=passage.chunk_id,
                    doc_key=passage.doc_key,
                    heading=passage.heading,
                    dense=passage.dense,
                    text_rank=passage.text_rank,
                    reason=reason,
                )
            )
    return kept, rejected
