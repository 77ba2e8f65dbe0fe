"""Scoring an inserter on held-out training examples: a trained model's own plans (no rule fallback) or
the rule's, with MRAMG's metrics; the trainer scores each phase with it, and so does the benchmark."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from services.common.contracts import AnswerUnit, CandidateImage
from services.common.metrics import aggregate, image_precision_recall_f1, ordering_score, position_accuracy
from services.inserter.core import PlanFormatError, parse_plan, plan_messages
from services.trainer.data import TrainingExample


def example_inputs(example: TrainingExample) -> tuple[list[AnswerUnit], list[CandidateImage]]:
    return [AnswerUnit(text=t) for t in example.units], [CandidateImage.model_validate(c) for c in example.candidates]


def score_plan(placements, example: TrainingExample) -> dict[str, float | None]:
    """MRAMG metrics of one plan against the example's gold (images in plan order)."""
    predicted = [p.image for p in sorted(placements, key=lambda p: p.after)]
    gold = [g["image"] for g in example.gold]
    prf = image_precision_recall_f1(predicted, gold)
    return {
        "image_precision": prf.precision,
        "image_recall": prf.recall,
        "image_f1": prf.f1,
        "ordering": ordering_score(predicted, gold),
        "position_accuracy": position_accuracy(
            {p.image: p.after for p in placements}, {g["image"]: g["after"] for g in example.gold}
        ),
    }


def evaluate_model(source: str, examples: Sequence[TrainingExample], max_new_tokens: int = 200) -> dict[str, Any]:
    """A model's own plans (greedy) on `examples`: an unparseable plan counts as no images (no rule fallback:
    this scores the model, not the serving path), plus the share that parsed and the time per plan."""
    from services.common.llm import LocalChatModel

    model = LocalChatModel(source)
    rows = []
    parsed = 0
    seconds = 0.0
    for example in examples:
        units, candidates = example_inputs(example)
        result = model.chat(plan_messages(units, candidates), max_new_tokens=max_new_tokens)
        seconds += result.seconds
        try:
            placements = parse_plan(result.text, units, candidates)
            parsed += 1
        except PlanFormatError:
            placements = []
        rows.append(score_plan(placements, example))
    metrics = aggregate(rows)
    metrics["parse_rate"] = parsed / len(examples) if examples else None
    metrics["seconds_per_plan"] = seconds / len(examples) if examples else None
    return metrics


def evaluate_rule(examples: Sequence[TrainingExample]) -> dict[str, Any]:
    from services.common.embedding import get_embedder
    from services.inserter.core import rule_plan

    embedder = get_embedder()
    rows = []
    started = time.perf_counter()
    for example in examples:
        units, candidates = example_inputs(example)
        rows.append(score_plan(rule_plan(units, candidates, embedder), example))
    metrics = aggregate(rows)
    metrics["parse_rate"] = 1.0 if examples else None
    metrics["seconds_per_plan"] = (time.perf_counter() - started) / len(examples) if examples else None
    return metrics
