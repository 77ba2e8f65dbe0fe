"""Celery entry points of the trainer: thin wrappers (validate, call core, persist).

`trainer.train` runs one training run (services/trainer/runs.execute_run). A run holds its message for minutes
to hours; the message comes back when its worker's heartbeat stops, and may also come back (after the trainer's
visibility timeout) while the run is still going: the claim in `execute_run` tells a duplicate from a run whose
worker died. A duplicate is sent
again for later instead of being dropped: as long as a run is unfinished one message stays in flight, and it
is the one that resumes the run from its last checkpoint should its worker die.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from services.common.contracts import TrainRef
from services.common.queues import Stage
from services.common.settings import get_settings
from services.common.smoke import smoke_task
from services.common.tasks import RefusedMessage, queue_task, worker_name
from services.trainer.runs import RunNotFound, execute_run

smoke = smoke_task(Stage.TRAINER)


@queue_task(Stage.TRAINER, "train", TrainRef)
def train(ref: TrainRef, task: Task) -> dict[str, Any]:
    try:
        outcome = execute_run(ref.run_id, worker_name(task))
    except RunNotFound as error:
        raise RefusedMessage(str(error)) from error
    if outcome["outcome"] == "busy":
        # Checked again once the holder's heartbeat could have gone stale.
        task.app.send_task(
            task.name, args=[ref.model_dump(mode="json")], countdown=get_settings().trainer_stale_after_s
        )
    return outcome
