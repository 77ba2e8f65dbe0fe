"""Celery entry points of the merger stage: the last hop; it stores the answer and ends the query."""

from __future__ import annotations

from celery import Task
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as upsert

from services.common.contracts import MergeOutput, QueryRef
from services.common.db import session_scope
from services.common.models import Answer, Query
from services.common.queues import Stage
from services.common.smoke import smoke_task
from services.common.stage_runs import now, outputs_of, query_context
from services.common.storage import get_store
from services.common.tasks import answer_task
from services.merger.core import merge

smoke = smoke_task(Stage.MERGER)


def finish_query(ref: QueryRef) -> None:
    """The query is answered once its merge stage run is recorded as succeeded (not before: a merger
    killed in between must not leave a query `succeeded` whose last stage has not)."""
    with session_scope() as session:
        session.execute(update(Query).where(Query.id == ref.query_id).values(status="succeeded", updated_at=now()))


@answer_task(Stage.MERGER, then=finish_query)
def merge_for_query(ref: QueryRef, task: Task) -> MergeOutput:
    question = query_context(ref.query_id).question
    outputs = outputs_of(ref.query_id, require=[Stage.RETRIEVER, Stage.GENERATOR, Stage.INSERTER])
    store = get_store()
    merged, page = merge(
        question, outputs.answer.units, outputs.plan, outputs.retrieval.candidates, store, outputs.retrieval
    )
    prefix = f"answers/{ref.query_id}"
    # The page (large: images inline) goes to S3; the Markdown and blocks to the answer row below.
    store.put_named(f"{prefix}/answer.html", page.encode(), "text/html; charset=utf-8")
    blocks = [block.model_dump(mode="json", exclude_none=True) for block in merged.blocks]
    # Upsert by query: a redelivered merge (after a crash past this point) rewrites the same row.
    with session_scope() as session:
        session.execute(
            upsert(Answer)
            .values(query_id=ref.query_id, markdown=merged.markdown, blocks=blocks, html_key=f"{prefix}/answer.html")
            .on_conflict_do_update(
                index_elements=["query_id"],
                set_={"markdown": merged.markdown, "blocks": blocks, "html_key": f"{prefix}/answer.html"},
            )
        )
    return MergeOutput(
        html_key=f"{prefix}/answer.html",
        images=sum(b["type"] == "image" for b in blocks),
        warnings=merged.warnings,
    )
