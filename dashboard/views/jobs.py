"""Jobs: every job with its state, progress and counts per stage; filter, search, submit, cancel, retry."""

from __future__ import annotations

import streamlit as st

from dashboard.views.common import STATE_ICON, age, auto_refresh_seconds, client, link
from services.client import JobError, UnknownJob
from services.generator.core import BACKENDS as GENERATOR_BACKENDS
from services.inserter.core import BACKENDS as INSERTER_BACKENDS
from services.jobs.commands import job_config
from services.jobs.questions import parse_lines
from services.jobs.status import stage_successes

STATES = ["queued", "running", "succeeded", "partial", "failed", "cancelled"]


def jobs_table(filter_states: list[str], search: str) -> list[dict]:
    listed = [
        status
        for status in client().jobs(limit=100, search=search or None)
        if not filter_states or status.state in filter_states
    ]
    per_stage = stage_successes([status.id for status in listed])  # one grouped count, not a status per job
    rows = []
    for status in listed:
        done = per_stage[status.id]
        rows.append(
            {
                "job": link("job", job=str(status.id)),
                "name": status.name or "",
                "collection": status.collection or "?",
                "state": f"{STATE_ICON.get(status.state, '')} {status.state}",
                "progress": status.progress,
                "answered": status.counts.get("succeeded", 0),
                "failed": status.counts.get("failed", 0),
                "total": status.total,
                **{f"{stage}": count for stage, count in done.items()},
                "age": age(status.created_at),
                "id": str(status.id),
            }
        )
    return rows


def submit_form() -> None:
    collections = [c["name"] for c in client().collections()]
    with st.form("submit", clear_on_submit=False):
        st.markdown("**Submit a job**")
        if not collections:
            st.info("No collection yet: ingest a corpus on the Collections page first.")
        chosen = st.multiselect(
            "Collections",
            collections,
            default=collections if len(collections) == 1 else [],  # the only one, else the user's choice
            key="submit-collection",
            help="several: the router chooses per question among them (a question's own `collection` pins it)",
        )
        upload = st.file_uploader("Questions (JSONL: `id`, `question`, optional gold fields)", type=["jsonl", "json"])
        left, right, third = st.columns(3)
        generator = left.text_input("Generator", value="extractive", help=" | ".join(GENERATOR_BACKENDS) + " (:model)")
        inserter = right.text_input("Inserter", value="rule", help=" | ".join(INSERTER_BACKENDS) + " (:name)")
        top_k = third.number_input("Passages (top k)", min_value=1, max_value=100, value=5)
        name = st.text_input("Name (optional)")
        sent = st.form_submit_button("Submit")
    if not sent:
        return
    if upload is None or not chosen:
        st.error("Choose a collection and a questions file.")
        return
    questions = parse_lines(upload.getvalue().splitlines())
    try:
        config = job_config(
            chosen, generator=generator.strip() or None, inserter=inserter.strip() or None, top_k=int(top_k)
        )
        job_id = client().submit(questions, config, name=name.strip() or upload.name)
    except JobError as error:
        st.error(str(error))
        return
    bad = [q for q in questions if q.error]
    st.success(f"Job {job_id} submitted: {len(questions)} questions" + (f", {len(bad)} refused" if bad else ""))
    for entry in bad[:10]:
        st.warning(entry.error)
    st.session_state["last-submitted"] = str(job_id)


def actions(rows: list[dict]) -> None:
    if not rows:
        return
    ids = [row["id"] for row in rows]
    labels = {row["id"]: f"{row['id'][:8]} · {row['name']} · {row['state']}" for row in rows}
    chosen = st.selectbox("Job", ids, format_func=labels.get, key="action-job")
    cancel_col, retry_col, open_col = st.columns(3)
    try:
        if cancel_col.button("Cancel job", key="cancel"):
            count = client().cancel(chosen)
            st.success(f"{count} unfinished queries cancelled.")
        if retry_col.button("Retry failed", key="retry"):
            report = client().retry(chosen)
            where = ", ".join(f"{n} at {stage}" for stage, n in report.requeued.items()) or "nothing to retry"
            st.success(f"Requeued: {where}.")
            for failure in report.not_retryable:
                st.warning(f"Not retried (fix the questions file): {failure.id}: {failure.error}")
    except (UnknownJob, JobError) as error:
        st.error(str(error))
    open_col.link_button("Open job", link("job", job=chosen))


def render(settings) -> None:
    st.header("Jobs")
    left, right = st.columns([2, 3])
    filter_states = left.multiselect("State", STATES, key="job-states")
    search = right.text_input("Search (id, name, collection)", key="job-search")
    rows = jobs_table(filter_states, search)
    running = any(row["state"].split()[-1] in ("queued", "running") for row in rows)

    @st.fragment(run_every=auto_refresh_seconds("jobs", running))
    def live_table() -> None:
        current = jobs_table(filter_states, search)
        if not current:
            st.info("No jobs yet." if not (filter_states or search) else "No job matches.")
            return
        st.dataframe(
            current,
            hide_index=True,
            width="stretch",
            column_order=[
                "job",
                "name",
                "collection",
                "state",
                "progress",
                "answered",
                "failed",
                "total",
                "retriever",
                "generator",
                "inserter",
                "merger",
                "age",
            ],
            column_config={
                "job": st.column_config.LinkColumn("job", display_text=r"job=([0-9a-f]{8})"),
                "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            },
        )

    live_table()
    actions(rows)
    st.divider()
    submit_form()
