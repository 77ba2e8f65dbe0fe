"""The writes of jobs: submit, retry, cancel, on the job -> query -> stage-run rows. The read model
(a job's status, computed from those rows) is `services.jobs.status`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import insert, select, update

from services.common.contracts import JobConfig
from services.common.db import session_scope
from services.common.models import Collection, Document, Job, Query, StageRun
from services.common.queues import ANSWER_TASKS, PIPELINE, Stage
from services.common.stage_runs import now, with_default_backends
from services.generator.core import BACKENDS as GENERATOR_BACKENDS
from services.inserter.core import BACKENDS as INSERTER_BACKENDS
from services.jobs.questions import QuestionLine, storable
from services.jobs.status import ENQUEUE_STAGE, INPUT_STAGE, QueryFailure, UnknownJob, parse_job_id

T = TypeVar("T")


class JobError(ValueError):
    """A submission that cannot run at all (unknown collection or backend); nothing was stored."""


class EnqueueError(JobError):
    """The job is stored but its messages could not be sent (the broker is down): `retry` sends them."""

    def __init__(self, job_id: uuid.UUID, count: int, error: BaseException):
        self.job_id = job_id
        super().__init__(
            f"job {job_id} is stored, but {count} queries could not be enqueued ({type(error).__name__}: {error}); "
            f"they are marked failed: `m2io retry {job_id}` sends them once the broker is back"
        )


def check_backend(kind: str, backend: str | None, known: tuple[str, ...]) -> None:
    if backend is None:
        return
    prefix, _, spec = backend.partition(":")
    if prefix not in known or (prefix == "checkpoint" and not spec):
        raise JobError(f"unknown {kind} backend {backend!r}; use one of: {', '.join(known)} (checkpoint:<name>)")


def check_collection(session, name: str) -> Collection:
    collection = session.execute(select(Collection).where(Collection.name == name)).scalar_one_or_none()
    if collection is None:
        names = session.scalars(select(Collection.name).order_by(Collection.name)).all()
        known = ", ".join(names) if names else "none yet: run `m2io ingest` first"
        raise JobError(f"no collection named {name!r} (collections: {known})")
    return collection


ALL_COLLECTIONS = "all"  # `--collection all`: every collection that holds documents, the router choosing


def job_config(
    collection: str | Iterable[str],
    *,
    generator: str | None = None,
    inserter: str | None = None,
    top_k: int | None = None,
    candidates: int | None = None,
) -> JobConfig:
    """A `JobConfig` from a user's options (unset ones keep the contract's defaults), or a JobError that
    says which option is wrong and what it takes. `collection`: one name, or several (the router chooses
    per question), or `all`; submit checks them against the collections there are."""
    if top_k is not None and not 1 <= top_k <= 100:
        raise JobError(f"top_k={top_k}: use 1..100")
    if candidates is not None and not 1 <= candidates <= 100:
        raise JobError(f"candidates={candidates}: use 1..100")
    names = [collection] if isinstance(collection, str) else list(collection)
    if not names or any(not name.strip() for name in names):
        raise JobError("the collection name is empty: name the collection to answer from (`m2io ingest` made it)")
    names = list(dict.fromkeys(name.strip() for name in names))
    where = {"collection": names[0]} if len(names) == 1 and names[0] != ALL_COLLECTIONS else {"collections": names}
    given = {"generator": generator, "inserter": inserter, "top_k": top_k, "candidates": candidates}
    try:
        return JobConfig(**where, **{key: value for key, value in given.items() if value is not None})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise JobError(f"invalid job options: {problems}") from error


def resolve_collections(session, config: JobConfig) -> tuple[JobConfig, Collection | None]:
    """The config with its collections checked (and `all` expanded), and the job's one collection if it has
    one. Refused up front, with the list of collections: an unknown name, a collection with no documents
    among several, several collections of different embedding models (one question vector must serve all)."""
    names = config.searched
    rows = session.execute(select(Collection).order_by(Collection.name)).scalars().all()
    filled = set(session.scalars(select(Document.collection_id).distinct()).all())
    listing = ", ".join(f"{c.name}{'' if c.id in filled else ' (empty)'}" for c in rows)
    listing = listing or "none yet: run `m2io ingest` first"
    if ALL_COLLECTIONS in names:
        if len(names) > 1:
            raise JobError(f"`{ALL_COLLECTIONS}` stands alone: it means every collection (collections: {listing})")
        chosen = [c for c in rows if c.id in filled]
        if not chosen:
            raise JobError(f"no collection holds documents (collections: {listing})")
    else:
        by_name = {c.name: c for c in rows}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise JobError(f"no collection named {', '.join(map(repr, unknown))} (collections: {listing})")
        chosen = [by_name[name] for name in names]
        empty = [c.name for c in chosen if c.id not in filled]
        if empty and len(chosen) > 1:
            raise JobError(f"collection {', '.join(map(repr, empty))} holds no documents (collections: {listing})")
    models = {c.embedding_model for c in chosen}
    if len(models) > 1:
        raise JobError(
            "the collections use different embedding models ("
            + ", ".join(f"{c.name}: {c.embedding_model}" for c in chosen)
            + "): one job routes among collections of one model"
        )
    if len(chosen) == 1:
        return config.model_copy(update={"collection": chosen[0].name, "collections": ()}), chosen[0]
    return config.model_copy(update={"collection": None, "collections": tuple(c.name for c in chosen)}), None


def check_backend_works(kind: str, backend: str | None) -> None:
    """JobError when a backend the stages know can still never run (cheap checks, no model loaded):
    a checkpoint that is not registered, `openai` with no server set, a path that is not a model."""
    from services.common.llm import LLMError, check_chat_model
    from services.inserter.registry import UnknownModel, registered_prefix

    if backend is None:
        return
    prefix, _, spec = backend.partition(":")
    try:
        match kind, prefix:
            case "inserter", "checkpoint":
                registered_prefix(spec)
            case "inserter", "llm":
                check_chat_model(spec or "local")
            case "generator", "local" | "openai":
                check_chat_model(backend)
    except (LLMError, UnknownModel) as error:
        raise JobError(f"{kind} backend {backend!r} cannot run: {error}") from error


def validate_config(config: JobConfig) -> JobConfig:
    """The config as it will run: backends checked against those the stages declare and that they can
    run at all, unset ones filled in from the settings (so every stage reads the same backends)."""
    resolved = with_default_backends(config)
    check_backend("generator", resolved.generator, GENERATOR_BACKENDS)
    check_backend("inserter", resolved.inserter, INSERTER_BACKENDS)
    check_backend_works("generator", resolved.generator)
    check_backend_works("inserter", resolved.inserter)
    return resolved


# Rows per INSERT and messages per broker round trip: a 10,000-question job is 10 statements and 20
# pipelines, while a batch stays small in memory and in one statement's parameters.
INSERT_BATCH = 1_000
PUBLISH_BATCH = 500


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter).

    >>> [len(b) for b in batches(range(5), 2)]
    [2, 2, 1]
    """
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def query_row(job_id: uuid.UUID, entry: QuestionLine) -> dict[str, Any]:
    """The `queries` row of a question line: a question is `queued`, a line that is not one `failed`
    with its reason (at the `input` stage)."""
    return {
        "id": uuid.uuid4(),
        "job_id": job_id,
        "external_id": entry.external_id,
        "question": entry.question,
        "line": entry.line,
        "collection": entry.collection,
        "gold": entry.gold,
        "status": "failed" if entry.error else "queued",
        "error": entry.error,
        "error_stage": INPUT_STAGE if entry.error else None,
    }


def submit_job(
    questions: Iterable[QuestionLine],
    config: JobConfig,
    *,
    name: str | None = None,
    enqueue: bool = True,
) -> uuid.UUID:
    """Store the job and its queries, then enqueue each valid question at the retriever.

    Lines that are not questions are stored as failed queries with their reason, so that the job
    shows them; the rest of the batch runs. The config is validated once, here (`validate_config`).
    `questions` may be a stream (`questions.stream_questions`): it is read once, stored in batches of
    `INSERT_BATCH` rows in one transaction (nothing is stored if it fails, or holds no question), and
    only the ids of the queries to send are kept. The messages go after the commit (a worker must find
    its query), in pipelines of `PUBLISH_BATCH`; a broker that fails on the way is `send_or_mark_failed`'s.
    """
    config = validate_config(config)
    runnable: list[uuid.UUID] = []
    with session_scope() as session:
        config, stored = resolve_collections(session, config)
        job = Job(
            kind="answer",
            name=storable(name) if name else None,
            collection_id=stored.id if stored else None,
            config=config.model_dump(mode="json"),
        )
        session.add(job)
        session.flush()
        job_id, count = job.id, 0
        for batch in batches(questions, INSERT_BATCH):
            rows = [query_row(job_id, entry) for entry in batch]
            session.execute(insert(Query), rows)
            runnable += [row["id"] for row in rows if row["status"] == "queued"]
            count += len(rows)
        if not count:
            raise JobError("no questions to submit")
    if enqueue:
        send_or_mark_failed(job_id, [(query_id, Stage.RETRIEVER) for query_id in runnable])
    return job_id


def send_or_mark_failed(
    job_id: uuid.UUID,
    entries: list[tuple[uuid.UUID, Stage]],
    enqueue: Callable[[list[tuple[uuid.UUID, Stage]]], None] | None = None,
) -> None:
    """Enqueue, `PUBLISH_BATCH` messages at a time; if the broker cannot be reached, no query may be left
    `queued` with no message (it would wait forever): those of the batch that failed (its delivery is
    uncertain) and of every later one are marked failed, retryable, and EnqueueError says so. Earlier
    batches went out: their queries stay queued for their workers."""
    sent = 0
    try:
        for batch in batches(entries, PUBLISH_BATCH):
            (enqueue or enqueue_queries)(batch)
            sent += len(batch)
    except Exception as error:
        from kombu.exceptions import BatchPublishError
        from kombu.exceptions import OperationalError as BrokerError

        if not isinstance(error, BrokerError | BatchPublishError | ConnectionError | OSError):
            raise
        message = f"could not reach the broker ({type(error).__name__}: {error})"
        unsent = [query_id for query_id, _ in entries[sent:]]
        with session_scope() as session:
            for ids in batches(unsent, INSERT_BATCH):
                session.execute(
                    update(Query)
                    .where(Query.id.in_(ids), Query.status == "queued")
                    .values(status="failed", error=message[:4000], error_stage=ENQUEUE_STAGE, updated_at=now())
                )
        raise EnqueueError(job_id, len(unsent), error) from error


def enqueue_queries(entries: list[tuple[uuid.UUID, Stage]]) -> None:
    """One message per query, to the task of the stage it (re)starts at, over one broker connection and
    in one round trip (kombu's publish batch: one Redis pipeline, flushed when the block ends). Per
    message Celery's own work is what is left: each queue is declared with its first message only (the
    declaration is what routes to it), and the arguments' repr for the task-sent event is written here
    rather than by `saferepr`."""
    from services.common.celery_app import app

    if not entries:
        return
    declared: set[Stage] = set()
    with app.producer_or_acquire() as producer, producer.batch(max_size=len(entries)):
        for query_id, stage in entries:
            payload = {"query_id": str(query_id)}
            app.send_task(
                ANSWER_TASKS[stage],
                args=[payload],
                producer=producer,
                argsrepr=repr([payload]),
                kwargsrepr="{}",
                **({} if stage not in declared else {"declare": []}),
            )
            declared.add(stage)


class RetryReport(BaseModel):
    job_id: uuid.UUID
    requeued: dict[str, int]  # stage -> queries re-entering there
    not_retryable: list[QueryFailure]  # input errors: fix the questions file and submit again


def resume_stage(succeeded: set[str]) -> Stage:
    return next(stage for stage in PIPELINE if stage.value not in succeeded)


def retry_job(job_id: str | uuid.UUID) -> RetryReport:
    """Re-run the failed (and cancelled) queries of a job, each from the first stage that has not
    succeeded for it: the stage that failed. Earlier stages' outputs are kept. A cancelled job is
    resumed. Queries whose line was not a question cannot be retried."""
    job_id = parse_job_id(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        queries = session.scalars(
            select(Query).where(Query.job_id == job_id, Query.status.in_(("failed", "cancelled")))
        ).all()
        succeeded: dict[uuid.UUID, set[str]] = {}
        for query_id, stage in session.execute(
            select(StageRun.query_id, StageRun.stage)
            .join(Query, Query.id == StageRun.query_id)
            .where(Query.job_id == job_id, StageRun.status == "succeeded")
        ):
            succeeded.setdefault(query_id, set()).add(stage)
        entries: list[tuple[uuid.UUID, Stage]] = []
        not_retryable: list[QueryFailure] = []
        for query in queries:
            if query.status == "failed" and query.error_stage == INPUT_STAGE:
                not_retryable.append(
                    QueryFailure(
                        query_id=query.id, id=query.external_id, stage=INPUT_STAGE, error=query.error, line=query.line
                    )
                )
                continue
            done = succeeded.get(query.id, set())
            if len(done) == len(PIPELINE):  # answered before the cancel landed
                query.status = "succeeded"
                continue
            query.status, query.error, query.error_stage = "queued", None, None
            entries.append((query.id, resume_stage(done)))
        job.cancelled_at = None
        job.finished_at = None
    send_or_mark_failed(job_id, entries)
    requeued: dict[str, int] = {}
    for _, stage in entries:
        requeued[stage.value] = requeued.get(stage.value, 0) + 1
    return RetryReport(job_id=job_id, requeued=requeued, not_retryable=not_retryable)


def cancel_job(job_id: str | uuid.UUID) -> int:
    """Cancel what has not finished: queued and running queries become `cancelled` and their next
    stage does not run (a stage already running finishes its own step). Returns how many."""
    job_id = parse_job_id(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        if job.cancelled_at is None:
            job.cancelled_at = now()
        result = session.execute(
            update(Query)
            .where(Query.job_id == job_id, Query.status.in_(("queued", "running")))
            .values(status="cancelled", error="cancelled by the user", updated_at=now())
        )
        return result.rowcount or 0
