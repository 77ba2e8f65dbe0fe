"""The learned inserter's prompt and plan format: one builder, used by training (services/trainer/data.py) and
serving (services/inserter/core.insert) alike, so a model is trained on exactly what it is served.

The prompt is compact (~250-350 tokens with 12 candidates for SmolLM2's tokenizer) because every prompt token costs
in GRPO's sampling and in serving on a CPU:
  - the answer's units, numbered, each cut to its first words;
  - each candidate under a short id (`img1`...) in the prompt's order (`prompt_order`: the `rule` backend's picks
    first, in its plan's order, then the rest in retrieval order), with the evidence the training-free inserter
    computes (services/inserter/scores.py, services/inserter/rule.py): `doc<k>` (its document, by first
    appearance), `rule <n>` where the `rule` backend, as served (provenance first, then text), would place it,
    `at <n>` when the answer's unit n came from the place the image stood in its own document (provenance),
    `away` when it stood elsewhere in a document the answer quotes, `first` when it opens its document,
    `fits <n>:<s>` its best matching slots by caption / context (the rule's score, 0-100), then the first words
    of its caption (the context it stood in is what `fits` scored);
  - `Rule: [["img1",3],["img2",5]]`: the rule's whole plan, written in the answer's own syntax.
The model starts from the rule's proposal and learns which picks to keep, drop or move and what to add: compact-1
(ids in retrieval order, no proposal) taught SmolLM2-135M a fixed "one image, img1" policy on qgc_manual, and with
the proposal only as `rule N` tags on the candidates' lines (compact-3) it copied the first pick and stopped. A
literal copy of a line is what a small model does well, so the plan is also there as one line (compact-4).
The plan: `<answer>[["img2",5],["img1",0]]</answer>` (the image, and the unit it follows; 0 = before the first),
optionally after a `<think>...</think>`. The parser is strict: anything else is a PlanFormatError, and serving
falls back to `rule`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from services.common.contracts import AnswerUnit, CandidateImage, Placement
from services.common.embedding import Embedder
from services.common.vectors import QueryVectors, query_vectors
from services.inserter.rule import provenance_rule_plan
from services.inserter.scores import slot_scores, source_slots

PROMPT_VERSION = "compact-4"  # recorded with a registered model: a model answers the prompt it was trained on
UNIT_WORDS = 4
CAPTION_WORDS = 3
TOP_FITS = 2  # best-matching slots shown per candidate: the best, and the runner-up when it is close
RUNNER_UP = 0.5  # the runner-up's score at least this (and the best's at least 0)
# A candidate without provenance whose best text match is under this is not listed (its id stays unused): the rule
# places nothing under 0.8, and every listed candidate costs ~20 prompt tokens in training and serving.
SHOW_MIN = 0.5
# New tokens for a plan, from SmolLM2's tokenizer: `<answer>[]</answer>` is 8, each placement (`["img12",199],`)
# at most 9. A fixed cap of 64 cut every plan of 7 images or more, which then fell back to the rule.
PLAN_TAG_TOKENS = 8
TOKENS_PER_PLACEMENT = 9

SYSTEM = (
    "Place images after sentences. at N: stood after sentence N. away: from elsewhere in the doc. "
    "fits N:S: matches sentence N, score S. rule N: the rule's pick. Rule: the rule's plan. "
    'Reply <answer>[["img1",N]]</answer> (N=0: first), or [].'
)

PLAN_PATTERN = re.compile(r"\s*(?:<think>.*?</think>\s*)?<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
IMAGE_ID = re.compile(r"img([1-9][0-9]*)")


class PlanFormatError(ValueError):
    """An LM's output that is not a valid plan for these units and candidates."""


def words(text: str | None, count: int) -> str:
    """The first `count` words of `text` (an ellipsis marks a cut).

    >>> words("Heat the oven to 200C and prepare a tray.", 4)
    'Heat the oven to…'
    >>> words(None, 3)
    ''
    """
    parts = (text or "").split()
    return " ".join(parts[:count]) + ("…" if len(parts) > count else "")


@dataclass
class PlanPrompt:
    """What an LM inserter is given, and how to read its answer: `img<k>` is `candidates[k - 1]`."""

    messages: list[dict[str, str]]
    candidates: list[CandidateImage]  # in the prompt's order (see prompt_order)

    @property
    def rule_reply(self) -> str | None:
        return rule_reply(self.messages)


def prompt_order(proposed: dict[str, int], listed: list[bool], candidates: list[CandidateImage]) -> list[int]:
    """Candidate indexes in the prompt's order: the rule's picks in its plan's order (by slot), then the other
    listed candidates, then the unlisted ones, each in retrieval order. `img1` is then the rule's first pick: the
    commonest plan (the rule's picks, in order) reads `img1`, `img2`... and a small model's prior for `img1`
    works for it instead of against it (with ids in retrieval order, SmolLM2-135M learned to answer `img1`
    whatever the evidence said). Applied to candidates already in this order, it keeps it.

    >>> from services.common.contracts import CandidateImage
    >>> def c(name): return CandidateImage(image_id=1, source_name=name, s3_key="k", caption=None,
    ...     context_before=None, context_after=None, doc_key="d", score=0, reasons=[])
    >>> prompt_order({"b": 4, "c": 1}, [True, True, True, False, True], [c(n) for n in "abcde"])
    [2, 1, 0, 4, 3]
    """

    def key(j: int) -> tuple[int, int, int]:
        slot = proposed.get(candidates[j].source_name)
        if slot is not None:
            return (0, slot, j)
        return (1 if listed[j] else 2, 0, j)

    return sorted(range(len(candidates)), key=key)


def build_prompt(
    units: list[AnswerUnit], candidates: list[CandidateImage], vectors: QueryVectors | Embedder | None
) -> PlanPrompt:
    """The prompt (see the module's docstring) and the candidates in its order. A candidate without provenance,
    rule pick or text match of SHOW_MIN is not listed (its id stays unused)."""
    vectors = query_vectors(vectors)
    scored = slot_scores(units, candidates, vectors)  # once: the `fits` evidence and the rule's plan read it
    scores = scored.score
    slots = source_slots(units, candidates)
    proposal = provenance_rule_plan(units, candidates, vectors, scored=scored)
    proposed = {placement.image: placement.after for placement in proposal}
    listed = [
        candidate.source_name in proposed or slots[j] is not None or scores[j].max() >= SHOW_MIN
        for j, candidate in enumerate(candidates)
    ]
    order = prompt_order(proposed, listed, candidates)
    quoted = {unit.source.document_id for unit in units if unit.source is not None}
    doc_ids: dict[str, int] = {}
    lines = []
    for k, j in enumerate(order, 1):
        candidate = candidates[j]
        doc = doc_ids.setdefault(candidate.doc_key, len(doc_ids) + 1)
        if not listed[j]:
            continue
        parts = [f"img{k} doc{doc}"]
        if candidate.source_name in proposed:
            parts.append(f"rule {proposed[candidate.source_name]}")
        if slots[j] is not None:
            parts.append(f"at {slots[j]}")
        elif candidate.document_id in quoted:
            parts.append("away")
        if candidate.position == 0:
            parts.append("first")
        best_slots = [int(s) for s in np.argsort(-scores[j])[:TOP_FITS]]
        best = [s for rank, s in enumerate(best_slots) if scores[j, s] > (RUNNER_UP if rank else 0)]
        if best:
            parts.append("fits " + " ".join(f"{s}:{round(100 * float(scores[j, s]))}" for s in best))
        caption = words(candidate.caption, CAPTION_WORDS)
        if caption:
            parts.append(f'"{caption}"')
        lines.append(" ".join(parts))
    in_order = [candidates[j] for j in order]
    # the rule's plan in the answer's own syntax: a copy is the default a small model falls back on
    rule_line = (
        format_plan(proposal, [c.source_name for c in in_order]).removeprefix("<answer>").removesuffix("</answer>")
    )
    sentences = "\n".join(f"{i}. {words(unit.text, UNIT_WORDS)}" for i, unit in enumerate(units, 1))
    images = "\n".join(lines) or "(none matches)"
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Sentences:\n{sentences}\nImages:\n{images}\nRule: {rule_line}"},
    ]
    return PlanPrompt(messages=messages, candidates=in_order)


def rule_reply(messages: list[dict[str, str]]) -> str | None:
    """The rule's plan of a prompt (its `Rule:` line) as a reply: what a model that keeps the rule's picks writes,
    and the draft a local model checks in the prompt's own pass (`LocalChatModel.chat(draft=...)`). None when the
    prompt has no such line.

    >>> rule_reply([{"role": "user", "content": 'Sentences:\\n1. Hi\\nImages:\\nimg1 doc1\\nRule: [["img1",1]]'}])
    '<answer>[["img1",1]]</answer>'
    """
    last = messages[-1]["content"].rsplit("\n", 1)[-1] if messages else ""
    return f"<answer>{last.removeprefix('Rule: ')}</answer>" if last.startswith("Rule: ") else None


def plan_messages(
    units: list[AnswerUnit], candidates: list[CandidateImage], vectors: QueryVectors | Embedder | None
) -> list[dict[str, str]]:
    """The chat messages an LM inserter is given (in training and in serving)."""
    return build_prompt(units, candidates, vectors).messages


def plan_token_budget(candidates: int) -> int:
    """New tokens enough for a plan that places each of `candidates` images once (a repeat is refused
    anyway), plus the end of turn. Generation stops at the end of turn, so an unused budget costs nothing.

    >>> plan_token_budget(0), plan_token_budget(6), plan_token_budget(12)
    (10, 64, 118)
    """
    return PLAN_TAG_TOKENS + TOKENS_PER_PLACEMENT * candidates + 2


def format_plan(placements: list[Placement], names: list[str], think: str | None = None) -> str:
    """The output an LM inserter should write for `placements` (what the trainer's warm-up teaches); `names` are the
    candidates' source names in prompt order.

    >>> format_plan([Placement(image="b.jpg", after=2), Placement(image="a.jpg", after=0)], ["a.jpg", "b.jpg"])
    '<answer>[["img2",2],["img1",0]]</answer>'
    """
    index = {}
    for number, name in enumerate(names, 1):
        index.setdefault(name, number)
    plan = json.dumps([[f"img{index[p.image]}", p.after] for p in placements], separators=(",", ":"))
    return (f"<think>{think}</think>" if think else "") + f"<answer>{plan}</answer>"


def parse_plan_names(output: str, unit_count: int, names: list[str]) -> list[Placement]:
    """Strict: the whole output is the format; every image is a candidate id (`img1`..`img<len(names)>`), placed
    once; every `after` is a unit number (0..unit_count). Anything else raises PlanFormatError with the reason.

    >>> parse_plan_names('<answer>[["img2",2],["img1",0]]</answer>', 3, ["a.jpg", "b.jpg"])
    [Placement(image='a.jpg', after=0, evidence='model', similarity=None), \
Placement(image='b.jpg', after=2, evidence='model', similarity=None)]
    >>> parse_plan_names('<answer>[["img3",1]]</answer>', 3, ["a.jpg", "b.jpg"])
    Traceback (most recent call last):
    ...
    services.inserter.prompt.PlanFormatError: 'img3' is not a candidate (img1..img2)
    """
    match = PLAN_PATTERN.fullmatch(output)
    if not match:
        raise PlanFormatError('output is not <answer>[["img<k>", <sentence>], ...]</answer>')
    try:
        items = json.loads(match["answer"])
    except ValueError as error:
        raise PlanFormatError(f"answer is not JSON: {error}") from error
    if not isinstance(items, list):
        raise PlanFormatError("answer is not a JSON list")
    placements: list[Placement] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, list) or len(item) != 2:
            raise PlanFormatError(f"entry {item!r} is not [image, sentence]")
        image, after = item
        found = IMAGE_ID.fullmatch(image) if isinstance(image, str) else None
        if not found or int(found[1]) > len(names):
            raise PlanFormatError(f"{image!r} is not a candidate (img1..img{len(names)})")
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= unit_count:
            raise PlanFormatError(f"after={after!r} is not a sentence number 0..{unit_count}")
        name = names[int(found[1]) - 1]
        if name in seen:
            raise PlanFormatError(f"{image!r} ({name}) is placed twice")
        seen.add(name)
        placements.append(Placement(image=name, after=after, evidence="model"))
    return sorted(placements, key=lambda p: p.after)


def parse_plan(output: str, units: list[AnswerUnit], candidates: list[CandidateImage]) -> list[Placement]:
    return parse_plan_names(output, len(units), [c.source_name for c in candidates])
