"""Training runs in Postgres and S3: create, claim, heartbeat, per-step metrics, checkpoints, registration, the end.

A run is one row of `training_runs`. Its message (`{"run_id": ...}`) may be delivered more than once: the
broker gives an unacknowledged message back when its worker's heartbeat stops, or after the trainer's
visibility timeout (`M2IO_TRAINER_VISIBILITY_TIMEOUT_S`, the backstop), and a training run holds its message far
longer than a stage task does. So a worker *claims* the run before training:
  - queued                       -> it is ours: running;
  - running, heartbeat fresh     -> another worker has it: the message comes back later (it is what resumes the
                                    run should that worker die);
  - running, heartbeat stale     -> its worker died: ours, resumed from the last checkpoint;
  - succeeded, failed, cancelled -> nothing to do.
While it trains, a thread stamps `heartbeat_at` and reads a cancel request.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from services.common.db import session_scope
from services.common.models import Collection, RegisteredModel, TrainingRun, TrainingStep
from services.common.settings import get_settings
from services.common.storage import get_store
from services.inserter.prompt import PROMPT_VERSION
from services.trainer.core import Checkpoint, TrainConfig, TrainingHooks

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
CHECKPOINT_NAME = re.compile(r"(?P<phase>sft|grpo)-step-(?P<step>\d+)/?$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class RunNotFound(LookupError):
    pass


def now() -> datetime:
    return datetime.now(UTC)


def default_model_name(config: TrainConfig, run_id: uuid.UUID) -> str:
    return f"inserter-{re.sub(r'[^A-Za-z0-9._-]+', '-', config.collection)}-{str(run_id)[:8]}"


def create_run(config: TrainConfig) -> uuid.UUID:
    """A queued run after checking what can be checked before any training: the collection exists, the model
    name is valid and free."""
    config.validate()
    run_id = uuid.uuid4()
    name = config.name or default_model_name(config, run_id)
    if not MODEL_NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 200)")
    with session_scope() as session:
        collection = session.execute(
            select(Collection).where(Collection.name == config.collection)
        ).scalar_one_or_none()
        if collection is None:
            known = session.scalars(select(Collection.name).order_by(Collection.name)).all()
            raise LookupError(f"no collection {config.collection!r} (collections: {', '.join(known) or 'none'})")
        if session.execute(select(RegisteredModel.id).where(RegisteredModel.name == name)).first():
            raise ValueError(f"a model named {name!r} is already registered: choose another --name")
        session.add(
            TrainingRun(
                id=run_id, collection_id=collection.id, status="queued", config={**config.to_dict(), "name": name}
            )
        )
    return run_id


def enqueue_run(run_id: uuid.UUID) -> None:
    """Send the run's message; if the broker is unreachable the run is marked failed at once (and says so)."""
    from services.common.celery_app import app

    try:
        app.send_task("trainer.train", args=[{"run_id": str(run_id)}])
    except Exception as error:
        finish(run_id, "failed", f"could not enqueue the run (is Redis up?): {type(error).__name__}: {error}")
        raise


@dataclass
class Claim:
    outcome: str  # ours | busy | finished
    config: TrainConfig | None = None
    resume: Checkpoint | None = None  # set when taking over a run whose worker died
    checkpoint_key: str | None = None
    detail: str = ""


def locked_run(session, run_id: uuid.UUID) -> TrainingRun:
    """The run's row, locked for this transaction (claims and cancels must not interleave)."""
    run = session.execute(select(TrainingRun).where(TrainingRun.id == run_id).with_for_update()).scalar_one_or_none()
    if run is None:
        raise RunNotFound(f"no training run {run_id}")
    return run


def is_alive(run: TrainingRun) -> bool:
    """Running, and its worker stamped the heartbeat within `trainer_stale_after_s`."""
    stale_after = timedelta(seconds=get_settings().trainer_stale_after_s)
    return run.status == "running" and run.heartbeat_at is not None and now() - run.heartbeat_at < stale_after


def claim_run(run_id: uuid.UUID, worker: str) -> Claim:
    with session_scope() as session:
        run = locked_run(session, run_id)
        if run.status in FINISHED:
            return Claim("finished", detail=run.status)
        if is_alive(run):
            return Claim("busy", detail=f"held by {run.worker} (heartbeat {run.heartbeat_at.isoformat()})")
        config = TrainConfig.from_dict({k: v for k, v in run.config.items() if k != "name"})
        config.name = run.config.get("name")
        if run.cancel_requested_at is not None:
            run.status, run.finished_at = "cancelled", now()
            run.error = "cancelled before it ran" if run.attempts == 0 else "cancelled while its worker was lost"
            return Claim("finished", detail="cancelled")
        taking_over = run.status == "running"
        run.status, run.worker, run.attempts = "running", worker, run.attempts + 1
        run.heartbeat_at = now()
        run.started_at = run.started_at or now()
        checkpoint_key = run.last_checkpoint_key if taking_over else None
    claim = Claim("ours", config=config, checkpoint_key=checkpoint_key)
    if taking_over:
        claim.detail = f"resumed from {checkpoint_key or 'the start'} (its previous worker stopped heart-beating)"
    return claim


class Heartbeat:
    """Stamps the run every `trainer_heartbeat_s` from a thread; notices a cancel request or a takeover."""

    def __init__(self, run_id: uuid.UUID, worker: str):
        self.run_id, self.worker = run_id, worker
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def beat(self) -> None:
        with session_scope() as session:
            row = session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == self.run_id, TrainingRun.worker == self.worker)
                .values(heartbeat_at=now())
                .returning(TrainingRun.cancel_requested_at)
            ).first()
        if row is None:
            self.stop_reason = "another worker took the run over (this one missed its heartbeats)"
        elif row[0] is not None:
            self.stop_reason = "cancelled by request"

    def _loop(self) -> None:
        interval = get_settings().trainer_heartbeat_s
        while not self._stop.wait(interval):
            try:
                self.beat()
            except (SQLAlchemyError, OSError) as error:  # a database blip must not kill training; the next beat may
                log.warning("training run %s: heartbeat failed: %s: %s", self.run_id, type(error).__name__, error)


def checkpoint_prefix(run_id: uuid.UUID, checkpoint: Checkpoint) -> str:
    return f"training/{run_id}/{checkpoint.phase}-step-{checkpoint.step:05d}/"


def download_folder(prefix: str, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    count = get_store().download_prefix(prefix, folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {prefix} holds {count} files but no config.json")
    return folder


def resume_point(checkpoint_key: str | None, work_dir: Path) -> Checkpoint | None:
    """The checkpoint a taken-over run continues from, downloaded (None: start over)."""
    if not checkpoint_key:
        return None
    match = CHECKPOINT_NAME.search(checkpoint_key)
    if match is None:
        return None
    folder = download_folder(checkpoint_key, work_dir / "resume")
    return Checkpoint(match["phase"], int(match["step"]), folder)


class RunHooks(TrainingHooks):
    """Metrics to `training_steps`, checkpoints to S3 (the latest kept), stop on cancel or takeover."""

    def __init__(self, run_id: uuid.UUID, heartbeat: Heartbeat):
        self.run_id, self.heartbeat = run_id, heartbeat
        self.last_checkpoint: Checkpoint | None = None

    def on_metrics(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        record_step(self.run_id, phase, step, metrics)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        prefix = checkpoint_prefix(self.run_id, checkpoint)
        files = get_store().upload_folder(checkpoint.folder, prefix)
        with session_scope() as session:
            run = session.get(TrainingRun, self.run_id)
            previous, run.last_checkpoint_key = run.last_checkpoint_key, prefix
        if previous and previous != prefix and previous.startswith(f"training/{self.run_id}/grpo-"):
            get_store().delete_prefix(previous)  # the latest GRPO checkpoint (and the warm-up's) is what a resume needs
        self.last_checkpoint = checkpoint
        log.info("training run %s: checkpoint %s (%d files)", self.run_id, prefix, files)

    def stop_reason(self) -> str | None:
        return self.heartbeat.stop_reason


def record_step(run_id: uuid.UUID, phase: str, step: int, metrics: dict[str, Any]) -> None:
    with session_scope() as session:
        session.execute(
            insert(TrainingStep)
            .values(run_id=run_id, phase=phase, step=step, metrics=metrics)
            .on_conflict_do_update(index_elements=["run_id", "phase", "step"], set_={"metrics": metrics})
        )


def register_model(run_id: uuid.UUID | None, config: TrainConfig, folder: Path, meta: dict[str, Any]) -> str:
    """Upload the final weights to `models/<name>/` and register them: `--inserter checkpoint:<name>`. `run_id` is
    the training run that made them (None: weights trained elsewhere, registered by hand)."""
    name = config.name or default_model_name(config, run_id or uuid.uuid4())
    meta = {**meta, "prompt_version": PROMPT_VERSION}  # what serving checks it builds (inserter/registry.py)
    prefix = f"models/{name}/"
    store = get_store()
    store.delete_prefix(prefix)  # a resumed run registering again replaces, never mixes, files
    store.upload_folder(folder, prefix)
    with session_scope() as session:
        session.execute(
            insert(RegisteredModel)
            .values(
                name=name,
                kind="inserter",
                base_model=config.base_model,
                s3_prefix=prefix,
                training_run_id=run_id,
                meta=meta,
            )
            .on_conflict_do_update(
                index_elements=["name"],
                set_={"s3_prefix": prefix, "training_run_id": run_id, "meta": meta, "base_model": config.base_model},
            )
        )
    return name


def finish(run_id: uuid.UUID, status: str, error: str | None = None) -> None:
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            return
        run.status, run.error, run.finished_at = status, error, now()


def request_cancel(run_id: uuid.UUID) -> str:
    """Cancel a run: a queued one (or one whose worker is gone) at once, a running one at its next step."""
    with session_scope() as session:
        run = locked_run(session, run_id)
        if run.status in FINISHED:
            return f"already {run.status}"
        run.cancel_requested_at = now()
        if is_alive(run):
            return "cancel requested: the run stops after its current step and keeps its last checkpoint"
        run.error = "cancelled by request" + ("" if run.status == "queued" else " (its worker was not heart-beating)")
        run.status, run.finished_at = "cancelled", now()
        return "cancelled"


def run_steps(run_id: uuid.UUID) -> list[tuple[str, int, dict[str, Any]]]:
    with session_scope() as session:
        rows = session.execute(
            select(TrainingStep.phase, TrainingStep.step, TrainingStep.metrics)
            .where(TrainingStep.run_id == run_id)
            .order_by(TrainingStep.created_at, TrainingStep.step)
        ).all()
    return [(phase, step, metrics) for phase, step, metrics in rows]


def delete_run_steps(run_id: uuid.UUID, phase: str, after_step: int) -> None:
    """A resumed run redoes steps after its checkpoint: their old metrics go (the new ones replace them)."""
    with session_scope() as session:
        session.execute(
            delete(TrainingStep).where(
                TrainingStep.run_id == run_id, TrainingStep.phase == phase, TrainingStep.step > after_step
            )
        )


def execute_run(run_id: uuid.UUID, worker: str, work_root: Path | None = None) -> dict[str, Any]:
    """Claim the run and, if it is ours, train, register and record the end. Never raises for a training error:
    the run is marked failed with the reason and keeps its last checkpoint."""
    from services.trainer.core import Stopped, train_inserter
    from services.trainer.data import build_examples
    from services.trainer.evaluation import evaluate_model

    claim = claim_run(run_id, worker)
    if claim.outcome != "ours":
        return {"run_id": str(run_id), "outcome": claim.outcome, "detail": claim.detail}
    config = claim.config
    work_dir = (work_root or Path(get_settings().state_dir) / "training") / str(run_id)
    phase = "data"
    with Heartbeat(run_id, worker) as heartbeat:
        hooks = RunHooks(run_id, heartbeat)
        try:
            if claim.detail:
                log.info("training run %s: %s", run_id, claim.detail)
            resume = resume_point(claim.checkpoint_key, work_dir)
            if resume is not None and resume.phase == "grpo":
                delete_run_steps(run_id, "grpo", resume.step)
            report = build_examples(config.collection, val_fraction=config.val_fraction, seed=config.seed)
            train, val = report.split("train"), report.split("val")
            record_step(run_id, "data", 0, {k: v for k, v in report.summary().items() if isinstance(v, int)})
            phase = "training"
            result = train_inserter(config, train, val, work_dir, hooks, resume=resume)
            phase = "evaluation"
            meta: dict[str, Any] = {"train_examples": len(train), "val_examples": len(val)}
            for name, info in result.phases.items():
                meta[f"{name}_seconds"] = info["seconds"]
                for key in ("image_f1", "position_accuracy", "parse_rate"):
                    value = (info.get("val") or {}).get(key)
                    if value is not None:
                        meta[f"{name}_val_{key}"] = round(value, 4)
            if "grpo" not in result.phases and val and config.eval_examples:
                final = evaluate_model(str(result.model_dir), val[: config.eval_examples])
                meta.update({f"val_{k}": round(v, 4) for k, v in final.items() if isinstance(v, float)})
            phase = "registration"
            name = register_model(run_id, config, result.model_dir, meta)
        except Stopped as stopped:
            if "took the run over" in (heartbeat.stop_reason or ""):
                return {"run_id": str(run_id), "outcome": "taken over", "detail": str(stopped)}  # not ours to end
            where = hooks.last_checkpoint
            kept = f"; last checkpoint {checkpoint_prefix(run_id, where)}" if where else ""
            finish(run_id, "cancelled", f"{stopped}{kept}")
            return {"run_id": str(run_id), "outcome": "cancelled", "detail": str(stopped)}
        except Exception as error:
            log.exception("training run %s failed during %s", run_id, phase)
            kept = (
                f" (last checkpoint kept: {checkpoint_prefix(run_id, hooks.last_checkpoint)})"
                if hooks.last_checkpoint
                else ""
            )
            finish(run_id, "failed", f"{phase}: {type(error).__name__}: {error}{kept}")
            return {"run_id": str(run_id), "outcome": "failed", "detail": str(error)}
    finish(run_id, "succeeded")
    shutil.rmtree(work_dir, ignore_errors=True)  # everything worth keeping is in S3
    return {"run_id": str(run_id), "outcome": "succeeded", "model": name}
