"""`m2io`: the command line of the local cluster and of every stage."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.common.queues import Stage
from services.common.settings import get_settings, load_settings

app = typer.Typer(
    help="m2io: multimodal RAG whose answers put the right images at the right places.",
    no_args_is_help=True,
    add_completion=False,
)
# No subcommand: upgrade to head (what compose's one-shot migrate service runs).
migrate_app = typer.Typer(help="Database schema (Alembic): upgrade (the default), downgrade, current revision.")
app.add_typer(migrate_app, name="migrate")
console = Console()
errors = Console(stderr=True)

HEALTH_STYLE = {"healthy": "green", "external": "cyan", "unhealthy": "yellow", "dead": "red", "absent": "dim"}


def cluster(**kwargs):
    from infra.cluster import LocalCluster

    return LocalCluster(load_settings(), **kwargs)


def fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command()
def up(
    concurrency: Annotated[int, typer.Option(help="worker processes per stage")] = 1,
    dashboard: Annotated[bool, typer.Option(help="start the dashboard too")] = True,
) -> None:
    """Start the local cluster: PostgreSQL+pgvector, Redis, S3, migrations, one worker per stage."""
    from infra.cluster import ClusterError
    from infra.processes import PortTaken

    try:
        cluster(worker_concurrency=concurrency, start_dashboard=dashboard).up(echo=console.print)
    except (ClusterError, PortTaken) as error:
        raise fail(str(error)) from error


@app.command()
def ps(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Show every process of the local cluster with pid, port and health."""
    import json

    rows = cluster().ps()
    if as_json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        table = Table("process", "pid", "port", "health", "detail")
        for row in rows:
            style = HEALTH_STYLE.get(row.state, "")
            table.add_row(
                row.name,
                str(row.pid or "-"),
                str(row.port or "-"),
                f"[{style}]{row.state}[/{style}]",
                row.detail,
            )
        console.print(table)
    if any(row.state in ("dead", "unhealthy") for row in rows):
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop every process of the local cluster (workers finish or re-queue their task first)."""
    cluster().down(echo=console.print)


@migrate_app.command("upgrade")
def migrate_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Upgrade the database schema (default: to the newest revision)."""
    from infra.migrate import upgrade

    console.print(f"database at revision {upgrade(get_settings().require_database_url(), revision)}")


@migrate_app.command("downgrade")
def migrate_downgrade(revision: Annotated[str, typer.Argument(help="target revision; base = empty")]) -> None:
    """Downgrade the database schema (`base` removes every m2io table)."""
    from infra.migrate import downgrade

    console.print(f"database at revision {downgrade(get_settings().require_database_url(), revision)}")


@migrate_app.command("current")
def migrate_current() -> None:
    """Print the database's current schema revision."""
    from infra.migrate import current_revision

    console.print(current_revision(get_settings().require_database_url()) or "empty (no revision)")


@migrate_app.callback(invoke_without_command=True)
def migrate_default(ctx: typer.Context) -> None:
    """`m2io migrate` alone upgrades to the newest revision (what compose's migrate service runs)."""
    if ctx.invoked_subcommand is None:
        migrate_upgrade("head")


@app.command()
def worker(
    stage: Annotated[Stage, typer.Argument(help="the stage whose queue to consume")],
    concurrency: Annotated[int, typer.Option(help="processes")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run one stage worker in the foreground, consuming its own queue (to scale a stage by hand)."""
    from services.common.celery_app import worker_argv

    argv = worker_argv(stage.queue, f"{stage.value}@%h", concurrency, loglevel)
    os.execv(sys.executable, argv)


@app.command()
def smoke(
    start: Annotated[bool, typer.Option(help="bring the local cluster up first if needed")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the workers")] = 90.0,
) -> None:
    """Check the cluster: a message through every queue, an image through S3, a vector through pgvector."""
    from infra.cluster import ClusterError
    from infra.processes import PortTaken
    from services.common.smoke import run_smoke_check
    from services.common.storage import ObjectStore

    if start:
        try:
            cluster().up(echo=console.print)
        except (ClusterError, PortTaken) as error:
            raise fail(str(error)) from error
    settings = load_settings()
    get_settings.cache_clear()  # `up` may just have written the cluster's URLs
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    results = run_smoke_check(store, timeout=timeout)
    table = Table("check", "result", "detail", "seconds")
    for result in results:
        mark = "[green]ok[/green]" if result.ok else "[red]FAILED[/red]"
        table.add_row(result.check, mark, result.detail, f"{result.seconds:.2f}" if result.seconds is not None else "")
    console.print(table)
    if not all(result.ok for result in results):
        raise fail("some checks failed; `m2io ps` shows the processes, logs are in the state dir")
    console.print(f"[green]all {len(results)} checks passed[/green]")


@app.command()
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
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.common.embedding import DEFAULT_EMBEDDING_MODEL
    from services.common.health import online_workers, workers_of
    from services.common.storage import ObjectStore
    from services.retriever.ingest import CollectionModelMismatch
    from services.retriever.ingest_runs import check_collection_model, enqueue, finish_run, item_counts, stage_run

    settings = get_settings()
    model = model or settings.embedding_model or DEFAULT_EMBEDDING_MODEL
    try:
        check_collection_model(collection, model)
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        with Progress(
            TextColumn("reading and storing images"),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=errors,
            transient=True,
        ) as progress:
            reading = progress.add_task("read", total=None)
            staged = stage_run(path, collection, model, store, on_document=lambda _: progress.advance(reading))
    except (CollectionModelMismatch, FileNotFoundError, ValueError) as error:
        raise fail(str(error)) from error
    enqueue(staged)
    errors.print(f"ingest run {staged.run_id}: {staged.documents} documents queued in {len(staged.batches)} batches")
    if wait and staged.documents:
        last_done, last_change, warned = -1, time.monotonic(), False
        with Progress(
            TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=errors
        ) as progress:
            bar = progress.add_task("index", total=staged.documents)
            while True:
                counts = item_counts(staged.run_id)
                done = staged.documents - counts.get("pending", 0)
                progress.update(bar, completed=done)
                if done >= staged.documents:
                    break
                if done != last_done:
                    last_done, last_change = done, time.monotonic()
                elif time.monotonic() - last_change > 15 and not warned:
                    online, _ = online_workers(settings.redis_url)
                    if not workers_of(Stage.RETRIEVER, online):
                        errors.print(
                            "[yellow]no retriever worker is online: start one (`m2io up`, or "
                            "`m2io worker retriever`); documents wait in the queue[/yellow]"
                        )
                    warned = True
                if time.monotonic() - last_change > timeout:
                    errors.print(
                        f"[red]no progress for {timeout:.0f}s; the run goes on in the background "
                        f"(`m2io ingest-status {staged.run_id}`)[/red]"
                    )
                    break
                time.sleep(0.5)
    run = finish_run(staged.run_id) if wait else None
    print_ingest_summary(staged.run_id, run.status if run else "queued")


def print_ingest_summary(run_id, status: str) -> None:
    from sqlalchemy import select

    from services.common.db import session_scope
    from services.common.models import IngestItem

    with session_scope() as session:
        items = session.scalars(select(IngestItem).where(IngestItem.run_id == run_id).order_by(IngestItem.id)).all()
    by_status: dict[str, int] = {}
    for item in items:
        by_status[item.status] = by_status.get(item.status, 0) + 1
    documents = [item for item in items if item.doc_key is not None]
    table = Table(
        "documents",
        "ingested",
        "unchanged",
        "failed",
        "pending",
        "chunks",
        "images",
        "skipped inputs",
        title=f"ingest run {run_id}: {status}",
    )
    table.add_row(
        str(len(documents)),
        str(by_status.get("ingested", 0)),
        str(by_status.get("unchanged", 0)),
        str(by_status.get("failed", 0)),
        str(by_status.get("pending", 0)),
        str(sum(item.chunks for item in items)),
        str(sum(item.images for item in items)),
        str(by_status.get("skipped", 0)),
    )
    console.print(table)
    problems = [(item.what, item.reason) for item in items if item.status in ("skipped", "failed")]
    problems += [(item.doc_key, warning) for item in items for warning in item.warnings]
    if problems:
        skipped = Table("what", "reason", title="skipped (everything else went in)")
        for what, reason in problems:
            skipped.add_row(str(what), str(reason))
        console.print(skipped)
    print(run_id)


@app.command("ingest-status")
def ingest_status(run_id: Annotated[str, typer.Argument(help="the ingest run id `m2io ingest` printed")]) -> None:
    """Show an ingest run: counts, and everything skipped or failed with its reason."""
    import uuid

    from services.common.db import session_scope
    from services.common.models import IngestRun

    try:
        parsed = uuid.UUID(run_id)
    except ValueError as error:
        raise fail(f"{run_id!r} is not an ingest run id") from error
    with session_scope() as session:
        run = session.get(IngestRun, parsed)
        if run is None:
            raise fail(f"no ingest run {run_id}")
        status = run.status
    print_ingest_summary(parsed, status)


@app.command()
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
    asked: list[tuple[str, str]] = []
    if questions is not None:
        if not questions.exists():
            raise fail(f"{questions} does not exist")
        for number, line in enumerate(questions.read_text(encoding="utf-8").splitlines(), 1):
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
    except UnknownCollection as error:
        raise fail(str(error)) from error


def _register_job_commands() -> None:
    from services.jobs.commands import register
    from services.trainer.commands import register as register_trainer

    register(app)
    register_trainer(app)


_register_job_commands()

if __name__ == "__main__":
    app()
