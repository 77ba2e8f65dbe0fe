"""What every page shares: the client, S3, links between pages, auto-refresh, formatting, and the
password gate in front of them."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import deque
from collections.abc import MutableMapping
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


class PasswordThrottle:
    """Wrong passwords slow down the next guess, per session and for all sessions together.

    A session has `free` wrong guesses; after that it waits `base_delay_s`, then twice as long after
    each further wrong one (at most `max_delay_s`) before its next guess is even compared. Since a
    new browser session costs nothing, all sessions together have `global_failures` wrong guesses per
    `window_s`; beyond that every guess waits until the oldest leaves the window.
    """

    def __init__(
        self,
        *,
        free: int = 3,
        base_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        global_failures: int = 20,
        window_s: float = 60.0,
    ):
        self.free, self.base_delay_s, self.max_delay_s = free, base_delay_s, max_delay_s
        self.global_failures, self.window_s = global_failures, window_s
        self.lock = threading.Lock()  # sessions run in threads of one server process
        self.recent: deque[float] = deque()  # monotonic times of the wrong guesses of every session

    def wait_s(self, session: MutableMapping) -> float:
        """Seconds before this session may guess again (0: now)."""
        now = time.monotonic()
        with self.lock:
            while self.recent and now - self.recent[0] > self.window_s:
                self.recent.popleft()
            full = len(self.recent) >= self.global_failures
            global_wait = self.recent[0] + self.window_s - now if full else 0.0
        failures = session.get("password_failures", 0)
        session_wait = 0.0
        if failures >= self.free:
            delay = min(self.base_delay_s * 2 ** (failures - self.free), self.max_delay_s)
            session_wait = session.get("password_failed_at", 0.0) + delay - now
        return max(global_wait, session_wait, 0.0)

    def failed(self, session: MutableMapping) -> None:
        now = time.monotonic()
        session["password_failures"] = session.get("password_failures", 0) + 1
        session["password_failed_at"] = now
        with self.lock:
            self.recent.append(now)

    def succeeded(self, session: MutableMapping) -> None:
        session["password_failures"] = 0


THROTTLE = PasswordThrottle()  # one per dashboard process: modules outlive the script's reruns


def password_ok(expected: str | None, throttle: PasswordThrottle = THROTTLE) -> bool:
    """With a password configured, nothing shows until it is given: compared in constant time, and
    wrong guesses slow down the next ones (`PasswordThrottle`)."""
    if not expected:
        return True
    session = st.session_state
    if session.get("authenticated"):
        return True
    given = st.text_input("Password", type="password")
    if not given:
        return False
    # The box keeps its value over reruns: the same wrong guess is not counted (or compared) again.
    digest = hashlib.sha256(given.encode()).hexdigest()
    if digest == session.get("password_wrong_digest"):
        st.error("Wrong password.")
        return False
    wait = throttle.wait_s(session)
    if wait > 0:
        st.error(f"Too many wrong passwords: try again in {math.ceil(wait)} s.")
        return False
    if hmac.compare_digest(given.encode(), expected.encode()):
        throttle.succeeded(session)
        session["authenticated"] = True
        return True
    throttle.failed(session)
    session["password_wrong_digest"] = digest
    st.error("Wrong password.")
    return False
