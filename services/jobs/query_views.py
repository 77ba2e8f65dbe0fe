"""A job's queries a page at a time, each with its per-stage state and timings: the dashboard's job page
and `Client.queries`. One page is one read of its queries, their stage runs and which have an answer;
a job of 10,000 questions is never loaded whole to show 50 of them."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select

from services.common.db import session_scope
from services.common.models import Answer, Query, StageRun
from services.jobs.status import parse_job_id


class QueryView(BaseModel):
    """One query of a job with its per-stage state and timings (the job detail page)."""

    query_id: uuid.UUID
    id: str
    question: str
    status: str
    error: str | None
    line: int | None
    stages: dict[str, dict[str, Any]]  # stage -> {status, attempts, seconds, worker}
    has_answer: bool


def query_count(job_id: str | uuid.UUID, status: str | None = None) -> int:
    """How many queries the job has (with that status, if given): the pages' total."""
    job_id = parse_job_id(job_id)
    condition = [Query.job_id == job_id] + ([Query.status == status] if status else [])
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Query).where(*condition)) or 0


def query_views(
    job_id: str | uuid.UUID, *, offset: int = 0, limit: int | None = None, status: str | None = None
) -> list[QueryView]:
    """The job's queries in file order from `offset` (`limit` of them; all when None), only those with
    `status` if given, each with its stages: the last attempt's state, unless one succeeded."""
    job_id = parse_job_id(job_id)
    condition = [Query.job_id == job_id] + ([Query.status == status] if status else [])
    with session_scope() as session:
        queries = session.scalars(
            select(Query)
            .where(*condition)
            .order_by(Query.line.nulls_last(), Query.created_at, Query.id)
            .offset(max(offset, 0))
            .limit(limit)
        ).all()
        ids = [query.id for query in queries]
        runs = session.scalars(
            select(StageRun).where(StageRun.query_id.in_(ids)).order_by(StageRun.attempt)
            if ids
            else select(StageRun).where(False)
        )
        answered = set(session.scalars(select(Answer.query_id).where(Answer.query_id.in_(ids)))) if ids else set()
        stages: dict[uuid.UUID, dict[str, dict[str, Any]]] = {}
        for run in runs:
            entry = stages.setdefault(run.query_id, {}).setdefault(run.stage, {"attempts": 0})
            entry["attempts"] += 1
            if entry.get("status") != "succeeded":
                entry.update(
                    status=run.status,
                    worker=run.worker,
                    started_at=run.started_at,
                    seconds=(run.finished_at - run.started_at).total_seconds() if run.finished_at else None,
                    error=run.error,
                )
        return [
            QueryView(
                query_id=q.id,
                id=q.external_id,
                question=q.question,
                status=q.status,
                error=q.described_error,
                line=q.line,
                stages=stages.get(q.id, {}),
                has_answer=q.id in answered,
            )
            for q in queries
        ]
