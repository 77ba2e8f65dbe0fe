"""Scoring an inserter on held-out training examples: a trained model's own plans (no rule fallback) or the
`rule` backend's, with MRAMG's metrics; the trainer scores each phase with it, and so does the benchmark.

A model is given each example's stored prompt: the one the trainer built with the serving prompt builder
(services/inserter/prompt.py), so it is scored on exactly what serving would show it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from services.common.contracts import AnswerUnit, CandidateImage, UnitSource
from services.common.metrics import aggregate, image_precision_recall_f1, ordering_score, position_accuracy
from services.inserter.prompt import PlanFormatError, parse_plan_names, plan_token_budget, rule_reply
from services.trainer.data import TrainingExample


def example_inputs(example: TrainingExample) -> tuple[list[AnswerUnit], list[CandidateImage]]:
    """The answer units (with their provenance where the example has it) and the candidates, as served."""
    sources = example.unit_sources or [None] * len(example.units)
    units = [
        AnswerUnit(text=text, source=UnitSource.model_validate(source) if source else None)
        for text, source in zip(example.units, sources, strict=True)
    ]
    return units, [CandidateImage.model_validate(c) for c in example.candidates]


def score_plan(placements, example: TrainingExample) -> dict[str, float | None]:
    """MRAMG metrics of one plan against the example's gold (images in plan order). An example without gold images
    scores 1.0 when the plan places nothing (and 0.0 otherwise) rather than being undefined."""
    predicted = [p.image for p in sorted(placements, key=lambda p: p.after)]
    gold = [g["image"] for g in example.gold]
    if not gold:
        empty = 1.0 if not predicted else 0.0
        return {
            "image_precision": empty,
            "image_recall": empty,
            "image_f1": empty,
            "ordering": empty,
            "position_accuracy": empty,
        }
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


def evaluate_model(
    source: str, examples: Sequence[TrainingExample], max_new_tokens: int | None = None, model=None
) -> dict[str, Any]:
    """A model's own plans (greedy) on `examples`: an unparseable plan counts as no images (no rule fallback:
    this scores the model, not the serving path), plus the share that parsed and the time per plan.
    `max_new_tokens`: serving's budget for each example's candidates unless given."""
    from services.common.llm import LocalChatModel

    model = model or LocalChatModel(source)
    rows = []
    parsed = 0
    seconds = 0.0
    for example in examples:
        budget = max_new_tokens or plan_token_budget(len(example.candidate_names))
        result = model.chat(example.prompt, max_new_tokens=budget, draft=rule_reply(example.prompt))
        seconds += result.seconds
        try:
            placements = parse_plan_names(result.text, example.unit_count, example.candidate_names)
            parsed += 1
        except PlanFormatError:
            placements = []
        rows.append(score_plan(placements, example))
    metrics = aggregate(rows)
    metrics["parse_rate"] = parsed / len(examples) if examples else None
    metrics["seconds_per_plan"] = seconds / len(examples) if examples else None
    return metrics


def evaluate_rule(examples: Sequence[TrainingExample]) -> dict[str, Any]:
    """The `rule` backend as served (provenance first where the units have it, then text matching)."""
    from services.common.embedding import get_embedder
    from services.inserter.core import insert

    embedder = get_embedder()
    rows = []
    started = time.perf_counter()
    for example in examples:
        units, candidates = example_inputs(example)
        rows.append(score_plan(insert(units, candidates, "rule", embedder).placements, example))
    metrics = aggregate(rows)
    metrics["parse_rate"] = 1.0 if examples else None
    metrics["seconds_per_plan"] = (time.perf_counter() - started) / len(examples) if examples else None
    return metrics
