"""The evidence the training-free inserter weighs, per candidate image and slot, as plain arrays.

`slot_scores` is the text match of `rule` (an image's stored context, caption and image-text vectors against
the answer units); `source_slots` is its provenance (the slot an image had between the answer's own source units).
The `rule` backend decides on them with fixed thresholds; the learned inserter reads them in its prompt
(services/inserter/prompt.py) and decides itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.contracts import AnswerUnit, CandidateImage
from services.common.embedding import Embedder
from services.common.vectors import QueryVectors, candidate_texts, query_vectors

CAPTION_WEIGHT = 0.85  # a caption match is weaker evidence than matching the image's own context


@dataclass
class SlotScores:
    """score[j, slot]: the best weighted evidence that candidate j goes after unit `slot` (0 = before the first),
    -1 where there is none; why[(j, slot)]: that evidence's kind ("context", "caption", "image_text") and cosine."""

    score: np.ndarray
    why: dict[tuple[int, int], tuple[str, float]]


def slot_scores(
    units: list[AnswerUnit], candidates: list[CandidateImage], vectors: QueryVectors | Embedder | None
) -> SlotScores:
    n, m = len(units), len(candidates)
    score = np.full((m, n + 1), -1.0)
    why: dict[tuple[int, int], tuple[str, float]] = {}
    if not n or not m:
        return SlotScores(score, why)
    vectors = query_vectors(vectors)
    # the texts the stored vectors were made from: the evidence that exists is the evidence compared
    texts = [candidate_texts(c) for c in candidates]
    unit_v = vectors.of_units(units)
    stored = vectors.of_images(candidates)
    follows = stored.before @ unit_v.T  # image j followed unit i in its document
    precedes = stored.after @ unit_v.T  # image j preceded unit i in its document
    by_caption = stored.caption @ unit_v.T
    by_image_text = stored.image_text @ unit_v.T
    for j in range(m):
        before, after, caption, image_text = texts[j]
        has_before, has_after = bool(before), bool(after)
        has_caption, has_image_text = bool(caption.strip()), bool(image_text.strip())
        for slot in range(n + 1):
            evidence = []  # (weighted score, kind, cosine)
            if slot >= 1 and has_before:
                evidence.append((follows[j, slot - 1], "context", follows[j, slot - 1]))
            if slot < n and has_after:
                evidence.append((precedes[j, slot], "context", precedes[j, slot]))
            if slot >= 1 and has_caption:
                cosine = by_caption[j, slot - 1]
                evidence.append((cosine * CAPTION_WEIGHT, "caption", cosine))
            if slot >= 1 and has_image_text:
                cosine = by_image_text[j, slot - 1]  # the words inside it say what it shows, as a caption does
                evidence.append((cosine * CAPTION_WEIGHT, "image_text", cosine))
            if evidence:
                best, kind, cosine = max(evidence, key=lambda e: e[0])
                score[j, slot] = best
                why[j, slot] = (kind, float(cosine))
    return SlotScores(score, why)


def source_slots(units: list[AnswerUnit], candidates: list[CandidateImage]) -> list[int | None]:
    """Per candidate, the slot its provenance gives (None when it stood outside the answer's source units): an
    image at position p of document d goes after the answer unit that was unit p of d, or before the one that was
    unit p + 1 (an image right after a heading the answer leaves out: slot 0 when it leads the answer).

    >>> from services.common.contracts import UnitSource
    >>> def unit(p): return AnswerUnit(text="x", source=UnitSource(document_id=1, doc_key="d", position=p))
    >>> def image(p, d=1): return CandidateImage(image_id=p, source_name=f"{p}.jpg", s3_key="k", caption=None,
    ...     context_before=None, context_after=None, doc_key="d", score=0, document_id=d, position=p, reasons=[])
    >>> source_slots([unit(3), unit(4)], [image(3), image(2), image(4), image(9), image(3, d=2)])
    [1, 0, 2, None, None]
    """
    slot_of: dict[tuple[int, int], int] = {}
    for index, unit in enumerate(units, 1):
        if unit.source is not None:
            slot_of.setdefault((unit.source.document_id, unit.source.position), index)
    slots: list[int | None] = []
    for candidate in candidates:
        if candidate.document_id is None or candidate.position is None:
            slots.append(None)
        elif (candidate.document_id, candidate.position) in slot_of:
            slots.append(slot_of[(candidate.document_id, candidate.position)])
        elif (candidate.document_id, candidate.position + 1) in slot_of:
            slots.append(slot_of[(candidate.document_id, candidate.position + 1)] - 1)
        else:
            slots.append(None)
    return slots
