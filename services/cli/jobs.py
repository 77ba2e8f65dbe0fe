"""`m2io submit | status | export | retry | cancel | eval`: batch jobs from the command line.

Everything goes through `services.client`, the same client the dashboard uses. Machine-readable
results go to stdout (a job id alone on the last line, `--json`); progress and tables for people go
to stderr or are rich tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.cli.ui import console, errors, fail, follow, styled


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


GeneratorOpt = Annotated[
    str | None, typer.Option(help="generator backend: extractive | local[:model] | openai[:model] (default: workers')")
]
InserterOpt = Annotated[
    str | None, typer.Option(help="inserter backend: rule | llm[:model] | checkpoint:<name> (default: workers')")
]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="passages retrieved per question")]


def submit(
    questions: Annotated[
        Path, typer.Argument(help="questions .jsonl: `id` and `question` per line, gold fields optional")
    ],
    collection: Annotated[
        list[str],
        typer.Option(help="the collection to answer from; repeat for several (routed per question), or `all`"),
    ],
    generator: GeneratorOpt = None,
    inserter: InserterOpt = None,
    top_k: TopKOpt = None,
    candidates: Annotated[int | None, typer.Option(help="candidate images offered to the inserter")] = None,
    name: Annotated[str | None, typer.Option(help="a label for the job (default: the file name)")] = None,
    wait: Annotated[bool, typer.Option(help="show progress per stage until the job ends")] = False,
    stall_timeout: Annotated[float, typer.Option(help="with --wait: give up after this long without progress")] = 300.0,
) -> None:
    """Submit a batch of questions; prints the job id alone on the last line of stdout."""
    from services.client import Client, JobError
    from services.jobs.commands import EnqueueError, job_config

    client = Client()
    try:
        config = job_config(collection, generator=generator, inserter=inserter, top_k=top_k, candidates=candidates)
        job_id = client.submit(questions, config, name=name)
    except EnqueueError as error:
        errors.print(f"[red]error:[/red] {error}")
        print(error.job_id)
        raise typer.Exit(1) from error
    except (JobError, FileNotFoundError, IsADirectoryError, ValueError) as error:
        raise fail(str(error)) from error
    status_now = client.status(job_id)
    bad = [f for f in status_now.failures if f.stage == "input"]
    errors.print(f"job {job_id}: {status_now.total} questions queued" + (f", {len(bad)} refused" if bad else ""))
    for failure in bad[:20]:
        errors.print(f"[yellow]  {failure.id}: {failure.error}[/yellow]")
    if len(bad) > 20:
        errors.print(f"[yellow]  ... and {len(bad) - 20} more (`m2io status {job_id}`)[/yellow]")
    if wait:
        final = follow(client, job_id, stall_timeout)
        errors.print(
            f"job {job_id}: {styled(final.state)}, {final.counts.get('succeeded', 0)} answered, "
            f"{final.counts.get('failed', 0)} failed in {final.elapsed_s:.1f}s"
        )
    print(job_id)


def status(
    job: Annotated[str | None, typer.Argument(help="a job id (all jobs when omitted)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    limit: Annotated[int, typer.Option(help="jobs listed")] = 30,
) -> None:
    """All jobs, or one job: per-stage counts, failures with their messages, timings."""
    from services.client import Client, UnknownJob

    client = Client()
    if job is None:
        jobs = client.jobs(limit=limit)
        if as_json:
            print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
            return
        table = Table("job", "name", "collection", "state", "answered", "failed", "total", "age", title="jobs")
        for entry in jobs:
            age = time.time() - entry.created_at.timestamp()
            table.add_row(
                str(entry.id),
                entry.name or "",
                entry.collection or "?",
                styled(entry.state),
                str(entry.counts.get("succeeded", 0)),
                str(entry.counts.get("failed", 0)),
                str(entry.total),
                f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h",
            )
        console.print(table)
        return
    try:
        found = client.status(job)
    except UnknownJob as error:
        raise fail(str(error)) from error
    if as_json:
        print(json.dumps(found.model_dump(mode="json"), indent=2))
        return
    print_status(found)
    if found.state == "failed":
        raise typer.Exit(1)


def print_status(found) -> None:
    console.print(
        f"job {found.id} ({found.name or 'unnamed'}) on {found.collection}: {styled(found.state)} — "
        f"{found.counts.get('succeeded', 0)}/{found.total} answered, {found.counts.get('failed', 0)} failed, "
        f"{found.counts.get('cancelled', 0)} cancelled; {found.elapsed_s or 0:.1f}s"
        + (f", {found.questions_per_s:.2f} questions/s" if found.questions_per_s else "")
    )
    table = Table(
        "stage",
        "done",
        "running",
        "waiting for redelivery",
        "pending",
        "failed",
        "redelivered",
        "p50",
        "p99",
        "queue wait p50",
        title="stages",
    )
    for stage in found.stages:
        table.add_row(
            stage.stage,
            str(stage.succeeded),
            str(stage.running + stage.retrying),
            f"[yellow]{stage.waiting}[/yellow]" if stage.waiting else "0",
            str(stage.pending),
            str(stage.failed),
            str(stage.lost),
            seconds(stage.p50_s),
            seconds(stage.p99_s),
            seconds(stage.wait_p50_s),
        )
    console.print(table)
    if found.routing is not None:
        chosen = ", ".join(f"{name}: {count}" for name, count in found.routing.items()) or "nothing routed yet"
        console.print(f"routing (answered from): {chosen}; {found.follow_ups or 0} took a follow-up retrieval")
    waiting = [f"{stage.stage} ({stage.waiting})" for stage in found.stages if stage.waiting]
    if waiting:
        console.print(
            f"[yellow]waiting for redelivery: {', '.join(waiting)}: their worker stopped; their messages go "
            "back to the queue within seconds, for the next worker of the stage[/yellow]"
        )
    if found.end_to_end_p50_s is not None:
        console.print(
            f"end to end per question: p50 {seconds(found.end_to_end_p50_s)}, p99 {seconds(found.end_to_end_p99_s)}"
        )
    if found.failures:
        failures = Table("question", "line", "stage", "error", title=f"failures ({len(found.failures)})")
        for failure in found.failures[:50]:
            failures.add_row(failure.id, str(failure.line or ""), failure.stage, failure.error[:300])
        console.print(failures)


def export(
    job: Annotated[str, typer.Argument(help="the job id")],
    out: Annotated[Path, typer.Option(help="folder to write <id>.md/.html/.json and index.html into")],
) -> None:
    """Write every answer of a job as Markdown, HTML and JSON, with an index.html linking them."""
    from services.client import Client, UnknownJob

    try:
        result = Client().export(job, out)
    except (UnknownJob, ValueError) as error:  # ValueError: --out is a file
        raise fail(str(error)) from error
    for warning in result.warnings:
        errors.print(f"[yellow]{warning}[/yellow]")
    errors.print(
        f"{result.questions} questions ({result.answered} answered), {result.images_written} images -> {result.out_dir}"
    )
    print(result.index)


def retry(job: Annotated[str, typer.Argument(help="the job id")]) -> None:
    """Re-run a job's failed (and cancelled) queries from the stage that failed."""
    from services.client import Client, JobError, UnknownJob

    try:
        report = Client().retry(job)
    except (UnknownJob, JobError) as error:
        raise fail(str(error)) from error
    total = sum(report.requeued.values())
    where = ", ".join(f"{n} at {stage}" for stage, n in report.requeued.items()) or "nothing to retry"
    console.print(f"job {report.job_id}: {total} queries requeued ({where})")
    for failure in report.not_retryable:
        errors.print(f"[yellow]not retried, fix the questions file: {failure.id}: {failure.error}[/yellow]")


def cancel(job: Annotated[str, typer.Argument(help="the job id")]) -> None:
    """Cancel a job: its unfinished queries stop after the stage they are in."""
    from services.client import Client, UnknownJob

    try:
        count = Client().cancel(job)
    except UnknownJob as error:
        raise fail(str(error)) from error
    console.print(f"job {job}: {count} unfinished queries cancelled (`m2io retry {job}` resumes them)")


def print_eval_tables(reports: list[dict]) -> None:
    from services.jobs.evaluate import ANSWER_METRICS, RETRIEVAL_METRICS

    columns = ANSWER_METRICS + RETRIEVAL_METRICS
    for collection in sorted({r["collection"] or "?" for r in reports}):
        table = Table("backends", "job", "scored", "failed", *[c.replace("_", " ") for c in columns], title=collection)
        for report in (r for r in reports if (r["collection"] or "?") == collection):
            summary = report["aggregate"]
            table.add_row(
                report["backends"],
                report["job_id"][:8],
                str(report["scored"]),
                str(summary.get("failed", 0)),
                *[f"{summary[c]:.3f}" if summary.get(c) is not None else "-" for c in columns],
            )
        console.print(table)


def evaluate(
    questions: Annotated[
        Path | None, typer.Argument(help="questions .jsonl with gold fields (omit with --job)")
    ] = None,
    collection: Annotated[
        list[str] | None, typer.Option(help="the collection(s) to answer from: repeat for several, or `all`")
    ] = None,
    generator: Annotated[list[str] | None, typer.Option(help="generator backend(s); repeat to compare")] = None,
    inserter: Annotated[list[str] | None, typer.Option(help="inserter backend(s); repeat to compare")] = None,
    top_k: TopKOpt = None,
    job: Annotated[list[str] | None, typer.Option(help="score finished job(s) instead of running new ones")] = None,
    out: Annotated[Path, typer.Option(help="REPORT.json to write (the plot goes next to it as .png)")] = Path(
        "m2io-eval.json"
    ),
    stall_timeout: Annotated[float, typer.Option(help="give up waiting after this long without progress")] = 600.0,
) -> None:
    """Score answers against the gold fields: a job per backend pair, or finished jobs (--job)."""
    from services.client import Client, JobError, UnknownJob
    from services.jobs.commands import job_config

    client = Client()
    job_ids: list[str] = list(job or [])
    if not job_ids:
        if questions is None or not collection:
            raise fail("give QUESTIONS.jsonl and --collection, or --job JOB")
        for gen in generator or [None]:
            for ins in inserter or [None]:
                try:
                    job_id = client.submit(questions, job_config(collection, generator=gen, inserter=ins, top_k=top_k))
                except (JobError, FileNotFoundError, IsADirectoryError, ValueError) as error:
                    raise fail(str(error)) from error
                errors.print(f"job {job_id}: generator {gen or 'default'}, inserter {ins or 'default'}")
                job_ids.append(str(job_id))
        for job_id in job_ids:
            final = follow(client, job_id, stall_timeout)
            if not final.done:
                raise fail(f"job {job_id} did not finish; score it later with `m2io eval --job {job_id}`")
    try:
        reports = client.evaluate(job_ids, out)
    except UnknownJob as error:
        raise fail(str(error)) from error
    print_eval_tables(reports)
    errors.print(f"report: {out}, plot: {out.with_suffix('.png')}")
    print(out)
