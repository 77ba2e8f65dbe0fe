"""Job detail: the job's per-stage aggregates, then its queries a page at a time with per-stage status and
timings (a chart of the page), error messages, links to answers. A job of 10,000 questions shows its
counts and percentiles (computed in Postgres) and one page of questions, never a table of all of them."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.views.common import STATE_ICON, auto_refresh_seconds, client, link, ms
from services.client import UnknownJob
from services.common.queues import PIPELINE

PAGE_SIZES = (25, 50, 100, 200)
FAILURES_SHOWN = 100
STAGE_ICON = {"succeeded": "✅", "failed": "❌", "running": "⏳", "retrying": "🔁", "lost": "💥", "superseded": "➖"}


def pick_job() -> str | None:
    jobs = client().jobs(limit=100)
    if not jobs:
        st.info("No jobs yet: submit one on the Jobs page.")
        return None
    ids = [str(j.id) for j in jobs]
    wanted = st.query_params.get("job")
    if wanted and wanted not in ids:
        ids.insert(0, wanted)
    labels = {str(j.id): f"{str(j.id)[:8]} · {j.name or ''} · {j.state}" for j in jobs}
    chosen = st.selectbox(
        "Job", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=lambda i: labels.get(i, i)
    )
    if chosen != wanted:
        st.query_params["job"] = chosen
    return chosen


def query_rows(job_id: str, offset: int = 0, limit: int | None = None, status: str | None = None) -> list[dict]:
    rows = []
    for view in client().queries(job_id, offset=offset, limit=limit, status=status):
        row = {
            "id": view.id,
            "question": view.question[:120],
            "status": f"{STATE_ICON.get(view.status, '')} {view.status}",
        }
        for stage in PIPELINE:
            info = view.stages.get(stage.value)
            if info is None:
                row[stage.value] = ""
                row[f"{stage.value} ms"] = None
                continue
            retries = f" ×{info['attempts']}" if info["attempts"] > 1 else ""
            row[stage.value] = f"{STAGE_ICON.get(info['status'], info['status'])}{retries}"
            row[f"{stage.value} ms"] = ms(info.get("seconds")) if info["status"] == "succeeded" else None
        row["error"] = view.error or ""
        row["answer"] = link("answer", query=str(view.query_id)) if view.has_answer else None
        rows.append(row)
    return rows


def render(settings) -> None:
    st.header("Job detail")
    job_id = pick_job()
    if job_id is None:
        return
    try:
        status = client().status(job_id, failure_limit=0)
    except UnknownJob as error:
        st.error(str(error))
        return

    def backend(kind: str) -> str:
        chosen = getattr(status.config, kind)
        return chosen or f"{getattr(settings, f'{kind}_backend')} (workers' default)"

    @st.fragment(run_every=auto_refresh_seconds("job", not status.done))
    def live() -> None:
        current = client().status(job_id, failure_limit=FAILURES_SHOWN)
        cols = st.columns(5)
        cols[0].metric("State", current.state)
        cols[1].metric("Answered", f"{current.counts.get('succeeded', 0)} / {current.total}")
        cols[2].metric("Failed", current.counts.get("failed", 0))
        cols[3].metric("Elapsed", f"{current.elapsed_s or 0:.1f} s")
        cols[4].metric("Questions/s", f"{current.questions_per_s or 0:.2f}")
        st.progress(current.progress, text=f"{current.progress:.0%} of the questions ended")
        st.caption(
            f"collection {current.collection} · backends {backend('generator')} + {backend('inserter')} · "
            f"created {current.created_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        st.subheader("Stages")
        st.dataframe(
            [
                {
                    "stage": s.stage,
                    "done": s.succeeded,
                    "running": s.running + s.retrying,
                    "waiting for redelivery": s.waiting,
                    "pending": s.pending,
                    "failed": s.failed,
                    "redelivered": s.lost,
                    "p50 ms": ms(s.p50_s),
                    "p99 ms": ms(s.p99_s),
                    "queue wait p50 ms": ms(s.wait_p50_s),
                }
                for s in current.stages
            ],
            hide_index=True,
            width="stretch",
        )
        waiting = [f"{s.stage} ({s.waiting})" for s in current.stages if s.waiting]
        if waiting:
            st.warning(
                f"Waiting for redelivery: {', '.join(waiting)}. The worker running these stopped; their messages "
                "go back to the queue within seconds, for the next worker of the stage."
            )
        if current.failures:
            failed = current.counts.get("failed", 0)
            st.subheader(f"Failures ({failed})")
            if len(current.failures) < failed:
                st.caption(f"the first {len(current.failures)} in file order; the questions below filter by `failed`")
            st.dataframe(
                [{"question": f.id, "line": f.line, "stage": f.stage, "error": f.error} for f in current.failures],
                hide_index=True,
                width="stretch",
            )
        questions_page(job_id, current.counts)

    live()


def questions_page(job_id: str, counts: dict[str, int]) -> None:
    """One page of the job's questions (optionally of one status), with the time per stage of that page."""
    st.subheader("Questions")
    left, middle, right = st.columns(3)
    status = left.selectbox("Status", ["all", *sorted(counts)], key="questions-status")
    size = middle.selectbox("Per page", PAGE_SIZES, index=1, key="questions-size")
    total = counts.get(status, 0) if status != "all" else sum(counts.values())
    pages = max(1, -(-total // size))
    number = int(right.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, key="questions-page"))
    offset = (number - 1) * size
    rows = query_rows(job_id, offset=offset, limit=size, status=None if status == "all" else status)
    st.caption(f"questions {offset + 1 if rows else 0}–{offset + len(rows)} of {total}")
    # Numbered so the chart's legend (sorted by name) keeps the pipeline's order.
    timings = pd.DataFrame(
        {f"{n}. {stage.value}": [row[f"{stage.value} ms"] or 0 for row in rows] for n, stage in enumerate(PIPELINE, 1)},
        index=[row["id"] for row in rows],
    )
    if not timings.empty and timings.to_numpy().sum() > 0:
        st.caption("Time per stage, per question of this page (ms)")
        st.bar_chart(timings, horizontal=True, height=max(200, 22 * len(rows)))
    st.dataframe(
        rows,
        hide_index=True,
        width="stretch",
        column_order=["id", "question", "status", *[s.value for s in PIPELINE], "error", "answer"],
        column_config={"answer": st.column_config.LinkColumn("answer", display_text="open")},
    )
