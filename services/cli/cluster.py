"""`m2io up | ps | down | smoke | worker | migrate`: the local cluster and its processes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from services.cli.ui import console, fail, local_cluster
from services.common.queues import Stage
from services.common.settings import get_settings, load_settings

HEALTH_STYLE = {
    "healthy": "green",
    "ready": "green",
    "external": "cyan",
    "starting": "yellow",
    "warming": "yellow",
    "unhealthy": "yellow",
    "dead": "red",
    "absent": "dim",
}


def up(
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="worker processes of each answer stage (default: M2IO_WORKER_CONCURRENCY, else from the cores)", min=1
        ),
    ] = None,
    dashboard: Annotated[bool, typer.Option(help="start the dashboard too")] = True,
) -> None:
    """Start the local cluster: PostgreSQL+pgvector, Redis, S3, migrations, one worker per stage."""
    from infra.cluster import ClusterError
    from infra.processes import PortTaken

    try:
        local_cluster(worker_concurrency=concurrency, start_dashboard=dashboard).up(echo=console.print)
    except (ClusterError, PortTaken) as error:
        raise fail(str(error)) from error


def ps(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Show every process of the local cluster with pid, port and health."""
    import json

    rows = local_cluster().ps()
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


def down() -> None:
    """Stop every process of the local cluster (workers finish or re-queue their task first)."""
    local_cluster().down(echo=console.print)


def migrate_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Upgrade the database schema (default: to the newest revision)."""
    from infra.migrate import upgrade

    console.print(f"database at revision {upgrade(get_settings().require_database_url(), revision)}")


def migrate_downgrade(revision: Annotated[str, typer.Argument(help="target revision; base = empty")]) -> None:
    """Downgrade the database schema (`base` removes every m2io table)."""
    from infra.migrate import downgrade

    console.print(f"database at revision {downgrade(get_settings().require_database_url(), revision)}")


def migrate_current() -> None:
    """Print the database's current schema revision."""
    from infra.migrate import current_revision

    console.print(current_revision(get_settings().require_database_url()) or "empty (no revision)")


def migrate_default(ctx: typer.Context) -> None:
    """`m2io migrate` alone upgrades to the newest revision (what compose's migrate service runs)."""
    if ctx.invoked_subcommand is None:
        migrate_upgrade("head")


def worker(
    stage: Annotated[Stage, typer.Argument(help="the stage whose queue to consume")],
    concurrency: Annotated[int, typer.Option(help="processes")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run one stage worker in the foreground, consuming its own queue (to scale a stage by hand)."""
    from services.common.celery_app import worker_argv

    argv = worker_argv(stage.queue, f"{stage.value}@%h", concurrency, loglevel)
    os.execv(sys.executable, argv)


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
            local_cluster().up(echo=console.print)
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


# No subcommand: upgrade to head (what compose's one-shot migrate service runs).
migrate_app = typer.Typer(help="Database schema (Alembic): upgrade (the default), downgrade, current revision.")
migrate_app.command("upgrade")(migrate_upgrade)
migrate_app.command("downgrade")(migrate_downgrade)
migrate_app.command("current")(migrate_current)
migrate_app.callback(invoke_without_command=True)(migrate_default)
