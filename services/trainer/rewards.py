"""GRPO rewards for the image inserter, as plain functions in TRL's idiom: `f(completions, **kwargs) -> list[float]`.

TRL calls each function with the sampled completions and, as keyword arguments, the dataset's columns for the
same rows. Our training examples (services/trainer/data.py) carry:
  - `unit_count`: how many numbered sentences the prompt shows,
  - `candidate_names`: the source names of the candidate images (gold ones and distractors),
  - `gold`: the gold placements, `[{"image": name, "after": sentence}]`.

The components follow M2IO-R1 (arXiv 2508.06328): a format reward, and an image reward mixing recall and
position with alpha = 0.8 (trainer config `reward_weights`). Recall alone is gamed by placing every
candidate (seen on a small run: every completion converged to "all images"), so a precision term makes
each wrong pick cost. A completion that does not parse gets 0 from every component.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.contracts import Placement
from services.inserter.prompt import PlanFormatError, format_plan, parse_plan_names

# The paper's weighting of recall against position inside the image reward.
ALPHA = 0.8


def plan_text(names: Sequence[str], *placements: tuple[str, int]) -> str:
    """A well-formed plan placing `(image, after)` pairs, the images by their ids among `names` (for examples and
    tests).

    >>> plan_text(["x.jpg", "a.jpg"], ("a.jpg", 1))
    '<answer>[["img2",1]]</answer>'
    """
    return format_plan([Placement(image=image, after=after) for image, after in placements], list(names))


def completion_text(completion: Any) -> str:
    """A completion as TRL hands it: a string (standard format) or a list of messages (conversational)."""
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "").strip()
    return ""


def plan_or_none(completion: Any, unit_count: int, names: Sequence[str]) -> list[Placement] | None:
    try:
        return parse_plan_names(completion_text(completion), int(unit_count), list(names))
    except PlanFormatError:
        return None


def _plans(completions, unit_count, candidate_names):
    return [plan_or_none(c, n, names) for c, n, names in zip(completions, unit_count, candidate_names, strict=True)]


def _gold_positions(gold: Any) -> dict[str, int]:
    return {item["image"]: int(item["after"]) for item in gold or []}


def format_reward(completions, unit_count, candidate_names, **kwargs) -> list[float]:
    """1.0 when the completion is a valid plan for its prompt (the inserter's strict parser), else 0.0.

    >>> ok = '<answer>[["img1",1]]</answer>'
    >>> format_reward([ok, "a.jpg after 1", '<answer>[["img2",1]]</answer>'],
    ...               unit_count=[2, 2, 2], candidate_names=[["a.jpg"]] * 3)
    [1.0, 0.0, 0.0]
    """
    return [0.0 if plan is None else 1.0 for plan in _plans(completions, unit_count, candidate_names)]


def recall_reward(completions, unit_count, candidate_names, gold, **kwargs) -> list[float]:
    """Share of the gold images the plan picks (anywhere).

    >>> gold = [[{"image": "a.jpg", "after": 1}, {"image": "b.jpg", "after": 2}]] * 3
    >>> names = [["a.jpg", "b.jpg", "x.jpg"]] * 3
    >>> recall_reward([plan_text(names[0], ("a.jpg", 2)), plan_text(names[0]), "no plan"], [2] * 3, names, gold)
    [0.5, 0.0, 0.0]
    """
    rewards = []
    for plan, wanted in zip(_plans(completions, unit_count, candidate_names), gold, strict=True):
        positions = _gold_positions(wanted)
        if plan is None or not positions:
            rewards.append(0.0)
            continue
        rewards.append(sum(1 for p in plan if p.image in positions) / len(positions))
    return rewards


def position_reward(completions, unit_count, candidate_names, gold, **kwargs) -> list[float]:
    """Of the gold images the plan picks, the share placed after exactly their gold sentence (0.0 if it picks none:
    a plan earns nothing for placing images it did not choose).

    >>> gold = [[{"image": "a.jpg", "after": 1}, {"image": "b.jpg", "after": 2}]] * 2
    >>> names = [["a.jpg", "b.jpg"]] * 2
    >>> position_reward([plan_text(names[0], ("a.jpg", 1), ("b.jpg", 1)), plan_text(names[0])], [2, 2], names, gold)
    [0.5, 0.0]
    """
    rewards = []
    for plan, wanted in zip(_plans(completions, unit_count, candidate_names), gold, strict=True):
        positions = _gold_positions(wanted)
        picked = [p for p in plan or [] if p.image in positions]
        rewards.append(sum(1 for p in picked if positions[p.image] == p.after) / len(picked) if picked else 0.0)
    return rewards


def precision_reward(completions, unit_count, candidate_names, gold, **kwargs) -> list[float]:
    """Share of the plan's images that are gold images. Placing every candidate (1:1 distractors) earns 0.5 here,
    the exact gold set 1.0; an empty plan 0.0 when there are gold images, 1.0 when there are none.

    >>> gold = [[{"image": "a.jpg", "after": 1}]] * 3
    >>> names = [["a.jpg", "x.jpg"]] * 3
    >>> precision_reward([plan_text(names[0], ("a.jpg", 1), ("x.jpg", 2)), plan_text(names[0], ("a.jpg", 2)),
    ...                   plan_text(names[0])],
    ...                  [2] * 3, names, gold)
    [0.5, 1.0, 0.0]
    """
    rewards = []
    for plan, wanted in zip(_plans(completions, unit_count, candidate_names), gold, strict=True):
        positions = _gold_positions(wanted)
        if plan is None:
            rewards.append(0.0)
        elif not plan:
            rewards.append(0.0 if positions else 1.0)
        else:
            rewards.append(sum(1 for p in plan if p.image in positions) / len(plan))
    return rewards


# In the order of `TrainConfig.reward_weights`: format 1, recall alpha, position 1 - alpha, precision 1.
REWARD_FUNCTIONS = (format_reward, recall_reward, position_reward, precision_reward)
DEFAULT_REWARD_WEIGHTS = (1.0, ALPHA, 1.0 - ALPHA, 1.0)


def total_reward(completions, unit_count, candidate_names, gold, weights: Sequence[float] = DEFAULT_REWARD_WEIGHTS):
    """The weighted sum GRPO optimises (TRL computes the same from the components and `reward_weights`).

    With one gold image and one distractor, the exact plan beats "every image", which beats nothing:

    >>> names, gold = [["a.jpg", "x.jpg"]], [[{"image": "a.jpg", "after": 1}]]
    >>> exact, nothing = plan_text(names[0], ("a.jpg", 1)), plan_text(names[0])
    >>> everything = plan_text(names[0], ("a.jpg", 1), ("x.jpg", 2))
    >>> [round(total_reward([c], [2], names, gold)[0], 3) for c in (exact, everything, nothing)]
    [3.0, 2.5, 1.0]
    """
    columns = {"unit_count": unit_count, "candidate_names": candidate_names, "gold": gold}
    parts = [function(completions, **columns) for function in REWARD_FUNCTIONS]
    return [sum(w * part[i] for w, part in zip(weights, parts, strict=True)) for i in range(len(completions))]
