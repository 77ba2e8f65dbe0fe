"""The image inserter: which candidate images illustrate the answer, and after which unit each goes.

Backends:
- `rule`: first provenance, then text. An image that stood among the answer's source units goes back
  exactly where it stood (after the unit it followed, or before the unit it preceded: slot 0 for a
  section's or document's lead image); no embedding is needed. Images of the answer's own documents
  that stood elsewhere stay out (they illustrate other sections). What is left — images of other
  documents, and every image when the units have no provenance (an LM wrote them) — is matched by
  text, images of other documents only on strong evidence (`STRONG_MATCH`).
  The text match: each candidate is described by its caption and
  the text that stood around it in its document; an image belongs after the answer unit that
  matches the text it followed (or before the unit that matches the text that followed it), or a
  unit that matches its caption. Thresholds keep weak matches out; at most one image per slot,
  no image twice, and images of one document keep their document order.
- `llm` / `llm:<model spec>`: a causal LM given the numbered units and described candidates must
  answer `<think>...</think><answer>[{"image": "<source name>", "after": <n>}]</answer>`; a strict
  parser checks it, and anything else falls back to `rule` (the plan says so).
- `checkpoint:<name>`: a registered inserter model (the trainer's), with the `llm` prompt.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np

from services.common.contracts import AnswerUnit, CandidateImage, InsertionPlan, Placement, RejectedImage
from services.common.embedding import Embedder
from services.common.vectors import QueryVectors, candidate_texts, query_vectors

# Cosine threshold for all-MiniLM-L6-v2, swept on the manual corpus with gold answer text
# (0.62 -> F1 0.76, 0.70 -> 0.85, 0.80 -> 0.90, 0.85 -> 0.88; bench/README.md): below it a unit is
# not the text the image stood next to.
# The inserter backends a job may name (`JobConfig.inserter`): `rule`, `llm[:model spec]`, `checkpoint:<name>`.
BACKENDS = ("rule", "llm", "checkpoint")
MATCH_MIN = 0.8
# An image of another document than the answer's source goes in only when its own context is this
# close to a unit (near the same sentence): the answer's source already brought its own images.
STRONG_MATCH = 0.92
CAPTION_WEIGHT = 0.85  # a caption match is weaker evidence than matching the image's own context
MAX_NEW_TOKENS = 256

PLAN_PATTERN = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


class PlanFormatError(ValueError):
    """An LM's output that is not a valid plan for these units and candidates."""


def rule_plan(
    units: list[AnswerUnit],
    candidates: list[CandidateImage],
    vectors: QueryVectors | Embedder,
    match_min: float = MATCH_MIN,
    why_not: dict[str, str] | None = None,
) -> list[Placement]:
    """Images placed by text: the unit vectors (stored for source units, embedded for an LM's) against
    each candidate's stored caption / context / image-text vectors. `why_not`, when given, gets the
    reason of each candidate left out."""
    if not units or not candidates:
        return []
    vectors = query_vectors(vectors)
    # the texts the stored vectors were made from: the evidence that exists is the evidence compared
    texts = [candidate_texts(c) for c in candidates]
    befores, afters = [t[0] for t in texts], [t[1] for t in texts]
    captions, image_texts = [t[2] for t in texts], [t[3] for t in texts]
    unit_v = vectors.of_units(units)
    stored = vectors.of_images(candidates)
    before_v, after_v, caption_v, image_text_v = stored.before, stored.after, stored.caption, stored.image_text
    n, m = len(units), len(candidates)
    # score[j, slot]: image j placed after unit `slot` (0 = before the first unit)
    score = np.full((m, n + 1), -1.0)
    why: dict[tuple[int, int], tuple[str, float]] = {}  # the winning evidence and its cosine
    follows = before_v @ unit_v.T  # image j followed unit i in its document
    precedes = after_v @ unit_v.T  # image j preceded unit i in its document
    by_caption = caption_v @ unit_v.T
    by_image_text = image_text_v @ unit_v.T
    for j in range(m):
        has_before, has_after = bool(befores[j]), bool(afters[j])
        has_caption, has_image_text = bool(captions[j].strip()), bool(image_texts[j].strip())
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
    slot_of: dict[tuple[int, int], int] = {}
    for index, unit in enumerate(units, 1):
        if unit.source is not None:
            slot_of.setdefault((unit.source.document_id, unit.source.position), index)
    placed: list[tuple[int, int, int, str]] = []
    for candidate in candidates:
        if candidate.document_id is None or candidate.position is None:
            continue
        key = (candidate.document_id, candidate.position)
        if key in slot_of:
            slot = slot_of[key]
        elif (candidate.document_id, candidate.position + 1) in slot_of:
            slot = slot_of[(candidate.document_id, candidate.position + 1)] - 1
        else:
            continue
        placed.append((slot, candidate.position, candidate.image_id, candidate.source_name))
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
) -> list[Placement]:
    """The `rule` backend: provenance first, then text matching for what provenance cannot place.
    `why_not`, when given, gets the reason of each candidate left out."""
    why_not = {} if why_not is None else why_not
    sourced = source_plan(units, candidates)
    source_documents = {unit.source.document_id for unit in units if unit.source is not None}
    if not source_documents:
        return rule_plan(units, candidates, vectors, why_not=why_not)
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


def numbered(units: list[AnswerUnit]) -> str:
    return "\n".join(f"{i}. {unit.text}" for i, unit in enumerate(units, 1))


def describe(candidate: CandidateImage) -> str:
    context = " ".join(filter(None, [candidate.context_before, candidate.context_after]))
    return (
        f'- "{candidate.source_name}": {candidate.caption or "(no caption)"}'
        + (f" | around it: {context[:240]}" if context else "")
        + (f" | text in it: {candidate.image_text[:240]}" if candidate.image_text else "")
    )


def plan_messages(units: list[AnswerUnit], candidates: list[CandidateImage]) -> list[dict[str, str]]:
    return [
        {
            "role": "system",
            "content": (
                "You place images into an answer. Choose only images that illustrate a sentence, and the sentence "
                "each one should follow (0 = before the first sentence). Reply exactly in the form "
                '<think>short reasoning</think><answer>[{"image": "<image name>", "after": <sentence number>}]</answer>'
            ),
        },
        {
            "role": "user",
            "content": f"Sentences:\n{numbered(units)}\n\nCandidate images:\n"
            + "\n".join(describe(c) for c in candidates),
        },
    ]


def parse_plan(output: str, units: list[AnswerUnit], candidates: list[CandidateImage]) -> list[Placement]:
    """Strict: the whole output is the format; every image is a candidate, once; every `after` is a
    unit number (0..n). Anything else raises PlanFormatError with the reason."""
    return parse_plan_names(output, len(units), [c.source_name for c in candidates])


def parse_plan_names(output: str, unit_count: int, names: list[str]) -> list[Placement]:
    """`parse_plan` given only the number of units and the candidates' names (what the trainer's rewards know).

    >>> parse_plan_names('<think>ok</think><answer>[{"image": "a.jpg", "after": 2}]</answer>', 3, ["a.jpg"])
    [Placement(image='a.jpg', after=2, evidence='model', similarity=None)]
    >>> parse_plan_names('<answer>[]</answer>', 3, ["a.jpg"])
    Traceback (most recent call last):
    ...
    services.inserter.core.PlanFormatError: output is not <think>...</think><answer>...</answer>
    """
    match = PLAN_PATTERN.fullmatch(output)
    if not match:
        raise PlanFormatError("output is not <think>...</think><answer>...</answer>")
    try:
        items = json.loads(match["answer"])
    except ValueError as error:
        raise PlanFormatError(f"answer is not JSON: {error}") from error
    if not isinstance(items, list):
        raise PlanFormatError("answer is not a JSON list")
    known = set(names)
    placements: list[Placement] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or set(item) != {"image", "after"}:
            raise PlanFormatError(f"entry {item!r} is not {{'image': ..., 'after': ...}}")
        image, after = item["image"], item["after"]
        if not isinstance(image, str) or image not in known:
            raise PlanFormatError(f"{image!r} is not a candidate image")
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= unit_count:
            raise PlanFormatError(f"after={after!r} is not a sentence number 0..{unit_count}")
        if image in seen:
            raise PlanFormatError(f"{image!r} is placed twice")
        seen.add(image)
        placements.append(Placement(image=image, after=after, evidence="model"))
    return sorted(placements, key=lambda p: p.after)


def format_plan(placements: list[Placement], think: str) -> str:
    """The output an LM inserter should write for `placements` (what the trainer's warm-up teaches).

    >>> format_plan([Placement(image="a.jpg", after=2)], "a.jpg shows step 2")
    '<think>a.jpg shows step 2</think><answer>[{"image": "a.jpg", "after": 2}]</answer>'
    """
    plan = json.dumps([{"image": p.image, "after": p.after} for p in placements], ensure_ascii=False)
    return f"<think>{think}</think><answer>{plan}</answer>"


def insert(
    units: list[AnswerUnit],
    candidates: list[CandidateImage],
    backend: str,
    vectors: QueryVectors | Embedder | None,
    chat_model=None,
) -> InsertionPlan:
    """The insertion plan for an answer. `vectors` gives the stored vectors (an Embedder: embed
    everything now); `chat_model` overrides the model an LM backend would load."""
    started = time.perf_counter()
    kind = backend.split(":", 1)[0]
    vectors = query_vectors(vectors)
    why_not: dict[str, str] = {}
    if kind == "rule" or not units or not candidates:
        placements = provenance_rule_plan(units, candidates, vectors, why_not) if kind == "rule" else []
        if not units:
            why_not = dict.fromkeys((c.source_name for c in candidates), "the answer has no sentences to place it by")
        return InsertionPlan(
            placements=placements,
            rejected=rejected_images(candidates, placements, why_not),
            backend=backend,
            seconds=round(time.perf_counter() - started, 4),
            embedded=vectors.embedded,
        )
    if kind not in ("llm", "checkpoint"):
        raise ValueError(f"unknown inserter backend {backend!r} (rule, llm[:model spec], checkpoint:<name>)")
    from services.common.llm import LLMError

    model = chat_model or inserter_chat_model(backend)
    raw = None
    try:
        result = model.chat(plan_messages(units, candidates), max_new_tokens=MAX_NEW_TOKENS)
        raw = result.text
        placements = parse_plan(raw, units, candidates)
        fallback = None
        why_not = dict.fromkeys((c.source_name for c in candidates), "the model's plan leaves it out")
    except (PlanFormatError, LLMError) as error:
        placements = provenance_rule_plan(units, candidates, vectors, why_not)
        fallback = f"{type(error).__name__}: {error}"
    return InsertionPlan(
        placements=placements,
        rejected=rejected_images(candidates, placements, why_not),
        backend=backend,
        seconds=round(time.perf_counter() - started, 4),
        fallback_reason=fallback,
        raw_output=raw,
        embedded=vectors.embedded,
    )


def rejected_images(
    candidates: list[CandidateImage], placements: list[Placement], why_not: dict[str, str]
) -> list[RejectedImage]:
    """Every candidate the plan does not place (once per source name, in the candidates' order), with why."""
    placed = {placement.image for placement in placements}
    rejected: dict[str, RejectedImage] = {}
    for candidate in candidates:
        name = candidate.source_name
        if name not in placed and name not in rejected:
            rejected[name] = RejectedImage(image=name, reason=why_not.get(name, "not placed (no reason recorded)"))
    return list(rejected.values())


def inserter_chat_model(backend: str):
    from services.common.llm import get_chat_model

    kind, _, spec = backend.partition(":")
    if kind == "llm":
        return get_chat_model(spec or "local")
    from services.inserter.registry import load_registered_model

    return load_registered_model(spec)
