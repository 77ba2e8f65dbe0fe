"""Training: runs with status, reward curves per component, loss, checkpoints, registered models."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from sqlalchemy import select

from dashboard.views.common import STATE_ICON, age, auto_refresh_seconds
from services.common.db import session_scope
from services.common.models import RegisteredModel, TrainingRun


def runs() -> list[TrainingRun]:
    with session_scope() as session:
        return list(session.scalars(select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(50)))


def steps(run_id) -> pd.DataFrame:
    from services.trainer.runs import run_steps  # the trainer's modules load only when a run is shown

    rows = [{"phase": phase, "step": step, **(metrics or {})} for phase, step, metrics in run_steps(run_id)]
    return pd.DataFrame(rows).sort_values(["phase", "step"]) if rows else pd.DataFrame()


def comparison(frames: dict[str, pd.DataFrame], column: str = "reward", phase: str = "grpo") -> pd.DataFrame:
    """One column per run (its label): `column` of its `phase` steps, indexed by step (the runs side by side).

    >>> a = pd.DataFrame({"phase": ["grpo", "grpo", "sft"], "step": [1, 2, 1], "reward": [1.0, 2.0, None]})
    >>> b = pd.DataFrame({"phase": ["grpo"], "step": [1], "reward": [0.5]})
    >>> comparison({"a": a, "b": b}).to_dict()
    {'a': {1: 1.0, 2: 2.0}, 'b': {1: 0.5, 2: nan}}
    """
    columns = {}
    for label, frame in frames.items():
        if frame.empty or column not in frame.columns:
            continue
        part = frame[frame["phase"] == phase].set_index("step")[column].dropna()
        if not part.empty:
            columns[label] = part
    return pd.DataFrame(columns).sort_index()


def summary(frames: dict[str, pd.DataFrame], last: int = 10) -> list[dict]:
    """Per run: GRPO steps, mean total reward over the first and the last `last` steps, median seconds a step."""
    rows = []
    for label, frame in frames.items():
        grpo = frame[frame["phase"] == "grpo"] if not frame.empty else frame
        if grpo.empty or "reward" not in grpo.columns:
            continue
        reward = grpo.sort_values("step")["reward"].dropna()
        seconds = grpo["step_time"].dropna() if "step_time" in grpo.columns else pd.Series(dtype=float)
        rows.append(
            {
                "run": label,
                "GRPO steps": int(grpo["step"].max()),
                f"reward, first {last}": round(float(reward.head(last).mean()), 3),
                f"reward, last {last}": round(float(reward.tail(last).mean()), 3),
                "s / step (median)": round(float(seconds.median()), 1) if not seconds.empty else None,
            }
        )
    return rows


def compare(listed: list[TrainingRun]) -> None:
    """Several runs' total reward on one chart: e.g. the alpha variants of bench/inserter_learning.py."""
    labels = {f"{(run.config or {}).get('name') or run.id} ({str(run.id)[:8]})": run for run in listed}
    chosen = st.multiselect("Compare runs (total reward per GRPO step)", list(labels), key="training-compare")
    if not chosen:
        return
    frames = {label: steps(labels[label].id) for label in chosen}
    table = summary(frames)
    if not table:
        st.caption("None of these runs has GRPO steps.")
        return
    st.line_chart(comparison(frames))
    st.dataframe(table, hide_index=True, width="stretch")


def render(settings) -> None:
    st.header("Training")
    listed = runs()
    if not listed:
        st.info("No training run yet (`m2io train` starts one on the trainer worker).")
    else:
        st.dataframe(
            [
                {
                    "run": str(run.id),
                    "status": f"{STATE_ICON.get(run.status, '')} {run.status}",
                    "model": (run.config or {}).get("name", ""),
                    "worker": run.worker or "",
                    "attempts": run.attempts,
                    "config": ", ".join(f"{k}={v}" for k, v in (run.config or {}).items())[:200],
                    "last checkpoint": run.last_checkpoint_key or "",
                    "heartbeat": age(run.heartbeat_at),
                    "age": age(run.created_at),
                    "error": run.error or "",
                }
                for run in listed
            ],
            hide_index=True,
            width="stretch",
        )
        ids = [str(run.id) for run in listed]
        chosen = st.selectbox("Run", ids, key="training-run")
        selected = next(run for run in listed if str(run.id) == chosen)
        running = selected.status in ("queued", "running")
        if running and st.button("Cancel this run", key="cancel-training"):
            from services.trainer.runs import request_cancel

            st.info(request_cancel(selected.id))

        @st.fragment(run_every=auto_refresh_seconds("training", running))
        def curves() -> None:
            frame = steps(chosen)
            if frame.empty:
                st.caption("No steps logged yet.")
                return
            for phase, part in frame.groupby("phase"):
                part = part.set_index("step").drop(columns=["phase"]).dropna(axis=1, how="all")
                if phase in ("data", "eval"):  # counts of the training data; validation scores after each phase
                    st.subheader("training data" if phase == "data" else "validation (held-out documents)")
                    st.dataframe(part, width="stretch")
                    continue
                rewards = [c for c in part.columns if c.startswith("reward")]
                losses = [c for c in part.columns if "loss" in c]
                st.subheader(f"{phase}")
                if rewards:
                    st.caption("rewards per component")
                    st.line_chart(part[rewards])
                if losses:
                    st.caption("loss")
                    st.line_chart(part[losses])

        curves()
        compare(listed)
    st.subheader("Registered models")
    with session_scope() as session:
        models = list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.created_at.desc())))
    if not models:
        st.caption("None yet: the trainer registers its checkpoints here (use them as `checkpoint:<name>`).")
    else:
        st.dataframe(
            [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "base model": m.base_model,
                    "checkpoint": m.s3_prefix,
                    "training run": str(m.training_run_id or ""),
                    "metrics": ", ".join(f"{k}={v}" for k, v in (m.meta or {}).items())[:200],
                    "age": age(m.created_at),
                }
                for m in models
            ],
            hide_index=True,
            width="stretch",
        )
