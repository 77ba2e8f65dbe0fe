"""Answer viewer: the interleaved answer with its real images from S3, the insertion plan, the evidence
(passages used and rejected, images placed and not, the routing), the retrieved passages and
candidates; with gold fields, the gold answer side by side with the metrics."""

from __future__ import annotations

import uuid

import streamlit as st

from dashboard.views.common import client, image_bytes, link
from services.client import AnswerView
from services.common.answer_evidence import evidence_record, routing_record
from services.common.metrics import PIC_MARKER


def pick_query() -> str | None:
    wanted = st.query_params.get("query")
    typed = st.text_input("Query id", value=wanted or "", help="open an answer from a job's page, or paste its id")
    if not typed:
        st.info("Open an answer from a job's page (Job detail → Questions → open).")
        return None
    try:
        uuid.UUID(typed.strip())
    except ValueError:
        st.error(f"{typed!r} is not a query id")
        return None
    if typed != wanted:
        st.query_params["query"] = typed.strip()
    return typed.strip()


def show_blocks(view: AnswerView) -> None:
    keys = {c.source_name: c.s3_key for c in (view.retrieval.candidates if view.retrieval else [])}
    for block in view.blocks:
        if block.get("type") == "image":
            name = block.get("source_name") or ""
            data = image_bytes(keys[name]) if name in keys else None
            if data is None:
                st.warning(f"[image {name} unavailable in storage]")
            else:
                st.image(data, caption=block.get("caption") or name, width=420)
        else:
            st.markdown(block.get("text") or "")


def show_gold(view: AnswerView) -> None:
    gold_images = list(view.gold.get("gold_images", []))
    candidates = {
        c.source_name.rsplit("/", 1)[-1]: c.s3_key for c in (view.retrieval.candidates if view.retrieval else [])
    }
    parts = view.gold["gold_answer"].split(PIC_MARKER)
    for index, part in enumerate(parts):
        if part.strip():
            st.markdown(part)
        if index < len(parts) - 1 and index < len(gold_images):
            name = gold_images[index]
            data = image_bytes(candidates[name]) if name in candidates else None
            if data is not None:
                st.image(data, caption=f"gold: {name}", width=300)
            else:
                st.caption(f"[gold image {name}: not among the candidates]")


def show_evidence(view: AnswerView) -> None:
    """The answer's evidence as the export's JSON holds it (services/common/answer_evidence.py)."""
    retrieval = view.retrieval
    units = view.text_answer.units if view.text_answer else []
    record = evidence_record(
        retrieval.passages if retrieval else [], retrieval.rejected if retrieval else [], units, view.plan
    )
    title = (
        f"Evidence ({len(record['passages'])} passages used, {len(record['rejected_passages'])} rejected; "
        f"{len(record['images'])} images placed, {len(record['rejected_images'])} not)"
    )
    with st.expander(title):
        if retrieval and retrieval.routing:
            routing = routing_record(retrieval.routing)
            st.markdown("**Routing**: answered from " + (", ".join(f"`{c}`" for c in routing["chosen"]) or "none"))
            if retrieval.routing.reason:
                st.caption(retrieval.routing.reason)
            st.dataframe(routing["considered"], hide_index=True, width="stretch")
            st.dataframe(routing["steps"], hide_index=True, width="stretch")
        st.markdown("**Passages used**")
        st.dataframe(record["passages"], hide_index=True, width="stretch")
        if record["rejected_passages"]:
            st.markdown("**Passages rejected** (the point-wise filter, before generation)")
            st.dataframe(record["rejected_passages"], hide_index=True, width="stretch")
        st.markdown("**Images placed**")
        st.dataframe(record["images"], hide_index=True, width="stretch")
        if record["rejected_images"]:
            st.markdown("**Candidates not placed**")
            st.dataframe(record["rejected_images"], hide_index=True, width="stretch")


def render(settings) -> None:
    st.header("Answer")
    query_id = pick_query()
    if query_id is None:
        return
    try:
        view = client().answer(query_id)
    except LookupError as error:
        st.error(str(error))
        return
    st.markdown(f"### {view.question}")
    st.caption(f"question `{view.id}` · status {view.status} · [job]({link('job', job=str(view.job_id))})")
    if view.error:
        st.error(view.error)
    if view.metrics:
        cols = st.columns(7)
        for col, key in zip(
            cols,
            ("image_precision", "image_recall", "image_f1", "ordering", "position_accuracy", "rouge_l", "section_hit"),
            strict=True,
        ):
            value = view.metrics.get(key)
            col.metric(key.replace("_", " "), "-" if value is None else f"{value:.2f}")
        answer_col, gold_col = st.columns(2)
        with answer_col:
            st.subheader("Answer")
            show_blocks(view)
        with gold_col:
            st.subheader("Gold answer")
            show_gold(view)
    else:
        show_blocks(view)
    if not view.blocks and not view.error:
        st.info(f"No answer yet ({view.status}).")
    if view.text_answer and view.text_answer.reason:
        # how the answer was made: a whole source section (which one, on what evidence) or sentences
        st.caption(f"answered from {view.text_answer.mode}: {view.text_answer.reason}")
    if view.plan:
        with st.expander(f"Insertion plan ({view.plan.backend}, {len(view.plan.placements)} images)", expanded=True):
            units = view.text_answer.units if view.text_answer else []
            st.dataframe(
                [
                    {
                        "image": p.image,
                        "after sentence": p.after,
                        "sentence": units[p.after - 1].text if 0 < p.after <= len(units) else "(before the first)",
                        "placed by": p.evidence or "?",
                        "similarity": p.similarity,
                    }
                    for p in view.plan.placements
                ],
                hide_index=True,
                width="stretch",
            )
            if view.plan.fallback_reason:
                st.warning(f"The LM's plan was unusable, `rule` answered: {view.plan.fallback_reason}")
            if view.plan.raw_output:
                st.code(view.plan.raw_output)
    if view.retrieval or view.plan:
        show_evidence(view)
    if view.retrieval:
        with st.expander(f"Retrieved passages ({len(view.retrieval.passages)})"):
            for passage in view.retrieval.passages:
                st.markdown(f"**{passage.doc_key}** · {passage.heading or ''} · score {passage.score:.4f}")
                st.text(passage.text[:1500])
        with st.expander(f"Candidate images ({len(view.retrieval.candidates)})"):
            st.dataframe(
                [
                    {
                        "image": c.source_name,
                        "document": c.doc_key,
                        "caption": c.caption,
                        "score": round(c.score, 4),
                        "why": ", ".join(c.reasons),
                        "placed": any(p.image == c.source_name for p in (view.plan.placements if view.plan else [])),
                    }
                    for c in view.retrieval.candidates
                ],
                hide_index=True,
                width="stretch",
            )
