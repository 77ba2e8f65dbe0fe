"""Questions files: every line is a question or a failed query with its reason; nothing stops the file."""

from __future__ import annotations

import doctest
import json

import pytest

from services.generator.core import BACKENDS as GENERATOR_BACKENDS
from services.inserter.core import BACKENDS as INSERTER_BACKENDS
from services.jobs import commands, export, status
from services.jobs.questions import MAX_QUESTION_CHARS, from_records, parse_lines, read_questions

pytestmark = pytest.mark.unit


def lines_of(*items) -> list[str]:
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


def test_good_lines_keep_ids_gold_and_collection():
    parsed = parse_lines(
        lines_of(
            {"id": "q1", "question": "  How?  ", "gold_answer": "A. <PIC>", "gold_images": ["a.jpg"], "doc_id": "d"},
            "",
            {"id": 7, "question": "Why?", "collection": "other", "extra": "ignored"},
        )
    )
    assert [(q.external_id, q.question, q.line, q.error) for q in parsed] == [
        ("q1", "How?", 1, None),
        ("7", "Why?", 3, None),
    ]
    assert parsed[0].gold == {"gold_answer": "A. <PIC>", "gold_images": ["a.jpg"], "doc_id": "d"}
    assert parsed[1].collection == "other" and parsed[1].gold == {}


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("{not json", "line 1: invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ('["a", "b"]', "line 1: expected a JSON object, got list"),
        ('{"id": "x", "question": "unterminated\n', "line 1: invalid JSON (Unterminated string starting at column 25)"),
        ('{"question": "no id"}', "line 1: no `id`"),
        ('{"id": "x"}', "line 1: no `question`"),
        ('{"id": "x", "question": 3}', "line 1: `question` is a int, not text"),
        ('{"id": "x", "question": "   "}', "line 1: the question is empty"),
        (
            json.dumps({"id": "x", "question": "w" * 1_048_576}),
            "line 1: the question is 1,048,576 characters (limit 4,000)",
        ),
        ('{"id": "x", "question": "q", "gold_images": "a.jpg"}', "line 1: `gold_images` must be a list of names"),
        ('{"id": "x", "question": "q", "collection": 5}', "line 1: `collection` must be a string"),
    ],
)
def test_bad_lines_carry_a_readable_error(line, error):
    (entry,) = parse_lines([line])
    assert entry.error == error
    assert len(entry.question) <= 201  # a megabyte is not copied into the job


def test_duplicates_invalid_utf8_and_files(tmp_path):
    parsed = parse_lines([b'{"id": "a", "question": "one"}', b"\xff\xfe", b'{"id": "a", "question": "two"}'])
    assert [q.error for q in parsed] == [None, "line 2: invalid UTF-8 at byte 0", "line 3: duplicate id 'a'"]
    assert len({q.external_id for q in parsed}) == 3  # stored under distinct ids: the job keeps all
    assert from_records([{"id": "r", "question": "from a dict"}])[0].question == "from a dict"
    with pytest.raises(FileNotFoundError):
        read_questions(tmp_path / "missing.jsonl")
    with pytest.raises(IsADirectoryError, match="give the questions .jsonl file"):
        read_questions(tmp_path)
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no questions"):
        read_questions(tmp_path / "blank.jsonl")
    assert MAX_QUESTION_CHARS == 4_000


@pytest.mark.parametrize(
    ("counts", "cancelled", "state"),
    [
        ({"queued": 3}, False, "queued"),
        ({"queued": 2, "succeeded": 1}, False, "running"),
        ({"running": 1, "failed": 2}, False, "running"),
        ({"succeeded": 3}, False, "succeeded"),
        ({"succeeded": 2, "failed": 1}, False, "partial"),
        ({"failed": 3}, False, "failed"),
        ({"cancelled": 2, "succeeded": 1}, True, "cancelled"),
        ({"queued": 2}, True, "cancelled"),
    ],
)
def test_job_state_from_query_counts(counts, cancelled, state):
    assert status.job_state(counts, sum(counts.values()), cancelled) == state


def test_percentiles_and_backend_checks():
    assert status.percentile([], 0.5) is None
    assert status.percentile([4, 1, 3, 2], 0.5) == 2
    assert status.percentile(list(range(1, 101)), 0.99) == 99
    assert status.percentile([5.0], 0.99) == 5.0
    commands.check_backend("generator", "openai:gpt-4o-mini", GENERATOR_BACKENDS)
    with pytest.raises(commands.JobError, match="unknown inserter backend 'checkpoint'"):
        commands.check_backend("inserter", "checkpoint", INSERTER_BACKENDS)
    with pytest.raises(commands.JobError, match="unknown generator backend 'gpt'"):
        commands.check_backend("generator", "gpt", GENERATOR_BACKENDS)


def test_export_doctests():
    result = doctest.testmod(export)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("record", "external_id", "error"),
    [
        (
            {"id": "n", "question": "apple\u0000pie"},
            "n",
            "line 1: `question` holds a NUL character (U+0000) at position 5",
        ),
        ({"id": "g", "question": "q", "gold_answer": "\ud800"}, "g", "line 1: `gold_answer` holds a lone surrogate"),
        ({"id": "i\u0000", "question": "q"}, "line-1", "line 1: `id` holds a NUL character (U+0000) at position 1"),
        ({"id": "s", "question": "q", "section": [{"a": "\u0000"}]}, "s", "line 1: `section`[0].a holds a NUL"),
        ({"id": "c", "question": "q", "collection": "c" * 201}, "c", "line 1: `collection` is 201 characters"),
    ],
)
def test_text_postgres_cannot_store_fails_its_line(record, external_id, error):
    entry, good = parse_lines([json.dumps(record), json.dumps({"id": "ok", "question": "How?"})])
    assert entry.external_id == external_id and entry.error.startswith(error)
    assert entry.question == "" and entry.gold == {} and entry.collection is None  # nothing unstorable is kept
    assert good.error is None
    (same,) = from_records([record])  # the client's and the dashboard's way in
    assert same.error == entry.error


def test_an_empty_collection_name_is_refused():
    for name in ("", "   "):
        with pytest.raises(commands.JobError, match="the collection name is empty"):
            commands.job_config(name)


def test_markdown_is_escaped_like_the_html():
    from services.common.contracts import AnswerBlock
    from services.merger import core as merger

    assert doctest.testmod(merger).failed == 0
    markdown = merger.to_markdown(
        [
            AnswerBlock(type="text", text='<script>alert(1)</script> [x](javascript:alert(2)) <a href="x">'),
            AnswerBlock(type="image", source_name="my pics/a (1).png", caption="<img src=x onerror=alert(3)>"),
            AnswerBlock(type="text", text="[ref]:  data:text/html,<b>"),
        ]
    )
    assert "<script" not in markdown and "<a " not in markdown and "<img" not in markdown
    assert "javascript:" not in markdown and "data:" not in markdown
    assert "![&lt;img src=x onerror=alert(3)>](my%20pics/a%20%281%29.png)" in markdown


def test_questions_and_cli_doctests():
    from services.cli import ui
    from services.jobs import questions

    for module in (questions, ui):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0
