"""The `rule` inserter backend: provenance first, then text (see services/inserter/core.py's docstring). Its plan is
also the proposal the learned inserter's prompt shows (services/inserter/prompt.py), so it lives apart from both."""

from __future__ import annotations

import numpy as np

from services.common.contracts import AnswerUnit, CandidateImage, Placement
from services.common.embedding import Embedder
from services.common.vectors import QueryVectors, candidate_texts, query_vectors
from services.inserter.scores import SlotScores, slot_scores, source_slots

# Cosine threshold for all-MiniLM-L6-v2, swept on the manual corpus with gold answer text
# (0.62 -> F1 0.76, 0.70 -> 0.85, 0.80 -> 0.90, 0.85 -> 0.88; bench/README.md): below it a unit is
# not the text the image stood next to.
MATCH_MIN = 0.8
# An image of another document than the answer's source goes in only when its own context is this
# close to a unit (near the same sentence): the answer's source already brought its own images.
STRONG_MATCH = 0.92


def rule_plan(
    units: list[AnswerUnit],
    candidates: list[CandidateImage],
    vectors: QueryVectors | Embedder,
    match_min: float = MATCH_MIN,
    why_not: dict[str, str] | None = None,
    scored: SlotScores | None = None,
) -> list[Placement]:
    """Images placed by text: the unit vectors (stored for source units, embedded for an LM's) against
    each candidate's stored caption / context / image-text vectors. `why_not`, when given, gets the
    reason of each candidate left out; `scored`, when given, is `slot_scores` already computed for these
    units and candidates (the learned inserter's prompt computes them for its own evidence)."""
    if not units or not candidates:
        return []
    scored = scored or slot_scores(units, candidates, vectors)
    score, why = scored.score, scored.why
    n = len(units)
    # Greedy: the strongest (image, slot) pairs first, under the plan's constraints.
    placements: dict[str, int] = {}
    evidence_of: dict[str, tuple[str, float]] = {}
    used_slots: set[int] = set()
    for flat in np.argsort(-score, axis=None):
        j, slot = divmod(int(flat), n + 1)
        if score[j, slot] < match_min:
            break
        name = candidates[j].source_name
        if name in placements or slot in used_slots:
            continue
        if not keeps_document_order(candidates, placements, j, slot):
            continue
        placements[name] = slot
        evidence_of[name] = why[j, slot]
        used_slots.add(slot)
    if why_not is not None:
        for j, candidate in enumerate(candidates):
            if candidate.source_name not in placements:
                why_not[candidate.source_name] = text_match_reason(score[j], why, j, match_min)
    return [
        Placement(image=name, after=slot, evidence=evidence_of[name][0], similarity=round(evidence_of[name][1], 4))
        for name, slot in sorted(placements.items(), key=lambda kv: kv[1])
    ]


def text_match_reason(scores: np.ndarray, why: dict[tuple[int, int], tuple[str, float]], j: int, match_min: float):
    """Why candidate j, scored `scores` per slot by `rule_plan`, was not placed."""
    slot = int(np.argmax(scores))
    if scores[slot] < 0:
        return "no caption, context or text in it to match the answer by"
    kind, _ = why[j, slot]
    if scores[slot] < match_min:
        return f"best {kind} match {scores[slot]:.2f} (after sentence {slot}) below {match_min:.2f}"
    return (
        f"its best places ({kind} match {scores[slot]:.2f}, after sentence {slot}) went to other images "
        "or would break its document's image order"
    )


def source_plan(units: list[AnswerUnit], candidates: list[CandidateImage]) -> list[Placement]:
    """Images placed by provenance: a candidate at position p of document d goes after the answer unit
    that was unit p of d, or before the one that was unit p + 1 (an image right after a heading the
    answer leaves out: slot 0 when it leads the answer). Images that share a slot keep their order."""
    placed = [
        (slot, candidate.position, candidate.image_id, candidate.source_name)
        for candidate, slot in zip(candidates, source_slots(units, candidates), strict=True)
        if slot is not None
    ]
    seen: set[str] = set()
    placements = []
    for slot, _, _, name in sorted(placed):
        if name not in seen:
            seen.add(name)
            placements.append(Placement(image=name, after=slot, evidence="source"))
    return placements


def provenance_rule_plan(
    units: list[AnswerUnit],
    candidates: list[CandidateImage],
    vectors: QueryVectors | Embedder | None,
    why_not: dict[str, str] | None = None,
    scored: SlotScores | None = None,
) -> list[Placement]:
    """The `rule` backend: provenance first, then text matching for what provenance cannot place.
    `why_not`, when given, gets the reason of each candidate left out; `scored` as in `rule_plan`."""
    why_not = {} if why_not is None else why_not
    sourced = source_plan(units, candidates)
    source_documents = {unit.source.document_id for unit in units if unit.source is not None}
    if not source_documents:
        return rule_plan(units, candidates, vectors, why_not=why_not, scored=scored)
    placed = {placement.image for placement in sourced}
    others = [c for c in candidates if c.source_name not in placed and c.document_id not in source_documents]
    for candidate in candidates:
        if candidate.source_name in placed or candidate.document_id not in source_documents:
            continue
        if candidate.position is None:
            why_not[candidate.source_name] = (
                f"of the answer's own document ({candidate.doc_key}), but its place there is unknown "
                "(indexed before places were kept)"
            )
        else:
            why_not[candidate.source_name] = (
                f"stood elsewhere in the answer's own document (unit {candidate.position} of {candidate.doc_key}), "
                "outside the answer"
            )
    taken = {placement.after for placement in sourced}
    matched = []
    for placement in same_place_plan(units, others, vectors, why_not):
        if placement.after in taken:
            why_not[placement.image] = (
                f"its place (after sentence {placement.after}, context match {placement.similarity:.2f}) "
                "holds an image of the answer's own source"
            )
        else:
            matched.append(placement)
    return sorted(sourced + matched, key=lambda placement: placement.after)


def same_place_plan(
    units: list[AnswerUnit],
    candidates: list[CandidateImage],
    vectors: QueryVectors | Embedder | None,
    why_not: dict[str, str] | None = None,
) -> list[Placement]:
    """Images of other documents, each only where it stood between the same two sentences: the text
    before it matches one answer unit and the text after it the next (both >= STRONG_MATCH), as where
    a page repeats another's paragraph with its screenshot. Evidence "context". `why_not`, when
    given, gets the reason of each candidate left out."""
    why_not = {} if why_not is None else why_not
    outside = "not in the answer's documents"
    for candidate in candidates:  # each is overwritten below when it came closer
        why_not[candidate.source_name] = f"{outside}, and no text stood on both sides of it to match the answer by"
    if not units or not candidates:
        return []
    texts = [candidate_texts(c) for c in candidates]
    befores, afters = [t[0] for t in texts], [t[1] for t in texts]
    vectors = query_vectors(vectors)
    # Units an extractive answer adds of its own (the line saying where a cut answer continues) stood
    # nowhere: they keep a zero vector, and no image goes next to them by context.
    sourced = [index for index, unit in enumerate(units) if unit.source is not None]
    pairs = [j for j in range(len(candidates)) if befores[j] and afters[j]]
    if not sourced or not pairs:
        if not sourced:
            for j in pairs:
                why_not[candidates[j].source_name] = f"{outside}, and the answer's sentences stood nowhere to match"
        return []
    stored_units = vectors.of_units([units[index] for index in sourced])
    unit_v = np.zeros((len(units), stored_units.shape[1]), dtype=np.float32)
    unit_v[sourced] = stored_units
    stored = vectors.of_images([candidates[j] for j in pairs])
    placements: list[Placement] = []
    used: set[int] = set()
    for row, j in enumerate(pairs):
        candidate = candidates[j]
        follows, precedes = unit_v @ stored.before[row], unit_v @ stored.after[row]
        # slot k: after unit k (1..n-1), so unit k matches the text before and unit k+1 the text after
        both = np.minimum(follows[:-1], precedes[1:])
        if not both.size:
            why_not[candidate.source_name] = f"{outside}, and the answer has no two sentences to place it between"
            continue
        slot = int(np.argmax(both)) + 1
        if both[slot - 1] < STRONG_MATCH:
            why_not[candidate.source_name] = (
                f"{outside}; the text around it matches two answer sentences in a row at best "
                f"{both[slot - 1]:.2f} (after sentence {slot}), below {STRONG_MATCH:.2f}"
            )
        elif slot in used:
            why_not[candidate.source_name] = f"{outside}; its place (after sentence {slot}) went to another image"
        else:
            used.add(slot)
            why_not.pop(candidate.source_name, None)
            placements.append(
                Placement(
                    image=candidate.source_name,
                    after=slot,
                    evidence="context",
                    similarity=round(float(both[slot - 1]), 4),
                )
            )
    return placements


def keeps_document_order(candidates: list[CandidateImage], placed: dict[str, int], j: int, slot: int) -> bool:
    """Images of one document must appear in the order they had there (by context position)."""
    by_name = {c.source_name: c for c in candidates}
    mine = candidates[j]
    for name, other_slot in placed.items():
        other = by_name[name]
        if other.doc_key != mine.doc_key or other.image_id == mine.image_id:
            continue
        # image ids are assigned in document order at ingest
        if (other.image_id < mine.image_id) != (other_slot < slot):
            return False
    return True
