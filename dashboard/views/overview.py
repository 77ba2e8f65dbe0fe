"""Overview: servers, workers per queue (ping, warm-up), queue depths, tasks in flight, last hour's throughput."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pandas as pd
import streamlit as st
from sqlalchemy import func, select

from services.common.db import session_scope
from services.common.health import (
    online_workers,
    probe_postgres,
    probe_redis,
    probe_s3,
    queue_depths,
    worker_warmth,
    workers_of,
)
from services.common.models import StageRun
from services.common.queues import Stage
from services.common.stage_runs import now
from services.jobs.status import worker_gone


def in_flight() -> tuple[Counter, Counter]:
    """Stage attempts running right now, per stage (from the stage-run rows), and those of them whose worker
    is gone (waiting for their message's redelivery, from the workers' heartbeats)."""
    with session_scope() as session:
        rows = session.execute(
            select(StageRun.stage, StageRun.worker, StageRun.started_at).where(StageRun.status == "running")
        ).all()
    gone = worker_gone() if rows else None
    running = Counter(row.stage for row in rows)
    waiting = Counter(row.stage for row in rows if gone is not None and gone(row.worker, row.started_at))
    return running, waiting


def throughput_last_hour() -> pd.DataFrame:
    """Stage attempts finished per minute over the last hour, per stage and outcome."""
    since = now() - timedelta(hours=1)
    with session_scope() as session:
        rows = session.execute(
            select(
                func.date_trunc("minute", StageRun.finished_at).label("minute"),
                StageRun.stage,
                func.count(),
            )
            .where(StageRun.finished_at >= since, StageRun.status == "succeeded")
            .group_by("minute", StageRun.stage)
        ).all()
    frame = pd.DataFrame(rows, columns=["minute", "stage", "finished"])
    if frame.empty:
        return frame
    return frame.pivot_table(index="minute", columns="stage", values="finished", fill_value=0).sort_index()


def render(settings) -> None:
    st.header("Cluster overview")
    servers = {
        "PostgreSQL": probe_postgres(settings.database_url),
        "Redis": probe_redis(settings.redis_url),
        "S3": probe_s3(settings),
    }
    columns = st.columns(len(servers))
    for column, (name, probe) in zip(columns, servers.items(), strict=True):
        column.metric(name, "healthy" if probe.healthy else "DOWN")
        column.caption(probe.detail)
    if not servers["PostgreSQL"].healthy:
        st.error("PostgreSQL does not answer: jobs, answers and workers' state are unavailable.")
        return

    online, broker_error = online_workers(settings.redis_url)
    if broker_error:
        st.error(f"Cannot reach the workers through Redis: {broker_error}")
    depths = queue_depths(settings.redis_url)
    warmth = worker_warmth(settings.redis_url) or {}
    running, waiting = in_flight()
    rows = []
    for stage in Stage:
        names = workers_of(stage, online)
        # A worker takes messages once ready: its processes loaded their models (services/common/warmup.py).
        states = {name: warmth[name].state if name in warmth else "starting" for name in names}
        warm_up = [warmth[name].seconds for name in names if name in warmth and warmth[name].seconds is not None]
        rows.append(
            {
                "stage": stage.value,
                "queue": stage.queue,
                "workers online": len(names),
                "workers ready": sum(state == "ready" for state in states.values()),
                "warm-up s": round(max(warm_up), 1) if warm_up else None,
                "waiting messages": depths[stage.queue],
                "in flight": running[stage.value] - waiting[stage.value],
                "waiting for redelivery": waiting[stage.value],
                "workers": ", ".join(f"{name} ({state})" for name, state in states.items()) or "none",
            }
        )
    st.subheader("Workers and queues")
    st.dataframe(rows, hide_index=True, width="stretch")
    if sum(waiting.values()):
        st.warning(
            f"{sum(waiting.values())} stage attempts are waiting for redelivery: their worker stopped, and their "
            "messages go back to the queue within seconds for the next worker of the stage."
        )
    missing = [row["stage"] for row in rows if row["workers online"] == 0]
    if missing:
        st.warning(f"No worker online for: {', '.join(missing)}. Messages wait in their queues until one starts.")
    st.subheader("Throughput, last hour (stage runs finished per minute)")
    frame = throughput_last_hour()
    if frame.empty:
        st.caption("Nothing finished in the last hour.")
    else:
        st.line_chart(frame)
        st.caption(f"{int(frame.get('merger', pd.Series(dtype=int)).sum())} answers in the last hour")
    if st.button("Refresh"):
        st.rerun()
