"""m2io ops dashboard (Streamlit): overview, jobs, job detail, answers, collections, training, evaluation.

Run: `streamlit run dashboard/app.py` (`m2io up` starts it on 127.0.0.1; compose publishes it with a
password). Pages read their ids from the query string (`?page=answer&query=<id>`), so every view
can be linked. Bound beyond localhost, nothing shows without the password from settings.
"""

from __future__ import annotations

import hmac

import streamlit as st

from dashboard.views import answer, collections, evaluation, job_detail, jobs, overview, training
from services.common.settings import load_settings

# slug (in the URL) -> (title, page module)
PAGES = {
    "overview": ("Overview", overview),
    "jobs": ("Jobs", jobs),
    "job": ("Job detail", job_detail),
    "answer": ("Answer", answer),
    "collections": ("Collections", collections),
    "training": ("Training", training),
    "evaluation": ("Evaluation", evaluation),
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def current_page() -> str:
    slugs = list(PAGES)
    wanted = st.query_params.get("page", "overview")
    chosen = st.sidebar.radio(
        "Page",
        slugs,
        index=slugs.index(wanted) if wanted in slugs else 0,
        format_func=lambda slug: PAGES[slug][0],
    )
    if chosen != wanted:
        st.query_params["page"] = chosen
    return chosen


def main() -> None:
    st.set_page_config(page_title="m2io", layout="wide")
    settings = load_settings()
    password = settings.dashboard_password.get_secret_value() if settings.dashboard_password else None
    st.sidebar.title("m2io")
    if settings.dashboard_host not in LOOPBACK and not password:
        st.error(
            f"The dashboard is bound to {settings.dashboard_host}, beyond this machine, and no password is set: "
            "set M2IO_DASHBOARD_PASSWORD (or bind it to 127.0.0.1)."
        )
        st.stop()
    if not password_ok(password):
        st.stop()
    page = current_page()
    PAGES[page][1].render(settings)


main()
