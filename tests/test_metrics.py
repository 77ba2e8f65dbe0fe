"""Answer metrics against hand-computed cases; the arithmetic stands next to each expected value."""

import doctest

import pytest

from services.common import metrics
from services.common.metrics import (
    PRF,
    aggregate,
    align_units,
    aligned_position_accuracy,
    answer_metrics,
    image_precision_recall_f1,
    ordering_score,
    parse_gold_answer,
    position_accuracy,
    rouge_l,
    unit_similarity,
    weighted_edit_distance,
)

pytestmark = pytest.mark.unit


def test_doctests():
    result = doctest.testmod(metrics)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        # exact: P = 2/2, R = 2/2, F = 1
        (["a", "b"], ["a", "b"], PRF(1.0, 1.0, 1.0)),
        # order does not matter to sets: same as exact
        (["b", "a"], ["a", "b"], PRF(1.0, 1.0, 1.0)),
        # extra image: P = 2/3, R = 2/2, F = 2·(2/3)·1 / (2/3 + 1) = (4/3)/(5/3) = 4/5
        (["a", "x", "b"], ["a", "b"], PRF(2 / 3, 1.0, 0.8)),
        # missing image: P = 2/2, R = 2/3, F = 2·1·(2/3) / (5/3) = 4/5
        (["a", "c"], ["a", "b", "c"], PRF(1.0, 2 / 3, 0.8)),
        # duplicates count once: P = |{a}| / |{a, b}| = 1/2, R = 1/|{a, c}| = 1/2, F = 1/2
        (["a", "a", "b"], ["a", "c"], PRF(0.5, 0.5, 0.5)),
        # nothing right: P = 0/1, R = 0/1, F = 0 (P + R = 0)
        (["x"], ["a"], PRF(0.0, 0.0, 0.0)),
        # edge: no gold, no prediction: all 1 (nothing to show, nothing shown)
        ([], [], PRF(1.0, 1.0, 1.0)),
        # edge: no gold, a prediction: P = 0/1, R = 1 (nothing missed), F = 0
        (["a"], [], PRF(0.0, 1.0, 0.0)),
        # edge: gold, no prediction: P = 0, R = 0/1, F = 0
        ([], ["a"], PRF(0.0, 0.0, 0.0)),
    ],
)
def test_image_precision_recall_f1(predicted, gold, expected):
    got = image_precision_recall_f1(predicted, gold)
    assert got.precision == pytest.approx(expected.precision)
    assert got.recall == pytest.approx(expected.recall)
    assert got.f1 == pytest.approx(expected.f1)


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ([], [], 0.0),
        (["a", "b"], ["a", "b"], 0.0),
        # swap: a→b and b→a are two substitutions, 1 + 1 = 2 (delete+insert would be 2 + 3 = 5)
        (["b", "a"], ["a", "b"], 2.0),
        # prediction lacks gold "b": one insertion into the prediction = 3
        (["a"], ["a", "b"], 3.0),
        # prediction has extra "b": one deletion from the prediction = 2
        (["a", "b"], ["a"], 2.0),
        # nothing predicted: insert both gold images = 3 + 3 = 6
        ([], ["a", "b"], 6.0),
        # nothing gold: delete both predicted images = 2 + 2 = 4
        (["a", "b"], [], 4.0),
        # [c, a] → [a, b, c]: c→a (1), a→b (1), insert c (3) = 5; the DP table gives the same
        (["c", "a"], ["a", "b", "c"], 5.0),
    ],
)
def test_weighted_edit_distance(predicted, gold, expected):
    assert weighted_edit_distance(predicted, gold) == expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        # exact: d = 0 → recall 1 × (1 − 0) = 1
        (["a", "b"], ["a", "b"], 1.0),
        # swap (only the order differs): d = 2 (two substitutions), 2 / max(2, 2) = 1,
        # recall 1 × (1 − 1/3) = 2/3
        (["b", "a"], ["a", "b"], 2 / 3),
        # extra image in the middle: d = 2 (delete x), 2 / max(2, 3) = 2/3,
        # recall 1 × (1 − (2/3)/3) = 1 − 2/9 = 7/9
        (["a", "x", "b"], ["a", "b"], 7 / 9),
        # extra image at the end: d = 2, 2 / max(1, 2) = 1, recall 1 × (1 − 1/3) = 2/3
        (["a", "b"], ["a"], 2 / 3),
        # missing image: d = 3 (insert b), 3 / max(3, 2) = 1, recall 2/3 × (1 − 1/3) = 4/9
        (["a", "c"], ["a", "b", "c"], 4 / 9),
        # missing image, short: d = 3, 3 / max(2, 1) = 3/2, recall 1/2 × (1 − (3/2)/3) = 1/2 × 1/2 = 1/4
        (["a"], ["a", "b"], 1 / 4),
        # wrong image: d = 1 (b→c), 1 / 2, recall 1/2 × (1 − (1/2)/3) = 1/2 × 5/6 = 5/12
        (["a", "c"], ["a", "b"], 5 / 12),
        # missing and out of order: d = 5 (see the distance test), 5 / 3, recall 2/3 × (1 − 5/9) = 8/27
        (["c", "a"], ["a", "b", "c"], 8 / 27),
        # no gold image shown: recall 0 → 0 whatever the distance
        (["x", "y"], ["a", "b"], 0.0),
        # edge: both empty → 1
        ([], [], 1.0),
        # edge: no gold, a prediction → 0
        (["a"], [], 0.0),
        # edge: gold, no prediction → 0 (recall 0; also d = 3·2 = 6, 6/2 = 3 = the cap → 1 − 1 = 0)
        ([], ["a", "b"], 0.0),
    ],
)
def test_ordering_score(predicted, gold, expected):
    assert ordering_score(predicted, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        # both right: 2/2
        ({"a": 0, "b": 2}, {"a": 0, "b": 2}, 1.0),
        # one sentence off counts as wrong (no tolerance): 1/2
        ({"a": 0, "b": 3}, {"a": 0, "b": 2}, 0.5),
        # "b" not placed: wrong; the extra "x" is ignored: 1/2
        ({"a": 0, "x": 2}, {"a": 0, "b": 2}, 0.5),
        # nothing placed: 0/1
        ({}, {"a": 1}, 0.0),
        # edge: no gold images → None, whatever was predicted
        ({"a": 1}, {}, None),
        ({}, {}, None),
    ],
)
def test_position_accuracy(predicted, gold, expected):
    assert position_accuracy(predicted, gold) == expected


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        # cand [the cat sat on the mat], ref [the cat is on the mat]: LCS = the cat on the mat = 5,
        # P = 5/6, R = 5/6, F = 5/6
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # cand [a cat sat] (3), ref [the cat sat on the mat] (6): LCS = cat sat = 2,
        # P = 2/3, R = 2/6 = 1/3, F = 2·(2/3)(1/3) / (2/3 + 1/3) = 4/9
        ("a cat sat", "the cat sat on the mat", 4 / 9),
        # case and punctuation do not count: [the cat sat] both, F = 1
        ("The CAT, sat!", "the cat sat", 1.0),
        # order matters: cand [b a], ref [a b]: LCS = 1, P = R = 1/2, F = 1/2
        ("b a", "a b", 0.5),
        # no common word: 0
        ("dog", "cat", 0.0),
        # edge: both empty (punctuation only is empty too) → 1
        ("", "", 1.0),
        ("...", "", 1.0),
        # edge: one empty → 0
        ("", "cat", 0.0),
        ("cat", "", 0.0),
    ],
)
def test_rouge_l(candidate, reference, expected):
    assert rouge_l(candidate, reference) == pytest.approx(expected)


GOLD_ANSWER = "<PIC>Mix the flour and eggs. Add the milk. <PIC>Fry in a hot pan."
GOLD_IMAGES = ["a.jpg", "b.jpg"]


def test_parse_gold_answer_three_sentences_two_pics():
    units, positions = parse_gold_answer(GOLD_ANSWER, GOLD_IMAGES)
    assert units == ["Mix the flour and eggs.", "Add the milk.", "Fry in a hot pan."]
    # a.jpg opens the answer: 0 units before it; b.jpg follows "Add the milk.", the 2nd unit
    assert positions == {"a.jpg": 0, "b.jpg": 2}


def test_parse_gold_answer_edge_cases():
    # more markers than images: the marker without an image is dropped
    assert parse_gold_answer("One. <PIC>Two. <PIC>", ["a"]) == (["One.", "Two."], {"a": 1})
    # more images than markers: the rest go at the end (position = 2 units)
    assert parse_gold_answer("One. <PIC>Two.", ["a", "b"]) == (["One.", "Two."], {"a": 1, "b": 2})
    # a name listed twice keeps its first position
    assert parse_gold_answer("<PIC>One. <PIC>Two.", ["a", "a"])[1] == {"a": 0}
    # no images at all
    assert parse_gold_answer("One. Two.", []) == (["One.", "Two."], {})


def test_answer_metrics_combines_everything():
    got = answer_metrics(
        predicted_units=["Mix the flour and eggs.", "Fry in a hot pan."],
        predicted_images=["a.jpg", "b.jpg"],
        predicted_positions={"a.jpg": 0, "b.jpg": 1},
        gold_answer=GOLD_ANSWER,
        gold_images=GOLD_IMAGES,
    )
    assert got == {
        # the same two images: P = R = F = 1
        "image_precision": 1.0,
        "image_recall": 1.0,
        "image_f1": 1.0,
        # the same order: d = 0 → 1
        "ordering": 1.0,
        # predicted units align to gold units [1, 3] ("Add the milk." dropped); a.jpg at slot 0 →
        # gold 0 (right); b.jpg at slot 1, after "Mix…" (gold 1) and before "Fry…" (gold 3 − 1 = 2),
        # where gold has it at 2: right. 2/2
        "position_accuracy": 1.0,
        # gold words without <PIC>: mix the flour and eggs add the milk fry in a hot pan (13);
        # predicted: mix the flour and eggs fry in a hot pan (10), all of it a subsequence → LCS 10;
        # P = 10/10, R = 10/13, F = 2·(10/13) / (1 + 10/13) = (20/13)/(23/13) = 20/23
        "rouge_l": pytest.approx(20 / 23),
    }


def test_answer_metrics_without_gold_images():
    got = answer_metrics(["Hello there."], [], {}, "Hello there.", [])
    # no gold, no prediction: P = R = F = 1, ordering 1; nothing to place: None; same words: 1
    assert got == {
        "image_precision": 1.0,
        "image_recall": 1.0,
        "image_f1": 1.0,
        "ordering": 1.0,
        "position_accuracy": None,
        "rouge_l": 1.0,
    }


def test_answer_metrics_pic_marker_does_not_glue_words():
    # "end<PIC>start" must read as two words "end" "start", not "endstart": F = 1
    got = answer_metrics(["end start"], ["a"], {"a": 1}, "end<PIC>start", ["a"])
    assert got["rouge_l"] == 1.0


def test_answer_metrics_takes_units_not_one_text():
    # a joined text would be read as one unit per character: refused
    with pytest.raises(TypeError):
        answer_metrics("Mix it.", ["a"], {"a": 1}, "Mix it. <PIC>", ["a"])


def test_answer_metrics_rouge_l_reads_the_units_joined():
    # the units' words in order, [mix it bake it], against the gold's: F = 1
    got = answer_metrics(["Mix it.", "Bake it."], [], {}, "Mix it. Bake it.", [])
    assert got["rouge_l"] == 1.0


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param("Bake the cake.", "Bake the cake.", 1.0, id="same"),
        # list numbering, case, punctuation and whitespace do not count
        pytest.param("5. Bake", "6.   bake", 1.0, id="list-numbering"),
        pytest.param("- Bake the cake", "* Bake  the\tcake!", 1.0, id="bullets-whitespace"),
        # one word changed in five: M = 4, 2·4 / 10
        pytest.param("Bake the cake for twenty", "Bake the cake for thirty", 0.8, id="one-word-changed"),
        # [add the milk to the bowl] / [put the pan on the stove]: "the", "the" → 2·2 / 12
        pytest.param("Add the milk to the bowl.", "Put the pan on the stove.", 1 / 3, id="function-words"),
        pytest.param("Mix it.", "Bake it.", 0.5, id="half-the-words"),
        # no words on either side: equal text → 1, else 0; words on one side only → 0
        pytest.param("---", "---", 1.0, id="no-words-same"),
        pytest.param("---", "***", 0.0, id="no-words-different"),
        pytest.param("---", "Bake.", 0.0, id="no-words-one-side"),
    ],
)
def test_unit_similarity(first, second, expected):
    assert unit_similarity(first, second) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        pytest.param(["A b c.", "D e f."], ["A b c.", "D e f."], [1, 2], id="identical"),
        # repeated units still align one to one (any shift loses a pair)
        pytest.param(["Stir.", "Stir.", "Stir."], ["Stir.", "Stir.", "Stir."], [1, 2, 3], id="repeated"),
        pytest.param(["X y z.", "A b c.", "D e f."], ["A b c.", "D e f."], [None, 1, 2], id="extra-first"),
        pytest.param(["A b c.", "D e f."], ["A b c.", "G h i.", "D e f."], [1, 3], id="dropped"),
        # monotone: two units in swapped order cannot both align; the two alignments of one pair tie
        # (sum 1) and the tie goes to the later gold unit
        pytest.param(["D e f.", "A b c."], ["A b c.", "D e f."], [2, None], id="crossing"),
        # two candidates for one gold unit: the exact copy (1.0) wins over the near copy (0.8)
        pytest.param(["A b c d f.", "A b c d e."], ["A b c d e."], [None, 1], id="best-sum"),
        pytest.param([], ["A b c."], [], id="empty-prediction"),
        pytest.param(["A b c."], [], [None], id="empty-gold"),
    ],
)
def test_align_units(predicted, gold, expected):
    assert align_units(predicted, gold) == expected


# A gold answer of four units, images after the 2nd and the 4th: a → 2, b → 4.
G1, G2, G3, G4 = (
    "Whisk the eggs with the sugar.",
    "Fold in the flour gently.",
    "Pour the batter into the tin.",
    "Bake for twenty minutes.",
)
GOLD_CAKE = f"{G1} {G2} <PIC>{G3} {G4} <PIC>"
GOLD_CAKE_LIST = f"1. {G1}\n2. {G2}\n<PIC>\n3. {G3}\n4. {G4}\n<PIC>"
GOLD_CAKE_FIRST = f"<PIC>{G1} {G2} {G3} {G4}"  # a → 0
INTRO = "Here is how to make a sponge cake."
PARAPHRASE = "Fold the flour in slowly with a spatula until smooth."  # G2 said otherwise: ratio 0.4 < 0.6
OTHER_DOCUMENT = ["Open the settings menu.", "Choose the network tab.", "Press the reset button.", "Restart it."]


@pytest.mark.parametrize(
    ("predicted_units", "predicted_positions", "gold_answer", "gold_images", "expected"),
    [
        # same units: both images after the gold unit: 2/2 (the unaligned metric agrees)
        pytest.param([G1, G2, G3, G4], {"a": 2, "b": 4}, GOLD_CAKE, ["a", "b"], 1.0, id="identical"),
        # an extra first sentence shifts every number by one; each image still follows its gold unit:
        # 2/2 (comparing numbers gave 0/2)
        pytest.param([INTRO, G1, G2, G3, G4], {"a": 3, "b": 5}, GOLD_CAKE, ["a", "b"], 1.0, id="extra-leading"),
        # ...and the old numbers (a after G1, b after G3 in this answer) are now wrong: 0/2
        # (comparing numbers gave 2/2)
        pytest.param(
            [INTRO, G1, G2, G3, G4], {"a": 2, "b": 4}, GOLD_CAKE, ["a", "b"], 0.0, id="extra-leading-old-numbers"
        ),
        # an extra sentence between G2 and G3; a after G2: right; b after G4 (slot 5): right. 2/2
        pytest.param([G1, G2, INTRO, G3, G4], {"a": 2, "b": 5}, GOLD_CAKE, ["a", "b"], 1.0, id="extra-middle"),
        # a after the extra sentence, just before G3 (gold 3 − 1 = 2): right too. 2/2
        pytest.param(
            [G1, G2, INTRO, G3, G4], {"a": 3, "b": 5}, GOLD_CAKE, ["a", "b"], 1.0, id="extra-middle-before-next"
        ),
        # G1 dropped: a after G2 (slot 1), b after G4 (slot 3): 2/2 (comparing numbers gave 0/2)
        pytest.param([G2, G3, G4], {"a": 1, "b": 3}, GOLD_CAKE, ["a", "b"], 1.0, id="dropped-before-image"),
        # G2, the unit a follows, dropped: slot 1 is after G1 (gold 1) and before G3 (gold 3 − 1 = 2): 2/2
        pytest.param([G1, G3, G4], {"a": 1, "b": 3}, GOLD_CAKE, ["a", "b"], 1.0, id="dropped-unit-image-follows"),
        # renumbered list items ("5. Bake…" for "4. Bake…") after an extra first item: 2/2
        pytest.param(
            ["1. Preheat the oven.", f"2. {G1}", f"3. {G2}", f"4. {G3}", f"5. {G4}"],
            {"a": 3, "b": 5},
            GOLD_CAKE_LIST,
            ["a", "b"],
            1.0,
            id="list-renumbered",
        ),
        # gold a opens the answer (position 0); slot 0 is the answer's start: 1/1
        pytest.param([INTRO, G1, G2, G3, G4], {"a": 0}, GOLD_CAKE_FIRST, ["a"], 1.0, id="slot-0"),
        # after the extra first sentence, just before G1 (gold 1 − 1 = 0): 1/1
        pytest.param([INTRO, G1, G2, G3, G4], {"a": 1}, GOLD_CAKE_FIRST, ["a"], 1.0, id="slot-0-after-intro"),
        # the same text, a after G1 instead of before it: 0/1
        pytest.param([G1, G2, G3, G4], {"a": 1}, GOLD_CAKE_FIRST, ["a"], 0.0, id="slot-0-one-off"),
        # one unit off, either way, is wrong: a after G3 (slot 3 → {3}), b right: 1/2
        pytest.param([G1, G2, G3, G4], {"a": 3, "b": 4}, GOLD_CAKE, ["a", "b"], 0.5, id="one-off-later"),
        pytest.param([G1, G2, G3, G4], {"a": 1, "b": 4}, GOLD_CAKE, ["a", "b"], 0.5, id="one-off-earlier"),
        # one off in a shifted answer: a after G1 (slot 2 → {1}), b after G3 (slot 4 → {3}): 0/2
        pytest.param([INTRO, G1, G2, G3, G4], {"a": 2, "b": 4}, GOLD_CAKE, ["a", "b"], 0.0, id="one-off-shifted"),
        # another document: no unit aligns, the same numbers stand nowhere: 0/2 (numbers gave 2/2)
        pytest.param(OTHER_DOCUMENT, {"a": 2, "b": 4}, GOLD_CAKE, ["a", "b"], 0.0, id="other-document"),
        # G2 paraphrased past the threshold (unaligned): a after it, just before G3 (gold 2): right;
        # b after G4: right. 2/2
        pytest.param([G1, PARAPHRASE, G3, G4], {"a": 2, "b": 4}, GOLD_CAKE, ["a", "b"], 1.0, id="unaligned-unit"),
        # a before the unaligned unit: after G1 only (gold 1), the next unit aligns to nothing: 1/2
        pytest.param([G1, PARAPHRASE, G3, G4], {"a": 1, "b": 4}, GOLD_CAKE, ["a", "b"], 0.5, id="unaligned-before"),
        # an unaligned closing sentence reads as part of G4: b after it is after G4. 2/2
        pytest.param([G1, G2, G3, G4, INTRO], {"a": 2, "b": 5}, GOLD_CAKE, ["a", "b"], 1.0, id="unaligned-last"),
        # an empty answer places nothing: 0/2
        pytest.param([], {}, GOLD_CAKE, ["a", "b"], 0.0, id="empty-prediction"),
        # an empty answer with its images at its only slot, 0, where gold has none: 0/2
        pytest.param([], {"a": 0, "b": 0}, GOLD_CAKE, ["a", "b"], 0.0, id="empty-prediction-slot-0"),
        # a slot outside the answer stands nowhere: 1/2
        pytest.param([G1, G2, G3, G4], {"a": 2, "b": 9}, GOLD_CAKE, ["a", "b"], 0.5, id="slot-out-of-range"),
        # no gold images: nothing to place → None
        pytest.param([G1, G2], {"a": 1}, f"{G1} {G2}", [], None, id="no-gold-images"),
    ],
)
def test_answer_metrics_position_accuracy(predicted_units, predicted_positions, gold_answer, gold_images, expected):
    ordered = sorted(predicted_positions, key=predicted_positions.get)
    got = answer_metrics(predicted_units, ordered, predicted_positions, gold_answer, gold_images)
    assert got["position_accuracy"] == expected


@pytest.mark.parametrize(
    "units",
    [
        pytest.param([G1, G2, G3, G4], id="distinct"),
        pytest.param(["Stir.", "Stir.", "Stir."], id="repeated"),
        pytest.param(["One.", "---", "Two."], id="wordless-unit"),
        pytest.param([], id="empty"),
    ],
)
def test_aligned_position_accuracy_on_identical_units_is_position_accuracy(units):
    # every pair of predicted and gold slots for two images: the same score as comparing numbers
    slots = range(len(units) + 1)
    for gold_a in slots:
        for gold_b in slots:
            gold = {"a": gold_a, "b": gold_b}
            for predicted_a in slots:
                for predicted_b in slots:
                    predicted = {"a": predicted_a, "b": predicted_b}
                    assert aligned_position_accuracy(units, predicted, units, gold) == position_accuracy(
                        predicted, gold
                    )


def test_aggregate():
    rows = [
        {"image_f1": 1.0, "position_accuracy": None, "rouge_l": 0.5},
        {"image_f1": 0.5, "position_accuracy": 0.25, "rouge_l": 0.0},
        {"image_f1": 0.0, "position_accuracy": 0.75, "rouge_l": 1.0},
    ]
    assert aggregate(rows) == {
        "image_f1": pytest.approx(0.5),  # (1 + 0.5 + 0) / 3
        "position_accuracy": pytest.approx(0.5),  # None skipped: (0.25 + 0.75) / 2
        "rouge_l": pytest.approx(0.5),  # (0.5 + 0 + 1) / 3
        "count": 3,
    }


def test_aggregate_edge_cases():
    # no rows: only the count
    assert aggregate([]) == {"count": 0}
    # a metric None everywhere averages to None
    assert aggregate([{"position_accuracy": None}, {"position_accuracy": None}]) == {
        "position_accuracy": None,
        "count": 2,
    }
    # a row without a key does not count for it: ordering = 0.5 / 1
    assert aggregate([{"ordering": 0.5}, {"rouge_l": 1.0}]) == {"ordering": 0.5, "rouge_l": 1.0, "count": 2}
