"""The Celery application shared by every worker. Configuration comes from `get_settings()`.

The broker is kombu's Redis transport with two additions (`Transport` below):
- every raw Redis item is checked before kombu or Celery touch it: one a worker cannot serve
  (not JSON, not a kombu envelope, a body that is not base64 or not Celery's JSON, too big) is
  recorded in `dead_letters` and dropped, instead of killing the worker with an unrecoverable error;
- each worker keeps a heartbeat key in Redis with a short TTL and records the delivery tags it holds;
  every worker's sweep gives the held messages of a worker whose heartbeat stopped back to their
  queues, so a killed worker's messages come back in seconds. The visibility timeout stays as the
  backstop; the trainer, whose runs hold a message for hours, keeps its unacknowledged messages under
  keys of its own with a timeout of its own.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time

from celery import Celery
from celery.signals import celeryd_init, task_postrun, worker_process_init, worker_shutdown
from kombu import Queue
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from services.common import warmup
from services.common.health import HELD_PREFIX, heartbeat_key
from services.common.queues import Stage, task_routes
from services.common.settings import Settings, get_settings
from services.common.worker_life import WorkerLife

log = logging.getLogger(__name__)

TASK_MODULES = [f"services.{stage.value}.tasks" for stage in Stage]
TASK_QUEUES = frozenset(stage.queue for stage in Stage)
# A message carries ids and object keys, never blobs (DESIGN.md): the largest real one is well under a
# kilobyte, so a megabyte is refused as not ours before it is parsed.
MAX_MESSAGE_BYTES = 1 << 20
# The trainer's unacknowledged messages live under keys of their own, so that the answer workers' short
# sweeps never give back the message of a training run that is alive and hours long.
TRAINER_UNACKED_KEYS = {
    "unacked_key": "trainer.unacked",
    "unacked_index_key": "trainer.unacked_index",
    "unacked_mutex_key": "trainer.unacked_mutex",
}


def transport_options(settings: Settings, *, trainer: bool = False) -> dict:
    visibility = settings.trainer_visibility_timeout_s if trainer else settings.visibility_timeout_s
    return {
        "visibility_timeout": visibility,
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,  # sweep on every interval, not every tenth
        **(TRAINER_UNACKED_KEYS if trainer else {}),
    }


def configure(app: Celery) -> None:
    settings = get_settings()
    app.conf.update(
        broker_url=settings.redis_url,
        broker_transport=f"{__name__}:Transport",
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
        # A pool process reports up only after its warm-up (services/common/warmup.py): Celery's 4 s before
        # it kills one that has not is shorter than a model load on a busy small machine.
        worker_proc_alive_timeout=settings.worker_warm_up_timeout_s,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # State lives in Postgres (stage runs), not in a result backend.
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings),
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        enable_utc=True,
    )


# Settings are read when Celery first needs its configuration, not at import.
app = Celery("m2io", include=TASK_MODULES)
app.on_configure.connect(lambda sender, **_: configure(sender), weak=False)


# ---------------------------------------------------------------------------------------------- raw messages


class UndecodableMessage(ValueError):
    """A raw Redis item that no worker could serve; the message says why."""


def decode_message(raw: bytes | str, queue: str) -> dict:
    """The kombu envelope of a raw item popped from `queue`, checked for everything kombu and Celery
    read from it before a task runs (they would raise out of the worker's event loop and kill it)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise UndecodableMessage(f"the message is {len(raw):,} bytes (limit {MAX_MESSAGE_BYTES:,})")
    try:
        envelope = json.loads(raw)
    except UnicodeDecodeError as error:
        raise UndecodableMessage(f"not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise UndecodableMessage(f"not JSON ({error.msg} at character {error.pos})") from error
    if not isinstance(envelope, dict):
        raise UndecodableMessage(
            f"a JSON {type(envelope).__name__}, not a message (an object with body, headers and properties)"
        )
    properties = envelope.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        raise UndecodableMessage("not a kombu message: no properties.delivery_tag")
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(key), str) for key in ("exchange", "routing_key")):
        raise UndecodableMessage("not a kombu message: no properties.delivery_info with exchange and routing_key")
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise UndecodableMessage("headers is not an object")
    is_task = queue in TASK_QUEUES
    if is_task and not (isinstance(headers, dict) and all(isinstance(headers.get(k), str) for k in ("task", "id"))):
        raise UndecodableMessage("not a Celery task message: headers.task and headers.id are missing")
    body = decode_body(envelope.get("body"), properties.get("body_encoding"))
    if envelope.get("content-type") == "application/json":
        if envelope.get("content-encoding") not in (None, "utf-8"):
            raise UndecodableMessage(f"unknown content-encoding {envelope.get('content-encoding')!r}")
        try:
            decoded = json.loads(body)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise UndecodableMessage(f"the body is not JSON ({error})") from error
        shape = isinstance(decoded, list) and len(decoded) == 3 and [type(part) for part in decoded]
        if is_task and shape != [list, dict, dict]:
            raise UndecodableMessage("the body is not Celery's [args, kwargs, options]")
    return envelope


def decode_body(body: object, encoding: object) -> bytes:
    if body is None:
        return b""
    if not isinstance(body, str):
        raise UndecodableMessage(f"the body is a JSON {type(body).__name__}, not a string")
    if encoding is None:
        return body.encode()
    if encoding != "base64":
        raise UndecodableMessage(f"unknown body_encoding {encoding!r}")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as error:
        raise UndecodableMessage(f"the body is not base64 ({error})") from error


def dead_letter_raw(raw: bytes | str, queue: str, error: UndecodableMessage) -> None:
    """Record a raw item no worker can serve; never raises (the worker must go on serving)."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.common.stage_runs import record_dead_letter

    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    worker = LIFE.name if LIFE else None
    try:
        letter = record_dead_letter(
            "?", text, f"undecodable message: {error}", queue=queue, task_id=None, worker=worker
        )
    except (SQLAlchemyError, RuntimeError) as failure:  # Postgres down, or none configured
        log.critical("undecodable message from %s (%s) dropped unrecorded (%s): %.2000r", queue, error, failure, text)
        return
    log.error("dead letter %s: an undecodable message from queue %s: %s", letter, queue, error)


# ---------------------------------------------------------------------------------------------- heartbeats


LIFE: WorkerLife | None = None  # set in a worker's main process, before it consumes


@celeryd_init.connect
def start_heartbeat(sender=None, conf=None, options=None, **_) -> None:
    """In the worker's main process, before it connects: the trainer's transport options, and the heartbeat."""
    global LIFE
    settings = get_settings()
    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    if Stage.TRAINER.queue in queues and conf is not None:
        conf.broker_transport_options = transport_options(settings, trainer=True)
    options = options or {}
    pool = str(options.get("pool_cls") or "prefork").rsplit(".", 1)[-1].lower()
    processes = (options.get("concurrency") or os.cpu_count() or 1) if pool in ("prefork", "taskpool") else 1
    stages = [stage for stage in Stage if stage.queue in queues]
    LIFE = WorkerLife(name=str(sender), settings=settings, stages=stages, processes=int(processes))
    LIFE.start()
    quiet_task_lines(settings)


# The loggers of Celery's per-task INFO lines: "Received task" (the consumer's strategy) and "Task … succeeded"
# (the tracer, in the pool process; the level set here is inherited by the processes forked after it).
TASK_LINE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_task_lines(settings: Settings) -> None:
    """Unless `M2IO_TASK_LOG_LINES` asks for them, drop the two INFO lines per task (warnings and errors stay)."""
    if not settings.task_log_lines:
        for name in TASK_LINE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


@worker_shutdown.connect
def stop_heartbeat(**_) -> None:
    if LIFE is not None:
        LIFE.stopped.set()


class WatchedQoS(kombu_redis.QoS):
    """kombu's ack emulation, plus a set per worker incarnation of the delivery tags it holds (written in
    the same transaction as `unacked`), and a sweep that restores those of incarnations whose heartbeat
    stopped."""

    @property
    def held_key(self) -> str | None:
        return f"{HELD_PREFIX}{self.unacked_key}:{LIFE.incarnation}" if LIFE else None

    def append(self, message, delivery_tag) -> None:
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            held = [message._raw, delivery["exchange"], delivery["routing_key"]]
            pipe.hset(self.unacked_key, delivery_tag, dumps(held))
            if LIFE is not None:
                # The heartbeat is written before the first tag is held: a fresh worker never looks dead.
                pipe.set(LIFE.key, LIFE.value(), px=LIFE.ttl_ms())
                pipe.sadd(self.held_key, delivery_tag)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        return pipe.srem(self.held_key, delivery_tag) if LIFE is not None else pipe

    def restore_visible(self, *args, **kwargs) -> None:
        super().restore_visible(*args, **kwargs)
        self.restore_dead_workers()

    def restore_dead_workers(self) -> None:
        """Give back the held messages of every incarnation (of this unacked namespace) without a heartbeat.
        `restore_by_tag` is one transaction on `unacked`: when several workers sweep, each message is
        restored once, and one already acknowledged is not restored at all."""
        with self.channel.conn_or_acquire() as client:
            for held in client.scan_iter(match=f"{HELD_PREFIX}{self.unacked_key}:*", count=100):
                incarnation = bytes_to_str(held).rsplit(":", 1)[1]
                if client.exists(heartbeat_key(incarnation)):
                    continue
                tags = client.smembers(held)
                for tag in tags:
                    self.restore_by_tag(tag, client)
                    client.srem(held, tag)
                if tags:
                    log.warning("gave back %d message(s) of %s: its heartbeat stopped", len(tags), incarnation)


class Channel(kombu_redis.Channel):
    QoS = WatchedQoS

    def _brpop_read(self, **options):
        """kombu's, with the item decoded by `decode_message`: an undecodable one is a dead letter."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise virtual.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message = self.checked(item, dest)
            if message is not None:
                self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _get(self, queue):
        with self.conn_or_acquire() as client:
            for priority in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, priority))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    message = self.checked(item, queue)
                    if message is not None:
                        return message
            self._maybe_update_queues_expire(client, queue)
            raise virtual.Empty()

    def checked(self, item: bytes, queue: str) -> dict | None:
        try:
            return decode_message(item, queue)
        except UndecodableMessage as error:
            dead_letter_raw(item, queue, error)
            return None


class Transport(kombu_redis.Transport):
    Channel = Channel


# ---------------------------------------------------------------------------------------------- pool processes


@worker_process_init.connect
def prepare_process(**_) -> None:
    """In each process that runs tasks (a prefork pool process, or the worker itself with the solo pool:
    both send this signal), in this order: torch threads, fresh connections, then the warm-up."""
    limit_torch_threads()
    drop_inherited_connections()
    if LIFE is not None:
        warmup.warm_up_process(LIFE.stages, LIFE.incarnation, LIFE.ttl_ms(), LIFE.settings.worker_heartbeat_s)


def limit_torch_threads() -> None:
    """`M2IO_TORCH_THREADS`, before any model loads. Torch is imported only when it is set."""
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)


def drop_inherited_connections() -> None:
    """A pool process forked after the main process used Postgres (a dead letter) must not share its
    sockets: the inherited pool is dropped without closing the parent's connections."""
    if get_settings().database_url:
        from services.common.db import get_engine

        get_engine().dispose(close=False)


@task_postrun.connect
def report_late_loads(**_) -> None:
    warmup.note_late_loads()


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
