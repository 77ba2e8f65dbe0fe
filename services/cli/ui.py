"""What every `m2io` command shares: the two consoles, `fail`, `styled`, the local cluster, and
following a job or an ingest run on stderr.

Machine-readable results go to stdout (an id alone on the last line, `--json`); progress and
messages for people go to stderr; tables are rich tables on stdout.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table

console = Console()
errors = Console(stderr=True)

STATE_STYLE = {
    "succeeded": "green",
    "partial": "yellow",
    "running": "cyan",
    "queued": "cyan",
    "failed": "red",
    "cancelled": "magenta",
}
WORKER_CHECK_S = 15  # seconds without progress before checking that a worker is online at all


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; the caller raises the returned Exit."""
    errors.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def without_secret(url: str) -> str:
    """A server URL as it may be printed: scheme, host, port and path, no user or password.

    >>> without_secret("redis://:s3cret@127.0.0.1:6390/0")
    'redis://127.0.0.1:6390/0'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def server_error_types() -> tuple[type[BaseException], ...]:
    """The errors of the Postgres, Redis and S3 clients that `server_error` explains. Imported when an
    error is raised, not before: the CLI starts without loading any client library."""
    import redis.exceptions
    import sqlalchemy.exc
    import urllib3.exceptions
    from kombu.exceptions import OperationalError as BrokerError
    from minio.error import S3Error

    return (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.DataError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        BrokerError,
        urllib3.exceptions.HTTPError,  # MaxRetryError, NewConnectionError, ProtocolError
        S3Error,
    )


def server_error(error: BaseException) -> str:
    """One of `server_error_types()` as one line naming the server and the fix."""
    import sqlalchemy.exc
    from minio.error import S3Error

    from services.common.settings import get_settings

    settings = get_settings()
    up = "start the local cluster with `m2io up`"
    if isinstance(error, sqlalchemy.exc.DataError):
        return f"PostgreSQL refused a value ({first_line(error)}): shorten or fix it"
    if isinstance(error, sqlalchemy.exc.SQLAlchemyError):
        where = without_secret(settings.database_url or "")
        return f"cannot reach PostgreSQL at {where} ({first_line(error)}): {up}, or set M2IO_DATABASE_URL"
    if isinstance(error, S3Error):
        return (
            f"S3 at {settings.s3_endpoint} refused the request ({error.code}: {error.message}): check "
            "M2IO_S3_ACCESS_KEY, M2IO_S3_SECRET_KEY and M2IO_S3_BUCKET (`m2io up` writes them)"
        )
    module = type(error).__module__
    if module.startswith("urllib3"):
        reason = first_line(getattr(error, "reason", None) or error).split(">: ", 1)[-1]  # no object repr
        return f"cannot reach S3 at {settings.s3_endpoint} ({reason}): {up}, or set M2IO_S3_ENDPOINT"
    where = without_secret(settings.redis_url)
    return f"cannot reach Redis at {where} ({first_line(error)}): {up}, or set M2IO_REDIS_URL"


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with the errors a user meets around it (a server down or refusing, a path that is
    not what it should be) printed as one `error:` line, exit code 1, no traceback. Anything else
    is a bug and keeps its traceback."""

    from services.common.settings import NotConfigured

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except NotConfigured as error:
            raise fail(str(error)) from None
        except server_error_types() as error:
            raise fail(server_error(error)) from None
        except OSError as error:  # a path that is a file, not a folder; no permission; ...
            where = f": {error.filename}" if error.filename else ""
            raise fail(f"{error.strerror or first_line(error)}{where}") from None

    return run


def collection_name(name: str) -> str:
    """A `--collection` as given, or the one-line error of an empty or oversized name."""
    from services.jobs.questions import MAX_COLLECTION_CHARS

    if not name.strip():
        raise fail("--collection is empty: name a collection (`m2io ingest` creates one)")
    if len(name) > MAX_COLLECTION_CHARS:
        raise fail(f"--collection is {len(name):,} characters (limit {MAX_COLLECTION_CHARS})")
    return name


def styled(state: str) -> str:
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


def local_cluster(**kwargs):
    """The local cluster of the settings (`m2io up`'s state dir and ports)."""
    from infra.cluster import LocalCluster
    from services.common.settings import load_settings

    return LocalCluster(load_settings(), **kwargs)


def without_workers(stages: list[str]) -> list[str]:
    """The stages (of those given, in order) that no online worker consumes: one broadcast ping."""
    from services.common.health import online_workers, workers_of
    from services.common.queues import Stage
    from services.common.settings import get_settings

    online, _ = online_workers(get_settings().redis_url)
    return [stage for stage in stages if not workers_of(Stage(stage), online)]


def follow(client, job_id, stall_timeout: float) -> object:
    """A live progress bar per stage on stderr until the job ends; returns its final status."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    warned: set[str] = set()
    last_check = [0.0]
    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        console=errors,
    ) as progress:
        bars: dict[str, int] = {}

        def update(status) -> None:
            runnable = status.total - sum(1 for f in status.failures if f.stage == "input")
            for stage in status.stages:
                if stage.stage not in bars:
                    bars[stage.stage] = progress.add_task(stage.stage, total=runnable, extra="")
                extra = []
                if stage.failed:
                    extra.append(f"[red]{stage.failed} failed[/red]")
                if stage.lost:
                    extra.append(f"[yellow]{stage.lost} redelivered[/yellow]")
                if stage.retrying:
                    extra.append(f"[yellow]{stage.retrying} retrying[/yellow]")
                if stage.waiting:
                    extra.append(f"[yellow]{stage.waiting} waiting for redelivery (worker gone)[/yellow]")
                progress.update(bars[stage.stage], completed=stage.succeeded + stage.failed, extra=" ".join(extra))
            if time.monotonic() - last_check[0] > WORKER_CHECK_S and not status.done:
                last_check[0] = time.monotonic()
                waiting = [s.stage for s in status.stages if s.pending + s.retrying and s.stage not in warned]
                for stage in without_workers(waiting) if waiting else []:
                    warned.add(stage)
                    errors.print(
                        f"[yellow]no {stage} worker is online; its queries wait in the queue "
                        f"(`m2io up`, or `m2io worker {stage}`)[/yellow]"
                    )

        try:
            return client.wait(job_id, stall_timeout=stall_timeout, on_update=update)
        except TimeoutError as error:
            errors.print(f"[red]{error}; the job goes on in the background (`m2io status {job_id}`)[/red]")
            return client.status(job_id)


def ingest_corpus(client, path: Path, collection: str, model: str | None, *, wait: bool, timeout: float) -> None:
    """`m2io ingest` through the client: read and stage the corpus (a spinner on stderr), queue it,
    follow the retriever workers (a bar on stderr), then the summary and the run id on stdout."""
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(
            TextColumn("reading and storing images"),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=errors,
            transient=True,
        ) as progress:
            reading = progress.add_task("read", total=None)
            staged = client.start_ingest(path, collection, model, on_document=lambda _: progress.advance(reading))
    except (FileNotFoundError, ValueError) as error:  # CollectionModelMismatch is a ValueError
        raise fail(str(error)) from error
    errors.print(f"ingest run {staged.run_id}: {staged.documents} documents queued in {len(staged.batches)} batches")
    if wait and staged.documents:
        follow_ingest(client, staged.run_id, staged.documents, timeout)
    status = client.finish_ingest(staged.run_id) if wait else "queued"
    print_ingest_summary(client.ingest_report(staged.run_id), status)


def follow_ingest(client, run_id, documents: int, stall_timeout: float) -> None:
    """A bar on stderr while the retriever workers index the run's documents."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    seen = {"done": -1, "since": time.monotonic(), "warned": False}
    columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=errors) as bar:
        task = bar.add_task("index", total=documents)

        def update(progress) -> None:
            done = documents - progress.pending
            bar.update(task, completed=done)
            if done >= documents:
                return
            if done != seen["done"]:
                seen.update(done=done, since=time.monotonic())
            elif time.monotonic() - seen["since"] > WORKER_CHECK_S and not seen["warned"]:
                if without_workers(["retriever"]):
                    errors.print(
                        "[yellow]no retriever worker is online: start one (`m2io up`, or "
                        "`m2io worker retriever`); documents wait in the queue[/yellow]"
                    )
                seen["warned"] = True

        try:
            client.wait_ingest(run_id, stall_timeout=stall_timeout, on_update=update)
        except TimeoutError:
            errors.print(
                f"[red]no progress for {stall_timeout:.0f}s; the run goes on in the background "
                f"(`m2io ingest-status {run_id}`)[/red]"
            )


def print_ingest_summary(report, status: str | None = None) -> None:
    """An ingest run's counts and everything skipped or failed with its reason; the run id last."""
    items = report.items
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
        title=f"ingest run {report.run_id}: {status or report.status}",
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
    print(report.run_id)
