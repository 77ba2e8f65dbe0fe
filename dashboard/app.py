"""m2io ops dashboard (Streamlit). Overview: health of Postgres, Redis, S3 and each stage's workers.

More pages (jobs, answers, collections, training, evaluation) land with the dashboard issue.
Run: `streamlit run dashboard/app.py` (`m2io up` starts it on 127.0.0.1).
"""

from __future__ import annotations

import hmac

import streamlit as st

from services.common.health import (
    online_workers,
    probe_postgres,
    probe_redis,
    probe_s3,
    queue_depths,
    workers_of,
)
from services.common.queues import Stage
from services.common.settings import load_settings


def password_ok(expected: str | None) -> bool:
    """With a password configured, nothing shows until it is given (compare in constant time)."""
    if not expected:
        return True
    if st.session_state.get("authenticated"):
        return True
    given = st.text_input("Password", type="password")
    if given and hmac.compare_digest(given.encode(), expected.encode()):
        st.session_state["authenticated"] = True
        return True
    if given:
        st.error("Wrong password.")
    return False


def main() -> None:
    st.set_page_config(page_title="m2io", layout="wide")
    settings = load_settings()
    password = settings.dashboard_password.get_secret_value() if settings.dashboard_password else None
    st.title("m2io · cluster overview")
    if not password_ok(password):
        st.stop()

    servers = {
        "PostgreSQL": probe_postgres(settings.database_url),
        "Redis": probe_redis(settings.redis_url),
        "S3": probe_s3(settings),
    }
    columns = st.columns(len(servers))
    for column, (name, probe) in zip(columns, servers.items(), strict=True):
        column.metric(name, "healthy" if probe.healthy else "DOWN")
        column.caption(probe.detail)

    online, broker_error = online_workers(settings.redis_url)
    if broker_error:
        st.error(f"Cannot reach the workers through Redis: {broker_error}")
    depths = queue_depths(settings.redis_url)
    rows = []
    for stage in Stage:
        names = workers_of(stage, online)
        rows.append(
            {
                "stage": stage.value,
                "queue": stage.queue,
                "workers online": len(names),
                "waiting messages": depths[stage.queue],
                "workers": ", ".join(names) or "none",
            }
        )
    st.subheader("Workers and queues")
    st.dataframe(rows, hide_index=True, use_container_width=True)
    missing = [row["stage"] for row in rows if row["workers online"] == 0]
    if missing:
        st.warning(
            f"No worker online for: {', '.join(missing)}. Messages wait in their queues until one starts."
        )
    if st.button("Refresh"):
        st.rerun()


main()
