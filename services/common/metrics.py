"""Answer-quality metrics for multimodal answers (text with images placed between its sentences).

Pure functions over plain values: no I/O, no database. They follow the statistical metrics of
MRAMG-Bench (Yu et al., arXiv 2502.04176), as its dataset card defines them
(huggingface.co/datasets/MRAMG/MRAMG-Bench, README "Evaluation Metric"), plus a position metric of
our own and ROUGE-L.

Conventions shared by every function here:

- An **image sequence** is a list of image names in the order the images appear in an answer.
  The gold sequence is the `gold_images` list that goes with a gold answer whose images are
  written as `<PIC>` placeholders (the n-th `<PIC>` stands for `gold_images[n]`).
- An image's **position** is a sentence number as `services.common.text` counts units:
  `position = k` means "right after the k-th unit", 0 means "before the first unit". Predicted and
  gold positions number the units of *different* texts; :func:`aligned_position_accuracy` aligns
  the predicted units to the gold units before it compares them.
- Scores are floats in [0, 1], higher is better. `None` means "not defined for this answer"
  and is skipped by :func:`aggregate`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from services.common.text import ImageRef, parse_markdown

PIC_MARKER = "<PIC>"

# MRAMG's ordering-score weights (dataset card: p1 insertion, p2 deletion, p3 substitution, p the cap).
MISSING_IMAGE_COST = 3.0  # a gold image the prediction lacks must be inserted into it
EXTRA_IMAGE_COST = 2.0  # an image the prediction has and the gold answer does not must be deleted
SUBSTITUTION_COST = 1.0  # a predicted image standing where a different gold image stands
ORDERING_CAP = 3.0

WORD = re.compile(r"\w+")
# a list item's marker at the start of a unit: "5. ", "5) ", "(5) ", "a. ", "- ", "* ", "+ ", "• "
LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|\(?\d{1,3}[.)]|\(?[A-Za-z][.)])\s+")
# Two units align when SequenceMatcher's ratio over their word lists, 2·M / (|a| + |b|) with M the
# words matched in order, is at least this. 0.6 keeps near copies: one word changed in a five-word
# sentence scores 0.8, a unit that is the other plus a clause as long as itself 2n / 3n = 0.67; and
# it drops sentences of one topic that share only function words ("Add the milk to the bowl." /
# "Put the pan on the stove.": "the", "the" → 4 / 12 = 0.33) or only half their words (0.5).
UNIT_MATCH_THRESHOLD = 0.6


@dataclass(frozen=True)
class PRF:
    """Precision, recall and F1 of one answer's images."""

    precision: float
    recall: float
    f1: float


def image_precision_recall_f1(predicted: Sequence[str], gold: Sequence[str]) -> PRF:
    """Set-based image precision, recall and F1 over distinct image names.

    precision = |P ∩ G| / |P|, recall = |P ∩ G| / |G|, f1 = their harmonic mean, where P and G
    are the *sets* of predicted and gold names (an image shown twice counts once).

    Edge cases, as MRAMG-Bench's evaluation treats them:

    - no gold, no prediction: precision = recall = f1 = 1.0 (nothing to show, nothing shown);
    - no gold, some prediction: precision 0.0 (every image shown is wrong), recall 1.0 (nothing
      was missed), f1 0.0;
    - some gold, no prediction: precision 0.0, recall 0.0, f1 0.0 (an answer without images is
      not rewarded with a perfect precision);
    - precision + recall == 0: f1 = 0.0.

    >>> image_precision_recall_f1(["a", "b", "x"], ["a", "b"])
    PRF(precision=0.6666666666666666, recall=1.0, f1=0.8)
    >>> image_precision_recall_f1([], [])
    PRF(precision=1.0, recall=1.0, f1=1.0)
    >>> image_precision_recall_f1(["a"], [])
    PRF(precision=0.0, recall=1.0, f1=0.0)
    >>> image_precision_recall_f1([], ["a"])
    PRF(precision=0.0, recall=0.0, f1=0.0)
    """
    predicted_set, gold_set = set(predicted), set(gold)
    if not predicted_set and not gold_set:
        return PRF(1.0, 1.0, 1.0)
    hits = len(predicted_set & gold_set)
    precision = hits / len(predicted_set) if predicted_set else 0.0
    recall = hits / len(gold_set) if gold_set else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PRF(precision, recall, f1)


def weighted_edit_distance(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """The cheapest way to edit the predicted image sequence into the gold one.

    Operations on the *prediction* (MRAMG-Bench's dist(A, B) with A = gold, B = prediction):

    - insertion of a gold image the prediction is missing: cost 3 (:data:`MISSING_IMAGE_COST`);
    - deletion of an extra predicted image: cost 2 (:data:`EXTRA_IMAGE_COST`);
    - substitution of a predicted image by the gold image at that place: cost 1
      (:data:`SUBSTITUTION_COST`); equal names cost 0.

    Sequences are compared as they are (duplicates included). Two empty sequences: 0.0.

    >>> weighted_edit_distance(["b", "a"], ["a", "b"])  # a swap: two substitutions
    2.0
    >>> weighted_edit_distance(["a"], ["a", "b"])  # "b" missing: one insertion
    3.0
    >>> weighted_edit_distance(["a", "b"], ["a"])  # "b" extra: one deletion
    2.0
    """
    # cost[i][j]: edit predicted[:j] into gold[:i]
    previous = [j * EXTRA_IMAGE_COST for j in range(len(predicted) + 1)]
    for i, gold_image in enumerate(gold, start=1):
        current = [i * MISSING_IMAGE_COST]
        for j, predicted_image in enumerate(predicted, start=1):
            current.append(
                min(
                    previous[j] + MISSING_IMAGE_COST,  # gold[i-1] inserted
                    current[j - 1] + EXTRA_IMAGE_COST,  # predicted[j-1] deleted
                    previous[j - 1] + (0.0 if gold_image == predicted_image else SUBSTITUTION_COST),
                )
            )
        previous = current
    return float(previous[-1])


def ordering_score(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """MRAMG-Bench's image ordering score.

    ordering = recall × (1 − min(3, d / max(|gold|, |predicted|)) / 3)

    where d is :func:`weighted_edit_distance` (missing image 3, extra image 2, substitution 1)
    and recall is the set-based image recall of :func:`image_precision_recall_f1`. The cap of 3
    mirrors the benchmark's definition; with these weights d / max(...) never exceeds 3 (no
    element costs more than 3), so the cap cannot bind.

    Edge cases:

    - no gold, no prediction: 1.0 (the empty order is right);
    - no gold, some prediction: 0.0;
    - some gold, no prediction: 0.0 (recall is 0; the formula also gives d / |gold| = 3 → 0);
    - recall 0 (no gold image shown): 0.0, however the sequences line up.

    >>> ordering_score(["a", "b"], ["a", "b"])
    1.0
    >>> round(ordering_score(["b", "a"], ["a", "b"]), 4)  # d = 2, 2/2 = 1, 1 - 1/3
    0.6667
    >>> ordering_score([], [])
    1.0
    """
    if not gold:
        return 1.0 if not predicted else 0.0
    recall = image_precision_recall_f1(predicted, gold).recall
    if recall == 0.0:
        return 0.0
    normalised = weighted_edit_distance(predicted, gold) / max(len(gold), len(predicted))
    return recall * (1.0 - min(ORDERING_CAP, normalised) / ORDERING_CAP)


def position_accuracy(predicted_positions: Mapping[str, int], gold_positions: Mapping[str, int]) -> float | None:
    """Share of gold images placed after exactly the gold sentence (no tolerance).

    Positions are sentence numbers (0 = before the first sentence) *of one and the same text*: use
    it where prediction and gold number the same units (the trainer's held-out examples); for an
    answer scored against a gold answer with its own sentences use :func:`aligned_position_accuracy`.
    A gold image the prediction does not place counts as wrong; predicted images that are not gold
    images are ignored here (image precision accounts for them). None when there are no gold
    images: nothing to place.

    >>> position_accuracy({"a": 0, "b": 3}, {"a": 0, "b": 2})
    0.5
    >>> position_accuracy({"a": 1}, {}) is None
    True
    """
    if not gold_positions:
        return None
    right = sum(1 for name, position in gold_positions.items() if predicted_positions.get(name) == position)
    return right / len(gold_positions)


def words(text: str) -> list[str]:
    """Lowercase word tokens, as ROUGE-L here counts them: `\\w+` runs (punctuation dropped)."""
    return WORD.findall(text.lower())


def unit_words(text: str) -> list[str]:
    """A unit's words for alignment: :func:`words` after a leading list marker is dropped.

    >>> unit_words("5.  Bake the CAKE!")
    ['bake', 'the', 'cake']
    >>> unit_words("- (see above)")
    ['see', 'above']
    """
    return words(LIST_MARKER.sub("", text, count=1))


def unit_similarity(first: str, second: str) -> float:
    """How alike two units are: SequenceMatcher's ratio over their :func:`unit_words`, in [0, 1].

    Case, punctuation, whitespace and list numbering do not count. Two units without words (a
    rule, an emoji line) are 1.0 when their whitespace-collapsed text is the same, else 0.0; one
    unit without words and one with: 0.0.

    >>> unit_similarity("5. Bake the cake.", "6.  bake the cake")
    1.0
    >>> unit_similarity("Add the milk to the bowl.", "Put the pan on the stove.")
    0.3333333333333333
    """
    first_words, second_words = unit_words(first), unit_words(second)
    if not first_words and not second_words:
        return 1.0 if " ".join(first.split()) == " ".join(second.split()) else 0.0
    if not first_words or not second_words:
        return 0.0
    return SequenceMatcher(None, first_words, second_words, autojunk=False).ratio()


def align_units(
    predicted_units: Sequence[str], gold_units: Sequence[str], threshold: float = UNIT_MATCH_THRESHOLD
) -> list[int | None]:
    """A monotone alignment of predicted units to gold units: for each predicted unit, the number
    (1-based) of the gold unit it stands for, or None.

    Only pairs with :func:`unit_similarity` ≥ `threshold` (:data:`UNIT_MATCH_THRESHOLD`) may
    align; each unit aligns at most once and aligned numbers increase with the predicted order.
    Among such alignments the one with the largest summed similarity is taken (dynamic programming
    as for a longest common subsequence); ties go to the later gold unit. Identical unit lists
    align one to one (any other alignment has fewer pairs, each worth at most 1).

    >>> gold = ["1. Mix the batter.", "2. Bake the cake.", "3. Serve it warm."]
    >>> align_units(["Preheat the oven.", "Mix the batter.", "Bake the cake."], gold)  # an extra first unit
    [None, 1, 2]
    >>> align_units(["1. Mix the batter.", "2. Serve it warm."], gold)  # unit 2 dropped, items renumbered
    [1, 3]
    """
    rows, columns = len(predicted_units), len(gold_units)
    similarity = [[unit_similarity(p, g) for g in gold_units] for p in predicted_units]
    best = [[0.0] * (columns + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, columns + 1):
            value = max(best[i - 1][j], best[i][j - 1])
            if similarity[i - 1][j - 1] >= threshold:
                value = max(value, best[i - 1][j - 1] + similarity[i - 1][j - 1])
            best[i][j] = value
    alignment: list[int | None] = [None] * rows
    i, j = rows, columns
    while i > 0 and j > 0:
        score = similarity[i - 1][j - 1]
        if score >= threshold and best[i][j] == best[i - 1][j - 1] + score:
            alignment[i - 1] = j
            i, j = i - 1, j - 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return alignment


def gold_slots(alignment: Sequence[int | None], slot: int) -> set[int]:
    """The gold positions an image at predicted `slot` (0 = before the first predicted unit, p = after
    predicted unit p) stands at, given `alignment` from :func:`align_units`.

    Two views, either one suffices:

    - *after*: slot 0 is gold position 0 (the start of the answer is the start of the gold); slot
      p ≥ 1 is the gold number of the last aligned predicted unit at or before p (an unaligned unit
      is read as part of the aligned one before it); none when units 1..p are all unaligned;
    - *before*: when predicted unit p + 1 aligns to gold unit g, gold position g − 1 (the image
      stands just before that unit).

    A slot outside 0..len(alignment) stands nowhere: the empty set. With identical texts
    (alignment [1, 2, …, n]) both views give {p}, so scores equal :func:`position_accuracy`'s.

    >>> alignment = [None, 1, 2]  # an extra leading sentence, then gold units 1 and 2
    >>> [sorted(gold_slots(alignment, slot)) for slot in range(4)]
    [[0], [0], [1], [2]]
    >>> alignment = [1, 3]  # gold unit 2 dropped: the slot between 1 and 3 stands for both gaps
    >>> [sorted(gold_slots(alignment, slot)) for slot in range(3)]
    [[0], [1, 2], [3]]
    >>> sorted(gold_slots([None, None], 2))  # nothing aligned: slot 2 stands nowhere (slot 0 still maps to 0)
    []
    """
    if not 0 <= slot <= len(alignment):
        return set()
    positions: set[int] = set()
    if slot == 0:
        positions.add(0)
    else:
        after = next((g for g in reversed(alignment[:slot]) if g is not None), None)
        if after is not None:
            positions.add(after)
    if slot < len(alignment) and alignment[slot] is not None:
        positions.add(alignment[slot] - 1)
    return positions


def aligned_position_accuracy(
    predicted_units: Sequence[str],
    predicted_positions: Mapping[str, int],
    gold_units: Sequence[str],
    gold_positions: Mapping[str, int],
) -> float | None:
    """Share of gold images placed at the right place in the *answer's own* text.

    The predicted units are aligned to the gold units (:func:`align_units`), and a gold image is
    right when its predicted slot stands at its gold position (:func:`gold_slots`: after the gold
    unit the slot follows, or just before the gold unit the slot precedes). So an extra, dropped or
    renumbered sentence does not shift every position, and a slot whose number matches but whose
    neighbours are other sentences is wrong. A gold image the prediction does not place is wrong;
    predicted images that are not gold are ignored. None without gold images. With identical units
    the score is :func:`position_accuracy`'s.

    >>> gold = ["Mix the batter.", "Bake the cake."]
    >>> aligned_position_accuracy(["Preheat the oven."] + gold, {"a": 2}, gold, {"a": 1})  # after "Mix"
    1.0
    >>> aligned_position_accuracy(["Preheat the oven."] + gold, {"a": 1}, gold, {"a": 1})  # after "Preheat"
    0.0
    >>> aligned_position_accuracy(gold, {}, gold, {}) is None
    True
    """
    if not gold_positions:
        return None
    alignment = align_units(predicted_units, gold_units)
    right = 0
    for name, position in gold_positions.items():
        slot = predicted_positions.get(name)
        if slot is not None and position in gold_slots(alignment, slot):
            right += 1
    return right / len(gold_positions)


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for j, other in enumerate(second, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) over lowercase word tokens (see :func:`words`).

    P = LCS / |candidate|, R = LCS / |reference|, F = 2PR / (P + R); no stemming, no stop words,
    the texts taken as one token sequence each (not ROUGE-Lsum's per-sentence union).

    Edge cases: both without words: 1.0; exactly one without words: 0.0; no common word: 0.0.

    >>> rouge_l("the cat sat", "The cat sat!")
    1.0
    >>> round(rouge_l("a cat sat", "the cat sat on the mat"), 4)  # LCS 2: P 2/3, R 1/3
    0.4444
    """
    candidate_words, reference_words = words(candidate), words(reference)
    if not candidate_words and not reference_words:
        return 1.0
    if not candidate_words or not reference_words:
        return 0.0
    common = lcs_length(candidate_words, reference_words)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def parse_gold_answer(gold_answer: str, gold_images: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Split a gold answer with `<PIC>` markers into its units and the gold position of each image.

    Uses the project's own unit parser (`services.common.text.parse_markdown`), so the
    sentences are numbered the way the generator and inserter number them: headings, sentences
    and list items, from 1. The n-th `<PIC>` stands for `gold_images[n]`; its position is the
    number of units before it (0 = before the first).

    Edge cases (the parser's rules): a `<PIC>` with no image left is dropped; images left over
    after the last marker are placed at the end (position = number of units); a name listed twice
    keeps the position of its first occurrence.

    >>> parse_gold_answer("<PIC>Mix it. Bake it.<PIC>", ["a.jpg", "b.jpg"])
    (['Mix it.', 'Bake it.'], {'a.jpg': 0, 'b.jpg': 2})
    """
    parsed = parse_markdown(gold_answer, pic_images=[ImageRef(source=name) for name in gold_images])
    positions: dict[str, int] = {}
    for image in parsed.images:
        positions.setdefault(image.source, image.position)
    return [unit.text for unit in parsed.units], positions


def strip_pic_markers(text: str) -> str:
    """The text with its `<PIC>` markers replaced by spaces (words either side stay apart)."""
    return text.replace(PIC_MARKER, " ")


def answer_metrics(
    predicted_units: Sequence[str],
    predicted_images: Sequence[str],
    predicted_positions: Mapping[str, int],
    gold_answer: str,
    gold_images: Sequence[str],
) -> dict[str, float | None]:
    """Every metric of one answer, as one flat dict.

    - `predicted_units`: the answer's units' texts in order, without its images (image links would
      count as words), e.g. `[u.text for u in answer.units]`;
    - `predicted_images`: the answer's images in order of appearance;
    - `predicted_positions`: image name → predicted unit it follows (0 = before the first);
    - `gold_answer`, `gold_images`: the gold answer with `<PIC>` markers and its ordered images.

    Keys: image_precision, image_recall, image_f1 (:func:`image_precision_recall_f1`), ordering
    (:func:`ordering_score`), position_accuracy (:func:`aligned_position_accuracy`: the predicted
    units aligned to the units and positions of :func:`parse_gold_answer`; None without gold
    images) and rouge_l (:func:`rouge_l` between the units joined by newlines and the gold answer
    with its `<PIC>` markers removed).

    >>> answer_metrics(["Mix it."], ["a"], {"a": 1}, "Mix it. <PIC>", ["a"])["position_accuracy"]
    1.0
    >>> answer_metrics(["First this.", "Mix it."], ["a"], {"a": 2}, "Mix it. <PIC>", ["a"])["position_accuracy"]
    1.0
    """
    if isinstance(predicted_units, str):
        raise TypeError("answer_metrics takes the answer's units (a sequence of texts), not one joined text")
    prf = image_precision_recall_f1(predicted_images, gold_images)
    gold_units, gold_positions = parse_gold_answer(gold_answer, gold_images)
    return {
        "image_precision": prf.precision,
        "image_recall": prf.recall,
        "image_f1": prf.f1,
        "ordering": ordering_score(predicted_images, gold_images),
        "position_accuracy": aligned_position_accuracy(
            predicted_units, predicted_positions, gold_units, gold_positions
        ),
        "rouge_l": rouge_l("\n".join(predicted_units), strip_pic_markers(gold_answer)),
    }


def aggregate(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | int | None]:
    """Mean of each metric over the rows, skipping None values, plus `count` (the number of rows).

    Keys come in the order they first appear; a row without a key does not count for it. A metric
    that is None in every row that has it averages to None. No rows: `{"count": 0}`.

    >>> aggregate([{"f1": 1.0, "pos": None}, {"f1": 0.5, "pos": 0.25}])
    {'f1': 0.75, 'pos': 0.25, 'count': 2}
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            sums.setdefault(key, 0.0)
            counts.setdefault(key, 0)
            if value is not None:
                sums[key] += float(value)
                counts[key] += 1
    result: dict[str, float | int | None] = {key: (sums[key] / counts[key] if counts[key] else None) for key in sums}
    result["count"] = len(rows)
    return result
