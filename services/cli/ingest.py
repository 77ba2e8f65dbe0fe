"""`m2io ingest | ingest-status | search`: documents into a collection, and retrieval from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.cli.ui import collection_name, console, errors, fail, ingest_corpus, print_ingest_summary


def ingest(
    path: Annotated[
        Path, typer.Argument(help="a Markdown corpus folder, an MRAMG-Bench release, or one .md/.html file")
    ],
    collection: Annotated[str, typer.Option(help="the collection to ingest into (created if new)")],
    model: Annotated[str | None, typer.Option(help="embedding model: Hugging Face id or local path")] = None,
    wait: Annotated[bool, typer.Option(help="follow the retriever workers until every document is indexed")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait without any progress before giving up")] = 300.0,
) -> None:
    """Ingest documents with images: images verified and stored in S3, documents indexed by retriever workers."""
    from services.client import Client

    ingest_corpus(Client(), path, collection_name(collection), model, wait=wait, timeout=timeout)


def ingest_status(run_id: Annotated[str, typer.Argument(help="the ingest run id `m2io ingest` printed")]) -> None:
    """Show an ingest run: counts, and everything skipped or failed with its reason."""
    import uuid

    from services.client import Client

    try:
        parsed = uuid.UUID(run_id)
    except ValueError as error:
        raise fail(f"{run_id!r} is not an ingest run id") from error
    try:
        report = Client().ingest_report(parsed)
    except LookupError as error:
        raise fail(f"no ingest run {run_id}") from error
    print_ingest_summary(report)


def search(
    collection: Annotated[str, typer.Option(help="the collection to search")],
    text: Annotated[str | None, typer.Argument(help="the question (or use --questions)")] = None,
    questions: Annotated[Path | None, typer.Option(help="a JSONL file of {id, question} lines")] = None,
    top_k: Annotated[int, typer.Option(help="passages per question")] = 5,
    candidates: Annotated[int, typer.Option(help="candidate images per question")] = 12,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line per question")] = False,
) -> None:
    """Retrieve passages and candidate images for a question or a file of questions."""
    import json

    from services.common.db import session_scope
    from services.common.embedding import get_embedder
    from services.retriever.search import UnknownCollection, get_collection, retrieve

    if (text is None) == (questions is None):
        raise fail("give a question, or --questions FILE.jsonl (not both)")
    collection_name(collection)
    asked: list[tuple[str, str]] = []
    if questions is not None:
        if not questions.is_file():
            raise fail(f"{questions} does not exist" if not questions.exists() else f"{questions} is not a file")
        for number, raw in enumerate(questions.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                errors.print(f"[yellow]{questions} line {number} skipped: invalid UTF-8 at byte {error.start}[/yellow]")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                asked.append((str(record.get("id", number)), str(record["question"])))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                errors.print(f"[yellow]{questions} line {number} skipped: {error}[/yellow]")
    else:
        asked.append(("1", text))
    try:
        with session_scope() as session:
            found = get_collection(session, collection)
            embedder = get_embedder(found.embedding_model)
            for question_id, question in asked:
                result = retrieve(session, found, question, embedder, top_k=top_k, max_candidates=candidates)
                if as_json:
                    print(
                        json.dumps(
                            {
                                "id": question_id,
                                "question": question,
                                "documents": list(dict.fromkeys(p.doc_key for p in result.passages)),
                                "passages": [
                                    {
                                        "chunk_id": p.chunk_id,
                                        "doc_key": p.doc_key,
                                        "heading": p.heading,
                                        "score": p.score,
                                    }
                                    for p in result.passages
                                ],
                                "images": [
                                    {
                                        "source_name": c.source_name,
                                        "doc_key": c.doc_key,
                                        "score": c.score,
                                        "reasons": c.reasons,
                                    }
                                    for c in result.candidates
                                ],
                            },
                            ensure_ascii=False,
                        )
                    )
                    continue
                table = Table("#", "document", "section", "score", title=f"{question_id}: {question}")
                for rank, passage in enumerate(result.passages, 1):
                    table.add_row(str(rank), passage.doc_key, passage.heading or "", f"{passage.score:.4f}")
                console.print(table)
                images = Table("image", "document", "score", "why", title="candidate images")
                for candidate in result.candidates:
                    images.add_row(
                        candidate.source_name, candidate.doc_key, f"{candidate.score:.4f}", ", ".join(candidate.reasons)
                    )
                console.print(images)
    except (UnknownCollection, ValueError) as error:  # ValueError: top_k or candidates out of range
        raise fail(str(error)) from error
