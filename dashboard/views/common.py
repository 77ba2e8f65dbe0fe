"""What every page shares: the client, S3, links between pages, auto-refresh, formatting."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import urlencode

import streamlit as st

from services.client import Client
from services.common.storage import ObjectMissing, get_store

STATE_ICON = {
    "succeeded": "🟢",
    "partial": "🟡",
    "running": "🔵",
    "queued": "⚪",
    "failed": "🔴",
    "cancelled": "🟣",
}


@lru_cache(maxsize=1)
def client() -> Client:
    return Client()


def link(page: str, **params: str) -> str:
    """A URL to another page of the dashboard (pages read their ids from the query string)."""
    return "?" + urlencode({"page": page, **params})


def go(page: str, **params: str) -> None:
    st.query_params.clear()
    st.query_params.update({"page": page, **params})
    st.session_state["page"] = page
    st.rerun()


def image_bytes(key: str) -> bytes | None:
    try:
        return get_store().get(key)
    except ObjectMissing:
        return None


def age(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def auto_refresh_seconds(key: str, active: bool) -> float | None:
    """A toggle (on by default): while something runs, the page's live part reruns every 3 s."""
    enabled = st.sidebar.toggle("Auto-refresh while jobs run", value=True, key=f"auto-{key}")
    return 3.0 if enabled and active else None
