"""m2io ops dashboard (Streamlit): overview, jobs, job detail, answers, collections, training, evaluation.

Run: `streamlit run dashboard/app.py` (`m2io up` starts it on M2IO_DASHBOARD_HOST, 127.0.0.1 by
default; compose publishes it with a password). Pages read their ids from the query string
(`?page=answer&query=<id>`), so every view can be linked. Listening beyond localhost (Streamlit's
`server.address`, which unset means every interface, or M2IO_DASHBOARD_HOST), nothing shows without
the password from settings; wrong guesses are throttled.
"""

from __future__ import annotations

import streamlit as st

from dashboard.views import answer, collections, evaluation, job_detail, jobs, overview, training
from dashboard.views.common import password_ok
from services.common.settings import LOOPBACK_HOSTS, Settings, load_settings

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


def exposed_address(settings: Settings) -> str | None:
    """The address beyond this machine the dashboard listens on (None: loopback only). Streamlit's
    own bind address decides, not a setting: unset, Streamlit listens on every interface."""
    bound = st.get_option("server.address") or ""
    for address in (bound, settings.dashboard_host):
        if address not in LOOPBACK_HOSTS:
            return address or "every interface"
    return None


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
    exposed = exposed_address(settings)
    if exposed and not password:
        st.error(
            f"The dashboard is bound to {exposed}, beyond this machine, and no password is set: "
            "set M2IO_DASHBOARD_PASSWORD (or bind it to 127.0.0.1)."
        )
        st.stop()
    if not password_ok(password):
        st.stop()
    page = current_page()
    PAGES[page][1].render(settings)


main()
