"""The Markdown reader is linear in its input (issue 17, item 4): long runs of the characters its
patterns look for (spaces, `#`, `!`, `[`, `<img`, `|`, backticks, quotes) parse, and the work grows with
the input's length, not its square. The hand-written readers agree with the regular expressions they
replace on random short lines (those patterns are exact there, only slow on long input). Timing is
bench/text_parsing.py's job; here the work is counted in calls of a pattern, not in seconds."""

from __future__ import annotations

import random
import re

import pytest

from bench.text_parsing import ADVERSARIAL, OLD_HEADING, OLD_HTML_ATTR, OLD_HTML_IMAGE, OLD_MD_IMAGE
from services.common import text
from services.common.metrics import parse_gold_answer
from services.common.text import heading_of, image_refs_in, markdown_images, parse_markdown, split_sentences

pytestmark = pytest.mark.unit

ALPHABET = ["#", " ", "\t", "!", "[", "]", "(", ")", "<", ">", '"', "'", "a", "b", "=", "<img ", "src=", "|", "`"]


def old_image_refs_in(line: str) -> tuple[str, list[tuple[str, str, str]]]:
    found = [(m.start(), (m["src"], m["alt"].strip(), (m["title"] or "").strip())) for m in OLD_MD_IMAGE.finditer(line)]
    for match in OLD_HTML_IMAGE.finditer(line):
        attrs = {key.lower(): value[1:-1] for key, value in OLD_HTML_ATTR.findall(match.group(0))}
        if "src" in attrs:
            found.append((match.start(), (attrs["src"], attrs.get("alt", "").strip(), attrs.get("title", "").strip())))
    stripped = OLD_HTML_IMAGE.sub(" ", OLD_MD_IMAGE.sub(" ", line))
    return stripped, [ref for _, ref in sorted(found, key=lambda pair: pair[0])]


def random_lines(seed: int, count: int, length: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, length))) for _ in range(count)]


def test_heading_reader_agrees_with_the_old_pattern():
    lines = random_lines(1, 4000, 12) + ["# Title", "## Title ##", "# C#", "####### seven", "#", "# ", "#\tTab #  "]
    for line in lines:
        old = OLD_HEADING.match(line)
        assert heading_of(line) == ((len(old[1]), old[2].strip()) if old else None), repr(line)


def test_image_readers_agree_with_the_old_patterns():
    examples = [
        '![a](b.png "t") and ![c](<d e.png>) ![f](g.png "h" ) ![](i.png)x![j](k "l"m)',
        '<img src="a.png" alt="A"> <IMG SRC=\'b.png\'> <img alt="no src"> <img src="c.png"',
        "![<img src='x.png'>](y.png) ![a](![b](c.png)",
    ]
    for line in random_lines(2, 6000, 24) + examples:
        stripped, refs = image_refs_in(line)
        assert (stripped, [(r.source, r.alt, r.title) for r in refs]) == old_image_refs_in(line), repr(line)


class Counting:
    """A compiled pattern that counts its calls: the work of a reader, without a clock."""

    def __init__(self, pattern: re.Pattern, calls: list[int]):
        self.pattern, self.calls = pattern, calls

    def __getattr__(self, name):
        method = getattr(self.pattern, name)

        def counted(*args, **kwargs):
            self.calls[0] += 1
            return method(*args, **kwargs)

        return counted


@pytest.fixture()
def pattern_calls(monkeypatch):
    calls = [0]
    for name in ("LIST_ITEM", "FENCE", "IMAGE_TARGET", "IMAGE_END", "HTML_IMAGE_START", "HTML_ATTR", "SENTENCE_END"):
        monkeypatch.setattr(text, name, Counting(getattr(text, name), calls))
    return calls


@pytest.mark.parametrize("shape", sorted(ADVERSARIAL))
def test_adversarial_input_parses_and_the_work_grows_linearly(shape, pattern_calls):
    """Each shape at 20 KB and 200 KB parses (document and gold answer); ten times the input is at
    most about ten times the pattern calls (a quadratic reader would make it a hundred)."""
    work = []
    for n in (4_000, 40_000):
        document = ADVERSARIAL[shape](n)
        pattern_calls[0] = 0
        parse_markdown(document)
        parse_gold_answer(document, ["a.png", "b.png"])
        work.append(pattern_calls[0] + 1)
    assert work[1] <= 12 * work[0], work


def test_huge_runs_parse_within_the_parser_rules():
    """The semantics stay the tests' (heading text, positions) on such input."""
    assert heading_of("#" + " " * 100_000 + "Title" + " " * 100_000 + "#") == (1, "Title")
    line = "![" * 50_000 + "a](b.png)"
    [(start, _, ref)] = markdown_images(line)
    assert (start, ref.source, len(ref.alt)) == (0, "b.png", 2 * 50_000 - 1)
    assert split_sentences("Mix e.g. A " * 3 + "Bake. Then eat.") == [
        "Mix e.g. A Mix e.g. A Mix e.g. A Bake.",
        "Then eat.",
    ]
