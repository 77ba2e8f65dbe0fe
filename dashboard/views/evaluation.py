"""Evaluation: metric tables and charts across backends and runs (the eval runs `m2io eval` records)."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from sqlalchemy import select

from services.common.db import session_scope
from services.common.models import EvalRun

METRICS = [
    "image_f1",
    "image_precision",
    "image_recall",
    "ordering",
    "position_accuracy",
    "rouge_l",
    "retrieval_image_recall",
    "retrieval_doc_hit",
]


def eval_frame() -> pd.DataFrame:
    with session_scope() as session:
        runs = session.scalars(select(EvalRun).order_by(EvalRun.created_at.desc()).limit(500)).all()
        rows = [
            {
                "when": run.created_at,
                "collection": (run.config or {}).get("collection", "?"),
                "backends": (run.config or {}).get("backends", "?"),
                "job": str(run.job_id or ""),
                "questions": (run.metrics or {}).get("count"),
                "failed": (run.metrics or {}).get("failed"),
                **{m: (run.metrics or {}).get(m) for m in METRICS},
            }
            for run in runs
        ]
    return pd.DataFrame(rows)


def render(settings) -> None:
    st.header("Evaluation")
    frame = eval_frame()
    if frame.empty:
        st.info("No evaluation yet: `m2io eval QUESTIONS.jsonl --collection NAME --out report.json`.")
        return
    collections = sorted(frame["collection"].unique())
    chosen = st.multiselect("Collections", collections, default=collections, key="eval-collections")
    frame = frame[frame["collection"].isin(chosen)]
    st.subheader("Runs")
    st.dataframe(frame, hide_index=True, width="stretch")
    metric = st.selectbox("Metric", METRICS, key="eval-metric")
    for collection in chosen:
        part = frame[frame["collection"] == collection]
        st.subheader(collection)
        latest = part.sort_values("when").groupby("backends").tail(1).set_index("backends")
        st.caption("latest run per backend pair")
        st.bar_chart(latest[[m for m in METRICS if m in latest.columns and latest[m].notna().any()]].T)
        if len(part) > 1:
            st.caption(f"{metric} over runs")
            st.line_chart(part.pivot_table(index="when", columns="backends", values=metric))
