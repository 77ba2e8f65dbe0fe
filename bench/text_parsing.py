"""Markdown parsing on hostile input: time per shape and size, and how it grows (issue 17, item 4).

Each shape is a long run of what a pattern of `services.common.text` looks for (spaces after `#`,
`![`, `[`, `<img`, `|`, backticks, quotes). A linear reader takes ~10x the time for 10x the input; the
patterns it replaced took ~100x (quadratic) or ~1000x (cubic). The old patterns are timed too, on
sizes they still finish.

    PYTHONPATH=. .venv/bin/python -m bench.text_parsing [--sizes 20000 200000 2000000] \
        [--out bench/results/text_parsing.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from services.common.metrics import parse_gold_answer
from services.common.text import parse_markdown

# The patterns as they were before issue 17 (cubic and quadratic on long runs): the tests' oracle.
OLD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
OLD_MD_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\(\s*<?(?P<src>[^)\s>]+)>?(?:\s+\"(?P<title>[^\"]*)\")?\s*\)")
OLD_HTML_IMAGE = re.compile(r"<img\s[^>]*>", re.IGNORECASE)
OLD_HTML_ATTR = re.compile(r"(\w+)\s*=\s*(\"[^\"]*\"|'[^']*')")

# shape -> a document of about n characters (or n repetitions)
ADVERSARIAL = {
    "spaces in a heading": lambda n: "# a" + " " * n + "b",
    "hashes": lambda n: "#" * n,
    "heading, spaces and hashes": lambda n: "# a" + " #" * (n // 2),
    "image openers": lambda n: "![" * (n // 2),
    "brackets": lambda n: "[" * (n // 2) + "]" * (n // 2),
    "image without end": lambda n: "![a](" * (n // 5),
    "images with open titles": lambda n: '![a](b "' * (n // 8),
    "images with closed titles": lambda n: '![a](b "c" ' * (n // 11),
    "nested image links": lambda n: "![a](" * (n // 5) + ")",
    "img tags without end": lambda n: "<img " * (n // 5),
    "img attributes": lambda n: "<img " + "a" * (n // 2) + "='" + "b" * (n // 2) + ">",
    "table pipes": lambda n: "|" * (n // 2) + "\n" + "| a " * (n // 8),
    "backticks": lambda n: "`" * (n // 2) + "\n" + "```\n" * (n // 8),
    "bangs": lambda n: "!" * n,
    "abbreviations": lambda n: "Mix e.g. A " * (n // 11),
    "list markers": lambda n: "- " * (n // 4) + "\n" + "1. " * (n // 6),
    "pic markers": lambda n: "<PIC>" * (n // 5),
}


def seconds(function, *args, repeat: int = 1) -> float:
    """The best of `repeat` runs (the machine is shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - started)
    return best


def parse_both(document: str) -> None:
    parse_markdown(document)
    parse_gold_answer(document, ["a.png", "b.png"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for shape, make in ADVERSARIAL.items():
        times = [seconds(parse_both, make(size), repeat=3) for size in args.sizes]
        growth = [round(later / max(earlier, 1e-6), 1) for earlier, later in zip(times, times[1:], strict=False)]
        rows.append({"shape": shape, "seconds": [round(t, 4) for t in times], "growth": growth})
        print(f"{shape:28} " + "  ".join(f"{t:8.4f}s" for t in times) + f"   x{growth}")
    old = {
        f"old heading, {n} spaces": seconds(OLD_HEADING.match, "# a" + " " * n + "b") for n in (500, 1_000, 2_000)
    } | {
        f"old image, {n} openers": seconds(lambda line: list(OLD_MD_IMAGE.finditer(line)), "![" * n)
        for n in (5_000, 10_000, 20_000)
    }
    for name, value in old.items():
        print(f"{name:28} {value:8.4f}s")
    if args.out:
        args.out.write_text(json.dumps({"sizes": args.sizes, "shapes": rows, "old_patterns": old}, indent=2) + "\n")


if __name__ == "__main__":
    main()
