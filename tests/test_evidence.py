"""Evidence that explains itself: the point-wise passage filter, the inserter's reasons for the candidates
it left out, the HTML page's escaped "Evidence" section, and evidence and routing through the export."""

from __future__ import annotations

import json
import uuid

import pytest

from services.common.contracts import (
    AnswerUnit,
    CandidateImage,
    CollectionScore,
    InsertionPlan,
    Passage,
    Placement,
    RejectedImage,
    RejectedPassage,
    Retrieval,
    Routing,
    RoutingStep,
    SourceSection,
    UnitSource,
)
from services.common.embedding import get_embedder
from services.inserter.core import MATCH_MIN, insert
from services.merger.core import merge
from services.retriever.evidence import MIN_DENSE, filter_passages


def passage(chunk_id: int, document_id: int, dense: float | None, text_rank: int | None = None, units=(1, 3)):
    return Passage(
        chunk_id=chunk_id,
        document_id=document_id,
        doc_key=f"doc{document_id}.md",
        heading=f"Heading {chunk_id}",
        text=f"text {chunk_id}",
        score=round(0.03 - chunk_id / 1000, 6),
        vector_rank=chunk_id,
        text_rank=text_rank,
        dense=dense,
        text_score=None if text_rank is None else 0.1,
        first_unit=units[0] if units else None,
        last_unit=units[1] if units else None,
    )


def section(document_id: int, positions: range) -> SourceSection:
    return SourceSection(
        document_id=document_id,
        doc_key=f"doc{document_id}.md",
        path="Page > Section",
        units=[
            AnswerUnit(text=f"unit {p}", source=UnitSource(document_id=document_id, doc_key="d", position=p))
            for p in positions
        ],
        score=1.0,
    )


@pytest.mark.unit
def test_the_filter_drops_far_passages_without_a_text_match_and_says_why():
    best = passage(1, 1, dense=0.05)  # the best passage stays whatever its scores
    on_topic = passage(2, 2, dense=0.41)
    far = passage(3, 3, dense=0.12)
    far_but_matched = passage(4, 4, dense=0.18, text_rank=2)
    far_with_one_word = passage(5, 5, dense=0.04, text_rank=17)
    kept, rejected = filter_passages([best, on_topic, far, far_but_matched, far_with_one_word], [])
    assert [p.chunk_id for p in kept] == [1, 2, 4]
    assert [(r.chunk_id, r.doc_key, r.heading, r.dense, r.text_rank) for r in rejected] == [
        (3, "doc3.md", "Heading 3", 0.12, None),
        (5, "doc5.md", "Heading 5", 0.04, 17),
    ]
    assert rejected[0].reason == f"cosine 0.12 to the question, below {MIN_DENSE:.2f}, and no full-text match"
    assert rejected[1].reason.startswith("cosine 0.04 to the question, below 0.10: its full-text match (rank 17)")


@pytest.mark.unit
def test_the_filter_keeps_every_passage_of_the_answer_section():
    best = passage(1, 1, dense=0.6)
    inside = passage(2, 7, dense=0.0, units=(10, 12))  # holds units of the answer's section
    around = passage(3, 7, dense=0.0, units=(1, 30))  # the section stands inside it
    on_heading = passage(4, 7, dense=0.0, units=(8, 9))  # ends on the section's heading (unit 9)
    before = passage(5, 7, dense=0.0, units=(1, 7))  # same document, other text: judged as any other
    unknown_span = passage(6, 7, dense=0.0, units=None)  # indexed before spans: cannot be told apart
    no_vector = passage(7, 8, dense=None)
    kept, rejected = filter_passages(
        [best, inside, around, on_heading, before, unknown_span, no_vector], [section(7, range(10, 16))]
    )
    assert [p.chunk_id for p in kept] == [1, 2, 3, 4, 6, 7]
    assert [r.chunk_id for r in rejected] == [5]
    assert filter_passages([], []) == ([], [])
    assert filter_passages([passage(1, 1, dense=-0.3)], []) == ([passage(1, 1, dense=-0.3)], [])


@pytest.mark.unit
def test_the_filter_keeps_all_when_no_passage_is_on_the_question_topic():
    """A question the collection does not cover: every passage is far, none can be told from the rest."""
    far = [passage(1, 1, dense=0.2), passage(2, 2, dense=0.05), passage(3, 3, dense=0.01, text_rank=4)]
    assert filter_passages(far, []) == (far, [])
    kept, rejected = filter_passages([*far, passage(4, 4, dense=MIN_DENSE)], [])  # one on the topic: it judges
    assert [p.chunk_id for p in kept] == [1, 4] and [r.chunk_id for r in rejected] == [2, 3]


def candidate(name: str, document_id: int, position: int | None, before=None, after=None, caption=None):
    return CandidateImage(
        image_id=sum(map(ord, name)),  # stable across runs (document order is by id)
        source_name=name,
        s3_key=f"k/{name}",
        caption=caption,
        context_before=before,
        context_after=after,
        doc_key=f"doc{document_id}.md",
        score=0.1,
        reasons=["passage"],
        document_id=document_id,
        position=position,
    )


STEPS = ["1. Mix flour, eggs and milk into a batter.", "2. Fry each pancake in butter.", "3. Serve with maple syrup."]


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def test_the_rule_inserter_says_why_it_left_each_candidate_out(embedder):
    units = [
        AnswerUnit(text=text, kind="item", source=UnitSource(document_id=1, doc_key="doc1.md", position=position))
        for position, text in enumerate(STEPS, start=4)
    ]
    frying = candidate("frying.jpg", 1, 5)  # stood after unit 5: the answer's second step
    cover = candidate("cover.jpg", 1, 14)
    lost = candidate("lost.jpg", 1, None)
    car = candidate("car.jpg", 2, 3, "Change the oil every year.", "Check the tyres.", "A red car")
    bare = candidate("bare.jpg", 3, 1)
    plan = insert(units, [frying, cover, lost, car, bare], "rule", embedder)
    assert [(p.image, p.after, p.evidence) for p in plan.placements] == [("frying.jpg", 2, "source")]
    reasons = {r.image: r.reason for r in plan.rejected}
    assert reasons["cover.jpg"] == (
        "stood elsewhere in the answer's own document (unit 14 of doc1.md), outside the answer"
    )
    assert reasons["lost.jpg"].startswith("of the answer's own document (doc1.md), but its place there is unknown")
    assert reasons["car.jpg"].startswith("not in the answer's documents; the text around it matches two answer")
    assert reasons["car.jpg"].endswith("below 0.92")
    assert (
        reasons["bare.jpg"]
        == "not in the answer's documents, and no text stood on both sides of it to match the answer by"
    )
    assert list(reasons) == ["cover.jpg", "lost.jpg", "car.jpg", "bare.jpg"]  # every candidate not placed, once

    lm_units = [AnswerUnit(text=text, kind="item") for text in STEPS]  # no provenance: matched by text
    frying_text = candidate("frying.jpg", 1, 5, STEPS[1], STEPS[2], "Pancake frying in a pan")
    matched = insert(lm_units, [frying_text, car, bare], "rule", embedder)
    assert [p.image for p in matched.placements] == ["frying.jpg"]
    reasons = {r.image: r.reason for r in matched.rejected}
    assert reasons["car.jpg"].startswith("best ") and reasons["car.jpg"].endswith(f"below {MATCH_MIN:.2f}")
    assert reasons["bare.jpg"] == "no caption, context or text in it to match the answer by"
    empty = insert([], [car], "rule", embedder)
    assert empty.rejected == [RejectedImage(image="car.jpg", reason="the answer has no sentences to place it by")]


HOSTILE = "<script>alert(1)</script>"


def hostile_retrieval(candidates: list[CandidateImage]) -> Retrieval:
    """A stored retrieval whose every text an operator sees in the evidence is hostile."""
    used = passage(1, 1, dense=0.71, text_rank=1).model_copy(update={"heading": f"Frying {HOSTILE}"})
    return Retrieval(
        collection="stored",
        question="How do I fry?",
        passages=[used],
        rejected=[
            RejectedPassage(
                chunk_id=9, doc_key=f"evil{HOSTILE}.md", heading=HOSTILE, dense=0.1, reason=f"far {HOSTILE}"
            )
        ],
        candidates=candidates,
        routing=Routing(
            considered=[
                CollectionScore(name="kitchen", dense=0.7, text_hits=4, centroid=0.4, score=0.9),
                CollectionScore(name=f"garage{HOSTILE}", dense=0.1, text_hits=0, score=0.1),
            ],
            chosen=["kitchen"],
            steps=[RoutingStep(query=f"fry {HOSTILE}", collections=["kitchen"], best=0.9, reason="dense probe")],
        ),
    )


def hostile_plan() -> InsertionPlan:
    return InsertionPlan(
        placements=[Placement(image="images/pic.png", after=1, evidence="context", similarity=0.93)],
        rejected=[RejectedImage(image="images/other.png", reason=f"best context match 0.61 below 0.80 {HOSTILE}")],
        backend="rule",
    )


@pytest.mark.unit
def test_the_page_shows_the_evidence_with_every_text_escaped():
    units = [AnswerUnit(text=f"Heat the pan {HOSTILE}.")]
    candidates = [candidate("images/pic.png", 1, 1), candidate("images/other.png", 1, 9)]
    retrieval = hostile_retrieval(candidates)
    _, page = merge("How do I fry?", units, hostile_plan(), candidates, None, retrieval)
    evidence = page[page.index('<details class="evidence">') :]
    assert "<script" not in page
    assert evidence.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 8  # each hostile text, shown as text
    for shown in ("Passages used (1)", "Passages rejected (1)", "Images placed (1)", "Candidates not placed (1)"):
        assert shown in evidence
    assert "<td>0.71</td>" in evidence and "<td>context</td>" in evidence and "<td>0.93</td>" in evidence
    assert "answered from kitchen" in evidence and "Collections considered (2)" in evidence
    _, plain = merge("How do I fry?", units, hostile_plan(), candidates, None)
    assert "<details" not in plain  # without the retrieval (as before), no section


def stored_evidence_job() -> tuple[uuid.UUID, uuid.UUID]:
    """A job with one question answered as the stages leave it, its retrieval routed and filtered, its
    page rendered by the merger with the evidence: (job id, query id)."""
    from services.common.contracts import JobConfig, TextAnswer
    from services.common.db import session_scope
    from services.common.models import Answer, Job, Query
    from services.common.storage import get_store
    from tests.corpus_fixtures import png, stored_candidates
    from tests.test_jobs import succeeded_run

    store = get_store()
    store.ensure_bucket()
    candidates = stored_candidates(store, {"images/pic.png": png((200, 10, 10)), "images/other.png": png((9, 9, 9))})
    retrieval = hostile_retrieval(candidates)
    units = [AnswerUnit(text=f"Heat the pan {HOSTILE}.", source=UnitSource(document_id=1, doc_key="d", position=2))]
    text_answer = TextAnswer(units=units, backend="extractive", mode="section", sections=["Frying"], reason="fits")
    plan = hostile_plan()
    merged, page = merge(retrieval.question, units, plan, candidates, store, retrieval)
    with session_scope() as session:
        job = Job(kind="answer", name="evidence", config=JobConfig(collection="stored").model_dump(mode="json"))
        session.add(job)
        session.flush()
        query = Query(job_id=job.id, external_id="fry", question=retrieval.question, line=1, status="succeeded")
        session.add(query)
        session.flush()
        for stage, output in (("retriever", retrieval), ("generator", text_answer), ("inserter", plan)):
            session.add(succeeded_run(query.id, stage, output))
        html_key = f"answers/{query.id}/answer.html"
        store.put_named(html_key, page.encode(), "text/html")
        blocks = [block.model_dump(mode="json", exclude_none=True) for block in merged.blocks]
        session.add(Answer(query_id=query.id, markdown=merged.markdown, blocks=blocks, html_key=html_key))
        return job.id, query.id


def test_evidence_and_routing_survive_export(servers, tmp_path):
    from services.jobs.export import export_job

    job_id, _ = stored_evidence_job()
    result = export_job(job_id, tmp_path / "export")
    assert result.answered == 1 and not result.warnings
    record = json.loads((tmp_path / "export" / "fry.json").read_text())
    assert set(record) == {
        "id",
        "question",
        "status",
        "blocks",
        "answered_from",
        "placements",
        "evidence",
        "routing",
        "error",
    }
    assert record["placements"] == [{"image": "images/pic.png", "after": 1, "evidence": "context", "similarity": 0.93}]
    evidence = record["evidence"]
    assert evidence["passages"] == [
        {
            "rank": 1,
            "chunk_id": 1,
            "doc_key": "doc1.md",
            "heading": f"Frying {HOSTILE}",
            "dense": 0.71,
            "full_text": 0.1,
            "fused": 0.029,
            "vector_rank": 1,
            "text_rank": 1,
        }
    ]
    assert evidence["rejected_passages"] == [
        {
            "chunk_id": 9,
            "doc_key": f"evil{HOSTILE}.md",
            "heading": HOSTILE,
            "dense": 0.1,
            "text_rank": None,
            "reason": f"far {HOSTILE}",
        }
    ]
    assert evidence["images"] == [
        {
            "image": "images/pic.png",
            "after": 1,
            "placed_by": "context",
            "similarity": 0.93,
            "sentence": f"Heat the pan {HOSTILE}.",
            "reason": None,
        }
    ]
    assert evidence["rejected_images"] == [
        {"image": "images/other.png", "reason": f"best context match 0.61 below 0.80 {HOSTILE}"}
    ]
    assert record["routing"]["chosen"] == ["kitchen"]
    assert [c["name"] for c in record["routing"]["considered"]] == ["kitchen", f"garage{HOSTILE}"]
    assert record["routing"]["considered"][0] == {
        "name": "kitchen",
        "dense": 0.7,
        "text_hits": 4,
        "centroid": 0.4,
        "score": 0.9,
    }
    assert record["routing"]["steps"] == [
        {"query": f"fry {HOSTILE}", "collections": ["kitchen"], "best": 0.9, "reason": "dense probe"}
    ]
    page = (tmp_path / "export" / "fry.html").read_text()
    assert "<summary>Evidence</summary>" in page and "<script" not in page
