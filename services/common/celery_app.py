"""The Celery application shared by every worker. Configuration comes from `get_settings()`."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from services.common.queues import Stage, task_routes
from services.common.settings import get_settings

TASK_MODULES = [f"services.{stage.value}.tasks" for stage in Stage]


def configure(app: Celery) -> None:
    settings = get_settings()
    app.conf.update(
        broker_url=settings.redis_url,
        # Queues are declared from the enum only: a task routed anywhere else is an error.
        task_queues=[Queue(stage.queue) for stage in Stage],
        task_routes=task_routes(),
        task_default_queue=Stage.RETRIEVER.queue,
        task_create_missing_queues=False,
        # A message is acknowledged only after its task returns, and given back to the queue when
        # the worker process running it dies: a crash loses no query (tasks are idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a slow model task does not hold others hostage.
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # State lives in Postgres (stage runs), not in a result backend.
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,  # sweep on every interval, not every tenth
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        enable_utc=True,
    )


# Settings are read when Celery first needs its configuration, not at import.
app = Celery("m2io", include=TASK_MODULES)
app.on_configure.connect(lambda sender, **_: configure(sender), weak=False)


@worker_process_init.connect
def limit_torch_threads(**_) -> None:
    """`M2IO_TORCH_THREADS` in each process that runs tasks: a prefork pool process, or the worker
    itself with the solo pool (both send this signal). Torch is imported only when it is set."""
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)


def worker_argv(queue: str, name: str, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """The command line of a worker consuming one queue (used by `m2io up`, `m2io worker`, tests)."""
    import sys

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "services.common.celery_app",
        "worker",
        "-Q",
        queue,
        "-n",
        name,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
    ]
