"""Questions files (the ../shared/corpora format): one JSON object per line, `id` and `question`
required, gold fields (`gold_answer` with `<PIC>` markers, `gold_images`, `doc_id`, `section`)
optional, `collection` optional (overrides the job's collection for that question).

A line that cannot be a question (invalid JSON, no id, an empty or oversized question, a text that
Postgres cannot store: a NUL character or a lone surrogate, anywhere in a field that is stored) does not
stop the file: it becomes a `QuestionLine` with an `error`, which the job records as a failed query
so that the rest of the batch goes on and the operator sees what was wrong, and where.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Questions are a sentence or two; the embedding model reads 256 tokens. A megabyte of text is an
# input error (a pasted document, a broken export), not a question.
MAX_QUESTION_CHARS = 4_000
MAX_ID_CHARS = 200
MAX_COLLECTION_CHARS = 200  # collections.name and queries.collection are VARCHAR(200)
GOLD_FIELDS = ("gold_answer", "gold_images", "doc_id", "section")
STORED_FIELDS = ("id", "question", "collection", *GOLD_FIELDS)  # what reaches Postgres (text, JSONB)
# Postgres text and JSONB hold neither NUL nor a UTF-16 surrogate (JSON's "\ud800" decodes to one).
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


@dataclass
class QuestionLine:
    external_id: str
    question: str
    line: int
    gold: dict[str, Any] = field(default_factory=dict)
    collection: str | None = None
    error: str | None = None


def unstorable(value: Any, where: str) -> str | None:
    r"""Why `value` (a text, or JSON: keys and values of objects, items of arrays) cannot be stored
    in Postgres, naming where, or None.

    >>> unstorable({"a": ["ok", "x\x00y"]}, "`gold`")
    '`gold`.a[1] holds a NUL character (U+0000) at position 1'
    >>> unstorable({"\ud800": 1}, "`gold`")
    'a key of `gold` holds a lone surrogate (U+D800) at position 0'
    """
    pending: list[tuple[Any, str]] = [(value, where)]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            found = UNSTORABLE.search(item)
            if found:
                what = "a NUL character" if found.group() == "\x00" else "a lone surrogate"
                return f"{path} holds {what} (U+{ord(found.group()):04X}) at position {found.start()}"
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                pending += [(inner, f"{path}.{key}"), (key, f"a key of {path}")]  # the key is checked first
        elif isinstance(item, list):
            pending += [(inner, f"{path}[{index}]") for index, inner in reversed(list(enumerate(item)))]
    return None


def storable(text: str) -> str:
    r"""A text Postgres can store: what it cannot (NUL, lone surrogates such as a file name's
    undecodable bytes) written as escapes.

    >>> print(storable("a\x00b\udcff"))
    a\x00b\udcff
    """
    return UNSTORABLE.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


def parse_question(record: Any, line: int) -> QuestionLine:
    """One decoded line → a question, or a question line carrying its error."""
    fallback_id = f"line-{line}"
    if not isinstance(record, dict):
        return QuestionLine(
            fallback_id, "", line, error=f"line {line}: expected a JSON object, got {type(record).__name__}"
        )
    problem = unstorable(record.get("id"), "`id`")
    if problem:
        return QuestionLine(fallback_id, "", line, error=f"line {line}: {problem}")
    raw_id = record.get("id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        return QuestionLine(
            fallback_id, storable(str(record.get("question", "")))[:200], line, error=f"line {line}: no `id`"
        )
    external_id = str(raw_id).strip()
    if len(external_id) > MAX_ID_CHARS:
        return QuestionLine(
            fallback_id, "", line, error=f"line {line}: `id` is {len(external_id)} characters (limit {MAX_ID_CHARS})"
        )
    for key in STORED_FIELDS[1:]:
        problem = unstorable(record.get(key), f"`{key}`")
        if problem:  # nothing of the line is stored but its id: the failed query says why
            return QuestionLine(external_id, "", line, error=f"line {line}: {problem}")
    question = record.get("question")
    gold = {key: record[key] for key in GOLD_FIELDS if key in record}
    collection = record.get("collection")
    if collection is not None and not isinstance(collection, str):
        return QuestionLine(external_id, "", line, gold, error=f"line {line}: `collection` must be a string")
    if collection is not None and len(collection) > MAX_COLLECTION_CHARS:
        return QuestionLine(
            external_id,
            "",
            line,
            gold,
            error=f"line {line}: `collection` is {len(collection):,} characters (limit {MAX_COLLECTION_CHARS})",
        )
    if not isinstance(question, str):
        what = "no `question`" if question is None else f"`question` is a {type(question).__name__}, not text"
        return QuestionLine(external_id, "", line, gold, collection, error=f"line {line}: {what}")
    question = question.strip()
    if not question:
        return QuestionLine(external_id, "", line, gold, collection, error=f"line {line}: the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        return QuestionLine(
            external_id,
            question[:200] + "…",
            line,
            gold,
            collection,
            error=f"line {line}: the question is {len(question):,} characters (limit {MAX_QUESTION_CHARS:,})",
        )
    if "gold_images" in gold and not (
        isinstance(gold["gold_images"], list) and all(isinstance(name, str) for name in gold["gold_images"])
    ):
        return QuestionLine(
            external_id, question, line, gold, collection, error=f"line {line}: `gold_images` must be a list of names"
        )
    return QuestionLine(external_id, question, line, gold, collection)


def iter_lines(lines: Iterable[bytes | str]) -> Iterator[QuestionLine]:
    """Every non-blank line as it is read, numbered from 1; duplicate ids after the first are errors.
    Only the ids seen are kept: a file of any length streams through."""
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield QuestionLine(
                    f"line-{number}", "", number, error=f"line {number}: invalid UTF-8 at byte {error.start}"
                )
                continue
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            reason = error.msg.removesuffix(" at")  # some of json's messages end in " at"
            entry = QuestionLine(
                f"line-{number}", "", number, error=f"line {number}: invalid JSON ({reason} at column {error.colno})"
            )
        else:
            entry = parse_question(record, number)
        if entry.external_id in seen:
            entry.error = entry.error or f"line {number}: duplicate id {entry.external_id!r}"
            entry.external_id = f"{entry.external_id}#line-{number}"
        seen.add(entry.external_id)
        yield entry


def parse_lines(lines: Iterable[bytes | str]) -> list[QuestionLine]:
    """Every non-blank line, numbered from 1; duplicate ids after the first are errors."""
    return list(iter_lines(lines))


def stream_questions(path: Path) -> Iterator[QuestionLine]:
    """A questions file line by line, for `submit_job` to store in batches: the file is opened now
    (FileNotFoundError / IsADirectoryError at once, before anything is stored), and a ValueError ends
    the stream if it held no question (the submission's transaction then stores nothing)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the questions .jsonl file")
    handle = path.open("rb")

    def read() -> Iterator[QuestionLine]:
        with handle:
            count = 0
            for entry in iter_lines(handle):
                count += 1
                yield entry
        if not count:
            raise ValueError(f"{path} holds no questions")

    return read()


def read_questions(path: Path) -> list[QuestionLine]:
    """A questions file; FileNotFoundError / IsADirectoryError / ValueError (empty file) for the caller to report."""
    return list(stream_questions(path))


def from_records(records: Iterable[dict[str, Any]]) -> list[QuestionLine]:
    """Questions given as Python dicts (the client, the dashboard's upload)."""
    return parse_lines(
        json.dumps(record, ensure_ascii=False) if isinstance(record, dict) else str(record) for record in records
    )
