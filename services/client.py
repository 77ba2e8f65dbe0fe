"""The Python client of m2io: what the CLI does, for scripts and the dashboard.

    from services.client import Client
    client = Client()
    job = client.submit("questions.jsonl", collection="recipes")
    status = client.wait(job)
    client.export(job, "answers/")

It talks to the cluster the settings point at (`M2IO_*` variables, else `<state dir>/cluster.env`
written by `m2io up`): Postgres for jobs and answers, Redis to enqueue, S3 for answers' bytes.
Errors a user can fix are `JobError` (bad submission) and `UnknownJob`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from services.common.contracts import InsertionPlan, JobConfig, Retrieval, TextAnswer
from services.common.db import session_scope
from services.common.models import Answer, Collection, Document, Image, IngestItem, Query
from services.common.stage_runs import outputs_of
from services.jobs import commands
from services.jobs.commands import JobError, RetryReport
from services.jobs.query_views import QueryView, query_count, query_views
from services.jobs.questions import QuestionLine, from_records, stream_questions
from services.jobs.status import JobStatus, UnknownJob, job_status, list_jobs

if TYPE_CHECKING:
    from services.retriever.ingest_runs import StagedRun

__all__ = [
    "Client",
    "JobConfig",
    "JobError",
    "UnknownJob",
    "JobStatus",
    "RetryReport",
    "QueryView",
    "AnswerView",
    "IngestProgress",
    "IngestReport",
]


class AnswerView(BaseModel):
    """Everything about one answer: the interleaved blocks, how they came to be, and the gold."""

    query_id: uuid.UUID
    job_id: uuid.UUID
    id: str
    question: str
    status: str
    error: str | None
    markdown: str | None
    blocks: list[dict[str, Any]]
    html_key: str | None
    retrieval: Retrieval | None
    text_answer: TextAnswer | None
    plan: InsertionPlan | None
    gold: dict[str, Any]
    metrics: dict[str, Any] | None  # when the question has gold fields


@dataclass
class IngestProgress:
    """Where an ingest run stands: its items by status (`pending` documents wait for a worker)."""

    run_id: uuid.UUID
    counts: dict[str, int]

    @property
    def pending(self) -> int:
        return self.counts.get("pending", 0)


@dataclass
class IngestReport:
    """An ingest run: its status and its items (loaded, detached from the session)."""

    run_id: uuid.UUID
    status: str
    items: list[IngestItem]


class Client:
    def collections(self) -> list[dict[str, Any]]:
        """Every collection with its model and how many documents and images it holds."""
        with session_scope() as session:
            documents = dict(
                session.execute(select(Document.collection_id, func.count()).group_by(Document.collection_id)).all()
            )
            images = dict(
                session.execute(select(Image.collection_id, func.count()).group_by(Image.collection_id)).all()
            )
            return [
                {
                    "name": c.name,
                    "embedding_model": c.embedding_model,
                    "dimension": c.embedding_dim,
                    "documents": documents.get(c.id, 0),
                    "images": images.get(c.id, 0),
                    "created_at": c.created_at,
                }
                for c in session.scalars(select(Collection).order_by(Collection.name))
            ]

    def start_ingest(
        self,
        path: str | Path,
        collection: str,
        model: str | None = None,
        *,
        on_document: Callable[[str], None] = lambda _: None,
    ) -> StagedRun:
        """Read a corpus (verify and store its images in S3) and queue its documents for the
        retriever workers; returns the staged run (id, documents, batches) at once. `on_document`
        is called with each document's key as it is read."""
        from services.common.embedding import DEFAULT_EMBEDDING_MODEL
        from services.common.settings import get_settings
        from services.common.storage import get_store
        from services.retriever.ingest_runs import check_collection_model, enqueue, stage_run

        model = model or get_settings().embedding_model or DEFAULT_EMBEDDING_MODEL
        check_collection_model(collection, model)
        store = get_store()
        store.ensure_bucket()
        staged = stage_run(Path(path), collection, model, store, on_document=on_document)
        enqueue(staged)
        return staged

    def ingest(self, path: str | Path, collection: str, model: str | None = None) -> uuid.UUID:
        """`start_ingest`, returning only the ingest run id (`wait_ingest()` or `ingest_runs()` follows it)."""
        return self.start_ingest(path, collection, model).run_id

    def wait_ingest(
        self,
        run_id: uuid.UUID,
        *,
        stall_timeout: float | None = None,
        poll_s: float = 0.5,
        on_update: Callable[[IngestProgress], None] | None = None,
    ) -> IngestProgress:
        """Poll until no document of the run is pending. TimeoutError after `stall_timeout` seconds
        without any document finishing (the run goes on in the workers). The run stays open:
        `finish_ingest` closes it."""
        from services.retriever.ingest_runs import item_counts

        last_pending, last_change = None, time.monotonic()
        while True:
            progress = IngestProgress(run_id=run_id, counts=dict(item_counts(run_id)))
            if on_update is not None:
                on_update(progress)
            if not progress.pending:
                return progress
            if progress.pending != last_pending:
                last_pending, last_change = progress.pending, time.monotonic()
            elif stall_timeout is not None and time.monotonic() - last_change > stall_timeout:
                raise TimeoutError(f"ingest run {run_id}: no progress for {stall_timeout:.0f}s")
            time.sleep(poll_s)

    def finish_ingest(self, run_id: uuid.UUID) -> str:
        """Close an ingest run now; returns its status: done, done with failures, or incomplete
        (documents still pending)."""
        from services.retriever.ingest_runs import finish_run

        return finish_run(run_id).status

    def ingest_report(self, run_id: uuid.UUID) -> IngestReport:
        """An ingest run's status and every item (documents and skipped inputs) in order; LookupError
        when there is no such run."""
        from collections import Counter

        from services.common.models import IngestRun
        from services.retriever.ingest_runs import run_state

        with session_scope() as session:
            run = session.get(IngestRun, run_id)
            if run is None:
                raise LookupError(f"no ingest run {run_id}")
            items = list(session.scalars(select(IngestItem).where(IngestItem.run_id == run_id).order_by(IngestItem.id)))
            counts = Counter(item.status for item in items)
            return IngestReport(run_id=run.id, status=run_state(run.status, counts), items=items)

    def ingest_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """Recent ingest runs with their item counts; a run whose documents are all done is closed."""
        from services.common.models import IngestRun
        from services.retriever.ingest_runs import finish_run, item_counts, run_state

        with session_scope() as session:
            runs = session.scalars(select(IngestRun).order_by(IngestRun.created_at.desc()).limit(limit)).all()
        listed = []
        for run in runs:
            counts = item_counts(run.id)
            status = run_state(run.status, counts)  # from its items: a run whose worker died is not left behind
            if run.status == "running" and not counts.get("pending"):
                status = finish_run(run.id).status
            listed.append(
                {
                    "run": str(run.id),
                    "collection": run.collection_name,
                    "source": run.source,
                    "status": status,
                    "pending": counts.get("pending", 0),
                    "ingested": counts.get("ingested", 0),
                    "unchanged": counts.get("unchanged", 0),
                    "skipped": counts.get("skipped", 0),
                    "failed": counts.get("failed", 0),
                    "created_at": run.created_at,
                }
            )
        return listed

    def documents(self, collection: str, limit: int = 500) -> list[dict[str, Any]]:
        from services.common.models import Chunk

        with session_scope() as session:
            found = commands.check_collection(session, collection)
            chunks = dict(
                session.execute(
                    select(Chunk.document_id, func.count())
                    .where(Chunk.collection_id == found.id)
                    .group_by(Chunk.document_id)
                ).all()
            )
            images = dict(
                session.execute(
                    select(Image.document_id, func.count())
                    .where(Image.collection_id == found.id)
                    .group_by(Image.document_id)
                ).all()
            )
            return [
                {"document": d.doc_key, "title": d.title, "chunks": chunks.get(d.id, 0), "images": images.get(d.id, 0)}
                for d in session.scalars(
                    select(Document).where(Document.collection_id == found.id).order_by(Document.doc_key).limit(limit)
                )
            ]

    def images(self, collection: str, offset: int = 0, limit: int = 24) -> list[dict[str, Any]]:
        with session_scope() as session:
            found = commands.check_collection(session, collection)
            rows = session.execute(
                select(Image, Document.doc_key)
                .join(Document, Document.id == Image.document_id)
                .where(Image.collection_id == found.id)
                .order_by(Document.doc_key, Image.position)
                .offset(offset)
                .limit(limit)
            ).all()
            return [
                {
                    "source_name": image.source_name,
                    "caption": image.caption or image.alt_text,
                    "document": doc_key,
                    "s3_key": image.s3_key,
                    "width": image.width,
                    "height": image.height,
                }
                for image, doc_key in rows
            ]

    def submit(
        self,
        questions: str | Path | Iterable[dict[str, Any]] | list[QuestionLine],
        config: JobConfig | str | list[str],
        *,
        generator: str | None = None,
        inserter: str | None = None,
        top_k: int | None = None,
        candidates: int | None = None,
        name: str | None = None,
    ) -> uuid.UUID:
        """Submit a job: a questions .jsonl path (read as a stream), or question dicts (`id`, `question`, gold fields).

        `config` is a `JobConfig`, or a collection name (a list of names, or `all`: the router chooses per
        question) with the other options as keywords."""
        if isinstance(config, str | list | tuple):
            config = commands.job_config(
                config, generator=generator, inserter=inserter, top_k=top_k, candidates=candidates
            )
        elif any(option is not None for option in (generator, inserter, top_k, candidates)):
            raise JobError("give the options in the JobConfig, not beside it")
        if isinstance(questions, str | Path):
            parsed = stream_questions(Path(questions))  # stored in batches as it is read
            name = name or Path(questions).name
        else:
            items = list(questions)
            parsed = items if items and isinstance(items[0], QuestionLine) else from_records(items)
        return commands.submit_job(parsed, config, name=name)

    def status(self, job_id: str | uuid.UUID, *, failure_limit: int | None = None) -> JobStatus:
        return job_status(job_id, failure_limit=failure_limit)

    def jobs(self, limit: int = 50, state: str | None = None, search: str | None = None) -> list[JobStatus]:
        return list_jobs(limit=limit, state=state, search=search)

    def wait(
        self,
        job_id: str | uuid.UUID,
        *,
        timeout: float | None = None,
        stall_timeout: float | None = None,
        poll_s: float = 0.5,
        on_update: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Poll until the job ends. TimeoutError after `timeout` seconds in all, or after
        `stall_timeout` seconds without any stage finishing anything (the job goes on)."""
        started = time.monotonic()
        last_progress, last_seen = started, None
        status: JobStatus | None = None
        while True:
            try:
                status = job_status(job_id)
            except OperationalError:
                if status is None:
                    raise
                # Postgres is away for a moment (a restart): the job goes on in the workers; keep
                # waiting, and let the stall timeout decide if it does not come back.
                if stall_timeout is not None and time.monotonic() - last_progress > stall_timeout:
                    raise
                time.sleep(poll_s)
                continue
            if on_update is not None:
                on_update(status)
            if status.done:
                return status
            seen = (
                tuple((s.succeeded, s.failed, s.attempts) for s in status.stages),
                tuple(sorted(status.counts.items())),
            )
            if seen != last_seen:
                last_seen, last_progress = seen, time.monotonic()
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"job {status.id} still {status.state} after {timeout:.0f}s")
            if stall_timeout is not None and time.monotonic() - last_progress > stall_timeout:
                raise TimeoutError(f"job {status.id}: no progress for {stall_timeout:.0f}s ({status.state})")
            time.sleep(poll_s)

    def retry(self, job_id: str | uuid.UUID) -> RetryReport:
        return commands.retry_job(job_id)

    def cancel(self, job_id: str | uuid.UUID) -> int:
        return commands.cancel_job(job_id)

    def export(self, job_id: str | uuid.UUID, out_dir: str | Path):
        from services.jobs.export import export_job

        return export_job(job_id, Path(out_dir))

    def evaluate(self, job_ids: list[str | uuid.UUID], out: str | Path | None = None) -> list[dict[str, Any]]:
        """Score finished jobs (stored as eval runs); with `out`, write REPORT.json and REPORT.png."""
        from services.jobs.evaluate import score_job, write_report

        reports = [score_job(job_id) for job_id in job_ids]
        if out is not None:
            write_report(reports, Path(out))
        return reports

    def queries(
        self, job_id: str | uuid.UUID, *, offset: int = 0, limit: int | None = None, status: str | None = None
    ) -> list[QueryView]:
        """A job's queries in file order with their stages: a page of them (`offset`, `limit`, `status`)."""
        return query_views(job_id, offset=offset, limit=limit, status=status)

    def query_count(self, job_id: str | uuid.UUID, status: str | None = None) -> int:
        return query_count(job_id, status)

    def answer(self, query_id: str | uuid.UUID) -> AnswerView:
        from services.jobs.evaluate import score_query

        query_id = uuid.UUID(str(query_id))
        with session_scope() as session:
            query = session.get(Query, query_id)
            if query is None:
                raise LookupError(f"no query {query_id}")
            answer = session.execute(select(Answer).where(Answer.query_id == query_id)).scalar_one_or_none()
            outputs = outputs_of(query_id)
            view = AnswerView(
                query_id=query.id,
                job_id=query.job_id,
                id=query.external_id,
                question=query.question,
                status=query.status,
                error=query.described_error,
                markdown=answer.markdown if answer else None,
                blocks=answer.blocks if answer else [],
                html_key=answer.html_key if answer else None,
                retrieval=outputs.retrieval,
                text_answer=outputs.answer,
                plan=outputs.plan,
                gold=dict(query.gold or {}),
                metrics=None,
            )
        if view.gold.get("gold_answer"):
            view.metrics = score_query(view.question, view.gold, outputs, view.status)
        return view
