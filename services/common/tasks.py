"""The task policy every stage shares (queue, acks, retries, payload validation), in one decorator.

A stage's `tasks.py` stays thin: it names the payload contract and a function that does the work;
`stage_task` validates, records the attempt, retries only named transient errors, and records a
refused message as a dead letter instead of letting it crash or loop.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import redis
import urllib3.exceptions
from celery import Task
from celery.exceptions import Reject
from celery.signals import task_rejected, task_unknown
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError

from services.common.celery_app import app
from services.common.contracts import Contract, QueryRef
from services.common.queues import ANSWER_TASKS, Stage, answer_stage, next_stage
from services.common.stage_runs import (
    QueryCancelled,
    QueryNotFound,
    begin_attempt,
    current_attempt,
    fail_attempt,
    record_dead_letter,
    succeed_attempt,
)

log = logging.getLogger(__name__)

# Errors worth another try: the service is back in seconds. Everything else is permanent.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    urllib3.exceptions.MaxRetryError,
    urllib3.exceptions.ProtocolError,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)
MAX_TRANSIENT_RETRIES = 8  # with backoff capped at 60 s: about five minutes of outage is ridden out


class RefusedMessage(ValueError):
    """The message cannot be processed as sent (bad payload, unknown query): never retried."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, TRANSIENT_ERRORS)


def worker_name(task: Task) -> str:
    return task.request.hostname or socket.gethostname()


def payload_of(args: tuple, kwargs: dict) -> Any:
    """Producers send one JSON object as the single positional argument."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and kwargs:
        return kwargs
    raise RefusedMessage(f"expected one JSON object, got {len(args)} positional and {len(kwargs)} keyword arguments")


def queue_task(
    stage: Stage, operation: str, contract: type[Contract]
) -> Callable[[Callable[[Any, Task], dict[str, Any]]], Task]:
    """Register `work(payload, task) -> dict` as the task `<stage>.<operation>` on the stage's queue.

    The decorator carries the policy: late acks, requeue on worker loss, the payload validated
    against `contract` (a refused message becomes a dead letter and is acknowledged), named
    transient errors retried with backoff. `work` may raise `RefusedMessage` for a message that
    is well-formed but cannot be served (an unknown id).
    """

    def decorate(work: Callable[[Any, Task], dict[str, Any]]) -> Task:
        @app.task(
            name=f"{stage.value}.{operation}",
            bind=True,
            queue=stage.queue,
            acks_late=True,
            reject_on_worker_lost=True,
            typing=False,  # arguments are validated by the contract, into a dead letter if wrong
            max_retries=MAX_TRANSIENT_RETRIES,
        )
        def run(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
            raw = None
            try:
                raw = payload_of(args, kwargs)
                payload = contract.model_validate(raw)
            except (RefusedMessage, ValidationError) as error:
                return refuse(task, raw if raw is not None else {"args": args, "kwargs": kwargs}, error)
            try:
                return work(payload, task)
            except RefusedMessage as error:
                return refuse(task, raw, error)
            except Exception as error:
                if is_transient(error) and task.request.retries < task.max_retries:
                    raise retry_later(task, error) from error
                raise

        return run

    return decorate


def stage_task(
    stage: Stage,
    operation: str,
    contract: type[Contract],
    then: Callable[[Any], None] | None = None,
) -> Callable[[Callable[[Any, Task], str | dict[str, Any]]], Task]:
    """A `queue_task` on one query of a job: the payload carries `query_id`, and each attempt is
    recorded as a stage run of that query (start, end, worker, error).

    `work` returns the stage's output: JSON text, or a dict to be stored as JSON.
    A permanent error marks the query failed with a readable message and is acknowledged (the job
    goes on). After success, `then(payload)` enqueues the next hop. A redelivered message whose
    stage already succeeded skips `work` but calls `then` again: the first delivery may have died
    between storing its output and enqueueing the next stage, and the next stage is idempotent.
    """

    def decorate(work: Callable[[Any, Task], str | dict[str, Any]]) -> Task:
        def attempt_stage(payload: Any, task: Task) -> dict[str, Any]:
            try:
                attempt = begin_attempt(payload.query_id, stage.value, worker_name(task))
            except QueryNotFound as error:
                raise RefusedMessage(str(error)) from error
            except QueryCancelled:
                log.info("%s: query %s was cancelled; skipped", task.name, payload.query_id)
                return {"query_id": str(payload.query_id), "cancelled": True}
            if attempt is None:
                log.info("%s: already succeeded for query %s; nothing new to do", task.name, payload.query_id)
                hand_on(task, then, payload)
                return {"query_id": str(payload.query_id), "already_done": True}
            running = current_attempt.set(attempt)
            try:
                output = work(payload, task)
            except Exception as error:
                transient = is_transient(error) and task.request.retries < task.max_retries
                fail_attempt(attempt.id, f"{type(error).__name__}: {error}", retrying=transient)
                if transient:
                    raise
                log.exception("%s failed permanently for query %s", task.name, payload.query_id)
                return {"query_id": str(payload.query_id), "failed": str(error)}
            finally:
                current_attempt.reset(running)
            if succeed_attempt(attempt.id, output):
                hand_on(task, then, payload)
            # The output is stored with the stage run; the task's own result (pickled back to the pool's
            # parent, and logged) only says where: a whole Retrieval here costs every hop CPU for nothing.
            return {"query_id": str(payload.query_id), "stage_run": attempt.id}

        attempt_stage.__name__ = work.__name__
        return queue_task(stage, operation, contract)(attempt_stage)

    return decorate


def answer_task(
    stage: Stage, then: Callable[[QueryRef], None] | None = None
) -> Callable[[Callable[[QueryRef, Task], Any]], Task]:
    """The task of an answer stage (`queues.STAGES`): a `stage_task` on a `QueryRef` under the stage's
    task name, whose work returns the stage's output contract (stored as the stage run's output).
    After success it enqueues the next stage of the pipeline, or calls `then` after the last one."""
    entry = answer_stage(stage)
    following = next_stage(stage)
    if then is None and following is not None:
        then = send_to(ANSWER_TASKS[following])

    def decorate(work: Callable[[QueryRef, Task], Any]) -> Task:
        def run_stage(ref: QueryRef, task: Task) -> str:
            output = work(ref, task)
            if not isinstance(output, entry.output):
                raise TypeError(f"{entry.task} returned {type(output).__name__}, not {entry.output.__name__}")
            return output.model_dump_json()  # pydantic's serialiser; stored as it is (stage_runs.SUCCEED)

        run_stage.__name__ = work.__name__
        return stage_task(stage, entry.operation, QueryRef, then=then)(run_stage)

    return decorate


def send_to(task_name: str) -> Callable[[Any], None]:
    """Enqueue the same payload for another task (the next stage's, named in `queues.STAGES`)."""

    def send(payload: Any) -> None:
        app.send_task(task_name, args=[payload.model_dump(mode="json")])

    send.__name__ = f"send_to_{task_name.replace('.', '_')}"
    return send


def hand_on(task: Task, then: Callable[[Any], None] | None, payload: Any) -> None:
    """Enqueue the next hop. If the broker is unreachable, retry this task: the redelivery finds
    the stage done and only enqueues again, so no query is left stranded between two stages."""
    if then is None:
        return
    try:
        then(payload)
    except Exception as error:
        log.warning("%s: could not enqueue the next stage (%s); retrying", task.name, error)
        raise retry_later(task, error) from error


def retry_later(task: Task, error: BaseException) -> Exception:
    """Publish a retry of the task with backoff; returns the exception for the task to raise.

    Celery publishes a retry as a new message, and when it cannot (the broker is unreachable, which is
    exactly when a hand-off fails) it raises Reject(requeue=False): the worker then deletes the message
    as soon as it reaches the broker again, and the query is stranded between two stages (seen in
    tests/test_job_faults.py: Redis restarted while tasks were handing queries on). Give the message back
    instead: requeued, or left unacknowledged until the visibility timeout returns it if the broker is
    still down; its redelivery runs the stage again or, if it succeeded, only enqueues the next hop."""
    try:
        return task.retry(exc=error, countdown=backoff(task), throw=False)
    except Reject as rejected:
        log.warning("%s: could not publish the retry (%s); giving the message back", task.name, rejected.reason)
        return Reject(rejected.reason, requeue=True)


def backoff(task: Task) -> int:
    return min(60, 2 ** (task.request.retries + 1))


def refuse(task: Task, raw: Any, error: BaseException) -> dict[str, Any]:
    message = f"{type(error).__name__}: {error}"
    letter_id = record_dead_letter(
        task.name,
        raw,
        message,
        queue=(task.request.delivery_info or {}).get("routing_key"),
        task_id=task.request.id,
        worker=worker_name(task),
    )
    log.error("%s refused message %s (dead letter %s): %s", task.name, task.request.id, letter_id, message)
    return {"refused": message, "dead_letter_id": letter_id}


@task_unknown.connect
def record_unknown_task(sender=None, name=None, id=None, message=None, exc=None, **_: Any) -> None:  # noqa: A002
    body = getattr(message, "body", b"")
    record_dead_letter(
        name or "?",
        body.decode("utf-8", "replace") if isinstance(body, bytes) else body,
        f"unknown task name {name!r}: no m2io task has it",
        queue=None,
        task_id=id,
        worker=None,
    )


@task_rejected.connect
def record_rejected_message(sender=None, message=None, exc=None, **_: Any) -> None:
    headers = getattr(message, "headers", {}) or {}
    record_dead_letter(
        headers.get("task", "?"),
        repr(getattr(message, "body", ""))[:2000],
        f"message refused before decoding: {exc}",
        queue=None,
        task_id=headers.get("id"),
        worker=None,
    )
