"""Collections: documents and an image gallery with captions; ingest a corpus."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.views.common import auto_refresh_seconds, client, image_bytes
from services.jobs.commands import JobError

GALLERY_PAGE = 24


def ingest_form() -> None:
    with st.form("ingest"):
        st.markdown("**Ingest a corpus** (a folder or file on the dashboard's machine)")
        path = st.text_input("Path", placeholder="/data/corpora/recipes")
        name = st.text_input("Collection")
        sent = st.form_submit_button("Ingest")
    if not sent:
        return
    if not path or not name:
        st.error("Give a path and a collection name.")
        return
    try:
        with st.spinner("Reading documents and storing images…"):
            run_id = client().ingest(Path(path), name.strip())
    except (FileNotFoundError, ValueError, JobError) as error:
        st.error(str(error))
        return
    st.success(f"Ingest run {run_id} queued: retriever workers index the documents.")


def render(settings) -> None:
    st.header("Collections")
    collections = client().collections()
    if collections:
        st.dataframe(
            [{k: v for k, v in c.items() if k != "created_at"} for c in collections],
            hide_index=True,
            width="stretch",
        )
    else:
        st.info("No collection yet: ingest a corpus below.")
    runs = client().ingest_runs()
    active = any(run["pending"] for run in runs)

    @st.fragment(run_every=auto_refresh_seconds("ingest", active))
    def live_runs() -> None:
        current = client().ingest_runs()
        if current:
            st.subheader("Ingest runs")
            st.dataframe(current, hide_index=True, width="stretch")

    live_runs()
    ingest_form()
    if not collections:
        return
    st.divider()
    names = [c["name"] for c in collections]
    chosen = st.selectbox("Collection", names, key="collection-pick")
    counts = next(c for c in collections if c["name"] == chosen)
    documents_tab, gallery_tab = st.tabs([f"Documents ({counts['documents']})", f"Images ({counts['images']})"])
    with documents_tab:
        st.dataframe(client().documents(chosen), hide_index=True, width="stretch")
    with gallery_tab:
        pages = max(1, -(-counts["images"] // GALLERY_PAGE))
        page = st.number_input("Page", min_value=1, max_value=pages, value=1, key="gallery-page") if pages > 1 else 1
        images = client().images(chosen, offset=(page - 1) * GALLERY_PAGE, limit=GALLERY_PAGE)
        columns = st.columns(4)
        for index, image in enumerate(images):
            with columns[index % 4]:
                data = image_bytes(image["s3_key"])
                if data is None:
                    st.warning(f"{image['source_name']}: missing from storage")
                    continue
                st.image(data, caption=f"{image['caption'] or image['source_name']} ({image['document']})")
