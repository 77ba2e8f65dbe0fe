"""`m2io demo`: the whole system on embedded defaults, in a few minutes on a laptop CPU.

Brings the local cluster up (if it is not), ingests a corpus (the recipes shipped in
`infra/demo/recipes`, a copy of ../shared/corpora/recipes), submits its questions as one job,
follows it stage by stage, exports the HTML answers and prints a summary: answers, images placed,
metrics against the gold answers, and time per stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.cli.ui import console, errors, fail, follow, ingest_corpus, local_cluster, styled

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO_ROOT / "infra" / "demo" / "recipes"


def demo(
    corpus: Annotated[
        Path | None,
        typer.Option(help="a corpus folder with questions.jsonl (default: the recipes shipped in the repo)"),
    ] = None,
    collection: Annotated[str | None, typer.Option(help="collection name (default: demo-<corpus folder>)")] = None,
    limit: Annotated[int, typer.Option(help="questions to ask (0 = all)")] = 0,
    out: Annotated[Path, typer.Option(help="where the HTML answers go")] = Path("m2io-demo"),
    start: Annotated[bool, typer.Option(help="bring the local cluster up first if needed")] = True,
    stall_timeout: Annotated[float, typer.Option(help="give up after this long without progress")] = 300.0,
) -> None:
    """The whole system on embedded defaults: cluster up, ingest a corpus, answer its questions, export, score."""
    try:
        run_demo(corpus=corpus, collection=collection, limit=limit, out=out, start=start, stall_timeout=stall_timeout)
    except (RuntimeError, ValueError, FileNotFoundError, LookupError) as error:
        raise fail(str(error)) from error


def run_demo(
    *,
    corpus: Path | None = None,
    collection: str | None = None,
    limit: int = 0,
    out: Path = Path("m2io-demo"),
    start: bool = True,
    stall_timeout: float = 300.0,
) -> dict:
    from services.client import Client
    from services.common.settings import get_settings
    from services.jobs.questions import read_questions

    corpus = Path(corpus or DEMO_CORPUS)
    questions_file = corpus / "questions.jsonl"
    if not questions_file.exists():
        raise FileNotFoundError(f"{questions_file} does not exist: a demo corpus needs its questions")
    collection = collection or f"demo-{corpus.name}"
    if start:
        errors.rule("1. local cluster")
        local_cluster().up(echo=errors.print)
        get_settings.cache_clear()  # `up` may just have written the cluster's URLs
    errors.rule(f"2. ingest {corpus} into {collection!r}")
    client = Client()
    ingest_corpus(client, corpus, collection, None, wait=True, timeout=stall_timeout)
    questions = read_questions(questions_file)
    if limit:
        questions = questions[:limit]
    errors.rule(f"3. answer {len(questions)} questions")
    job_id = client.submit(questions, collection, name=f"demo: {corpus.name}")
    errors.print(f"job {job_id}")
    final = follow(client, job_id, stall_timeout)
    errors.rule("4. export")
    exported = client.export(job_id, out)
    for warning in exported.warnings:
        errors.print(f"[yellow]{warning}[/yellow]")
    errors.rule("5. summary")
    report = client.evaluate([job_id])[0]
    summary = report["aggregate"]
    table = Table("", "value", title=f"demo job {job_id}: {final.state}")
    table.add_row("questions", str(final.total))
    table.add_row("answered", f"[green]{final.counts.get('succeeded', 0)}[/green]")
    table.add_row("failed", str(final.counts.get("failed", 0)))
    table.add_row("images placed", str(summary.get("images_placed", 0)))
    from services.jobs.evaluate import ANSWER_METRICS, RETRIEVAL_METRICS

    for key in ANSWER_METRICS + RETRIEVAL_METRICS:
        value = summary.get(key)
        table.add_row(key.replace("_", " "), f"{value:.3f}" if value is not None else "-")
    table.add_row("wall time", f"{final.elapsed_s or 0:.1f} s ({final.questions_per_s or 0:.2f} questions/s)")
    console.print(table)
    stages = Table("stage", "answers", "p50", "p99", "mean", "total busy", title="time per stage")
    for stage in final.stages:
        busy = (stage.mean_s or 0) * stage.succeeded
        stages.add_row(
            stage.stage,
            str(stage.succeeded),
            f"{(stage.p50_s or 0) * 1000:.0f} ms",
            f"{(stage.p99_s or 0) * 1000:.0f} ms",
            f"{(stage.mean_s or 0) * 1000:.0f} ms",
            f"{busy:.1f} s",
        )
    console.print(stages)
    for failure in final.failures[:10]:
        errors.print(f"[yellow]{failure.id} ({failure.stage}): {failure.error}[/yellow]")
    console.print(f"answers: [bold]{exported.index.resolve()}[/bold]  ({styled(final.state)})")
    if final.state == "failed":
        raise RuntimeError(f"every question of job {job_id} failed: see `m2io status {job_id}`")
    return {"job_id": str(job_id), "status": final, "report": report, "export": exported}
