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
- `llm` / `llm:<model spec>`: a causal LM given the compact prompt of services/inserter/prompt.py (the
  numbered units; each candidate with the evidence above: provenance, best text matches, caption) must
  answer `<answer>[["img2", 5], ...]</answer>`; a strict parser checks it, and anything else falls back
  to `rule` (the plan says so, and keeps the raw output).
- `checkpoint:<name>`: a registered inserter model (the trainer's), with the same prompt.
"""

from __future__ import annotations

import time

from services.common.contracts import AnswerUnit, CandidateImage, InsertionPlan, Placement, RejectedImage
from services.common.embedding import Embedder
from services.common.vectors import QueryVectors, query_vectors
from services.inserter.prompt import (  # noqa: F401 (re-exported)
    PlanFormatError,
    build_prompt,
    parse_plan,
    plan_messages,
    plan_token_budget,
)
from services.inserter.rule import (  # noqa: F401 (re-exported: the backends' one entry point)
    MATCH_MIN,
    STRONG_MATCH,
    provenance_rule_plan,
    rule_plan,
    same_place_plan,
    source_plan,
)

# The inserter backends a job may name (`JobConfig.inserter`): `rule`, `llm[:model spec]`, `checkpoint:<name>`.
BACKENDS = ("rule", "llm", "checkpoint")


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

    raw = None
    try:
        model = chat_model or inserter_chat_model(backend)
        budget = plan_token_budget(len(candidates))
        prompt = build_prompt(units, candidates, vectors)
        # the rule's plan as the draft: a model that keeps it answers in about one forward pass
        result = model.chat(prompt.messages, max_new_tokens=budget, draft=prompt.rule_reply)
        raw = result.text
        placements = parse_plan(raw, units, prompt.candidates)
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
