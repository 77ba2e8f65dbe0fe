"""An answer's evidence, as the export's JSON, the merger's HTML page and the dashboard show it: the
passages used (rank and scores), the passages the point-wise filter rejected (why), the images placed
(what placed each) and the candidates left out (why), and the routing when the job had several
collections. Plain dicts of JSON values, built from the stage outputs; one builder for every reader."""

from __future__ import annotations

import re
from typing import Any

from services.common.contracts import AnswerUnit, InsertionPlan, Passage, RejectedPassage, Routing

THINK = re.compile(r"<think>(?P<think>.*?)</think>", re.DOTALL)
SENTENCE_CHARS = 300  # of the sentence an image was placed by: enough to recognise it


def model_reason(plan: InsertionPlan) -> str | None:
    """What an LM inserter wrote in its `<think>` (its reason for the whole plan), when it planned.

    >>> model_reason(InsertionPlan(placements=[], backend="llm", raw_output="<think> a shows step 2 </think><answer>"))
    'a shows step 2'
    """
    found = THINK.search(plan.raw_output or "") if plan.fallback_reason is None else None
    return (" ".join(found["think"].split()) or None) if found else None


def placed_sentence(units: list[AnswerUnit], after: int) -> str | None:
    """The answer sentence an image stands after (the first one when it leads the answer).

    >>> placed_sentence([AnswerUnit(text="Mix."), AnswerUnit(text="Fry.")], 0), placed_sentence([], 1)
    ('Mix.', None)
    """
    index = after - 1 if after >= 1 else 0
    return units[index].text[:SENTENCE_CHARS] if 0 <= index < len(units) else None


def passage_record(rank: int, passage: Passage) -> dict[str, Any]:
    return {
        "rank": rank,
        "chunk_id": passage.chunk_id,
        "doc_key": passage.doc_key,
        "heading": passage.heading,
        "dense": passage.dense,
        "full_text": passage.text_score,
        "fused": passage.score,
        "vector_rank": passage.vector_rank,
        "text_rank": passage.text_rank,
    }


def evidence_record(
    passages: list[Passage],
    rejected: list[RejectedPassage],
    units: list[AnswerUnit],
    plan: InsertionPlan | None,
) -> dict[str, Any]:
    """`{"passages", "rejected_passages", "images", "rejected_images"}` of one answer."""
    reason = model_reason(plan) if plan else None
    images = []
    for placement in plan.placements if plan else []:
        images.append(
            {
                "image": placement.image,
                "after": placement.after,
                "placed_by": placement.evidence,
                "similarity": placement.similarity,
                "sentence": placed_sentence(units, placement.after),
                "reason": reason if placement.evidence == "model" else None,
            }
        )
    return {
        "passages": [passage_record(rank, passage) for rank, passage in enumerate(passages, 1)],
        "rejected_passages": [r.model_dump(mode="json") for r in rejected],
        "images": images,
        "rejected_images": [r.model_dump(mode="json") for r in plan.rejected] if plan else [],
    }


def routing_record(routing: Routing) -> dict[str, Any]:
    """`{"chosen": [collection names], "considered": [scores], "steps": [...]}`."""
    return routing.model_dump(mode="json", include={"chosen", "considered", "steps"})
