"""Overview: servers, workers per queue (Celery ping), queue depths, tasks in flight, last hour's throughput."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import streamlit as st
from sqlalchemy import func, select

from services.common.db import session_scope
from services.common.health import online_workers, probe_postgres, probe_redis, probe_s3, queue_depths, workers_of
from services.common.models import StageRun
from services.common.queues import Stage
from services.common.stage_runs import now


def in_flight() -> dict[str, int]:
    """Stage attempts running right now, per stage (from the stage-run rows)."""
    with session_scope() as session:
        return dict(
            session.execute(
                select(StageRun.stage, func.count()).where(StageRun.status == "running").group_by(StageRun.stage)
            ).all()
        )


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
    running = in_flight()
    rows = []
    for stage in Stage:
        names = workers_of(stage, online)
        rows.append(
            {
                "stage": stage.value,
                "queue": stage.queue,
                "workers online": len(names),
                "waiting messages": depths[stage.queue],
                "in flight": running.get(stage.value, 0),
                "workers": ", ".join(names) or "none",
            }
        )
    st.subheader("Workers and queues")
    st.dataframe(rows, hide_index=True, width="stretch")
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
