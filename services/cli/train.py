"""`m2io train-data | train | train-status | train-cancel | models`: the trainer from the command line."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.cli.ui import console, errors, fail, styled


def parse_run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError as error:
        raise fail(f"{text!r} is not a training run id") from error


def train_data(
    collection: Annotated[str, typer.Option(help="an ingested collection")],
    out: Annotated[Path, typer.Option(help="folder for train.jsonl, val.jsonl and summary.json")],
    val_fraction: Annotated[float, typer.Option(help="share of documents held out for validation")] = 0.2,
    seed: Annotated[int, typer.Option(help="seed of the split and the candidates' order")] = 0,
) -> None:
    """Inserter training examples from a collection: passages with their images' original places as gold."""
    from services.trainer.data import build_examples, write_examples

    try:
        report = build_examples(collection, val_fraction=val_fraction, seed=seed)
    except LookupError as error:
        raise fail(str(error)) from error
    paths = write_examples(report, out)
    summary = report.summary()
    errors.print(
        f"{summary['examples']} examples ({summary['train']} train from {summary['train_documents']} documents, "
        f"{summary['val']} val from {summary['val_documents']}): {summary['gold_images']} gold images, "
        f"{summary['distractors']} distractors"
    )
    for reason, count in summary["skipped"].items():
        errors.print(f"[yellow]  skipped {count}: {reason}[/yellow]")
    if not report.examples:
        raise fail(f"collection {collection!r} yields no examples (no passage with a locatable image)")
    for name in ("train", "val"):
        print(paths[name])


def train(
    collection: Annotated[str, typer.Option(help="the collection whose documents teach the inserter")],
    base: Annotated[
        str | None, typer.Option(help="base model: hub id (cached), folder, or the bundled SmolLM2")
    ] = None,
    name: Annotated[str | None, typer.Option(help="registered model name (serve with checkpoint:<name>)")] = None,
    steps: Annotated[int | None, typer.Option(help="GRPO steps")] = None,
    sft_steps: Annotated[int | None, typer.Option(help="supervised warm-up steps (0: none)")] = None,
    num_generations: Annotated[int | None, typer.Option(help="completions per prompt (the GRPO group)")] = None,
    prompts_per_step: Annotated[int | None, typer.Option(help="prompts per GRPO step")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="GRPO learning rate")] = None,
    beta: Annotated[float | None, typer.Option(help="KL weight against the warm-up model")] = None,
    lora: Annotated[bool, typer.Option(help="GRPO trains LoRA adapters (merged before saving)")] = True,
    lora_top_layers: Annotated[
        int | None, typer.Option(help="adapters on the top N layers only (0: all); the backward pass stops there")
    ] = None,
    sft_lora: Annotated[bool, typer.Option(help="LoRA in the warm-up too (default: full fine-tuning)")] = False,
    sft_learning_rate: Annotated[float | None, typer.Option(help="warm-up learning rate")] = None,
    sft_top_layers: Annotated[
        int | None,
        typer.Option(help="the warm-up trains the top N layers only (0: every weight); the backward pass stops there"),
    ] = None,
    balance_plans: Annotated[
        bool, typer.Option(help="plans of 0, 1, 2, 3+ images weigh alike in training (rarer ones repeated)")
    ] = False,
    max_completion_length: Annotated[int | None, typer.Option(help="tokens per sampled plan")] = None,
    max_train_examples: Annotated[int | None, typer.Option(help="use at most this many training examples")] = None,
    eval_examples: Annotated[int | None, typer.Option(help="validation examples scored after each phase")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="GRPO steps between checkpoints to S3")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    wait: Annotated[bool, typer.Option(help="follow the run until it ends")] = False,
) -> None:
    """Queue a training run on the `trainer` queue: warm-up, GRPO, checkpoints to S3, a registered model.
    Prints the run id alone on the last line of stdout."""
    from services.trainer.core import TrainConfig
    from services.trainer.runs import create_run, enqueue_run

    given = {
        "base_model": base,
        "name": name,
        "steps": steps,
        "sft_steps": sft_steps,
        "num_generations": num_generations,
        "prompts_per_step": prompts_per_step,
        "learning_rate": learning_rate,
        "beta": beta,
        "lora_top_layers": lora_top_layers,
        "sft_learning_rate": sft_learning_rate,
        "sft_top_layers": sft_top_layers,
        "max_completion_length": max_completion_length,
        "max_train_examples": max_train_examples,
        "eval_examples": eval_examples,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
    }
    try:
        config = TrainConfig.from_dict(
            {
                "collection": collection,
                "lora": lora,
                "sft_lora": sft_lora,
                "balance_plans": balance_plans,
                **{k: v for k, v in given.items() if v is not None},
            }
        )
        run_id = create_run(config)
    except (ValueError, LookupError) as error:
        raise fail(str(error)) from error
    try:
        enqueue_run(run_id)
    except Exception as error:
        errors.print(f"[red]error:[/red] run {run_id} could not be queued: {error}")
        print(run_id)
        raise typer.Exit(1) from error
    errors.print(f"training run {run_id} queued on the trainer queue")
    if wait:
        final = follow_run(run_id)
        if final != "succeeded":
            print(run_id)
            raise typer.Exit(1)
    print(run_id)


def run_row(run_id: uuid.UUID):
    from services.common.db import session_scope
    from services.common.models import TrainingRun

    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        if run is not None:
            session.expunge(run)
        return run


def follow_run(run_id: uuid.UUID, poll_s: float = 2.0) -> str:
    """Print each new step's metrics until the run ends; returns its status."""
    from services.trainer.runs import FINISHED, run_steps

    shown = 0
    while True:
        run = run_row(run_id)
        steps = run_steps(run_id)
        for phase, step, metrics in steps[shown:]:
            errors.print(f"{phase:>5} {step:>4}  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        shown = len(steps)
        if run.status in FINISHED:
            errors.print(f"run {run_id}: {styled(run.status)}" + (f": {run.error}" if run.error else ""))
            return run.status
        time.sleep(poll_s)


def train_status(
    run: Annotated[str | None, typer.Argument(help="a training run id (all runs when omitted)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Training runs, or one run: status, heartbeat, last checkpoint, error, metrics of its last steps."""
    from sqlalchemy import select

    from services.common.db import session_scope
    from services.common.models import TrainingRun
    from services.trainer.runs import run_steps

    if run is None:
        with session_scope() as session:
            rows = session.scalars(select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(30)).all()
            listed = [
                {
                    "run": str(r.id),
                    "status": r.status,
                    "collection": r.config.get("collection"),
                    "model": r.config.get("name"),
                    "heartbeat": r.heartbeat_at.isoformat() if r.heartbeat_at else None,
                    "error": r.error,
                }
                for r in rows
            ]
        if as_json:
            print(json.dumps(listed, indent=2))
            return
        table = Table("run", "status", "collection", "model", "heartbeat", "error")
        for item in listed:
            table.add_row(
                item["run"],
                styled(item["status"]),
                item["collection"] or "",
                item["model"] or "",
                item["heartbeat"] or "",
                (item["error"] or "")[:80],
            )
        console.print(table)
        return
    run_id = parse_run_id(run)
    found = run_row(run_id)
    if found is None:
        raise fail(f"no training run {run_id}")
    steps = run_steps(run_id)
    detail = {
        "run": str(found.id),
        "status": found.status,
        "config": found.config,
        "worker": found.worker,
        "attempts": found.attempts,
        "heartbeat": found.heartbeat_at.isoformat() if found.heartbeat_at else None,
        "last_checkpoint": found.last_checkpoint_key,
        "error": found.error,
        "steps": [{"phase": p, "step": s, **m} for p, s, m in steps],
    }
    if as_json:
        print(json.dumps(detail, indent=2, default=str))
        return
    console.print(f"run {found.id}: {styled(found.status)} (worker {found.worker or '-'}, attempts {found.attempts})")
    console.print(f"heartbeat {detail['heartbeat'] or '-'}; last checkpoint {found.last_checkpoint_key or '-'}")
    if found.error:
        console.print(f"[red]{found.error}[/red]")
    for phase, step, metrics in steps[-10:]:
        console.print(f"{phase:>5} {step:>4}  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


def train_cancel(run: Annotated[str, typer.Argument(help="the training run id")]) -> None:
    """Cancel a training run: a queued one now, a running one after its current step (its last checkpoint stays)."""
    from services.trainer.runs import RunNotFound, request_cancel

    try:
        print(request_cancel(parse_run_id(run)))
    except RunNotFound as error:
        raise fail(str(error)) from error


def models() -> None:
    """Registered inserter models (serve one with `--inserter checkpoint:<name>`)."""
    from sqlalchemy import select

    from services.common.db import session_scope
    from services.common.models import RegisteredModel

    with session_scope() as session:
        rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.created_at.desc())).all()
        table = Table("name", "kind", "base model", "checkpoint", "training run", "metrics")
        for m in rows:
            table.add_row(
                m.name,
                m.kind,
                m.base_model or "",
                m.s3_prefix,
                str(m.training_run_id or ""),
                ", ".join(f"{k}={v}" for k, v in (m.meta or {}).items())[:120],
            )
    console.print(table)
