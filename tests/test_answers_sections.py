"""Answers that keep their source (issue 13), through the four queues with real workers, the real
embedding model, Postgres and S3: real recipes from the shipped demo corpus and a manual page with
a numbered procedure and a script payload."""

from __future__ import annotations

import shutil
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import select

from services.common.db import session_scope
from services.common.models import Answer, Job, Query
from services.common.stage_runs import outputs_of
from services.common.text import parse_markdown

RECIPES = ("apple-pie", "apple-chicken", "banana-muffins-with-chocolate", "beef-goulash", "cacio-e-pepe")

MANUAL = """# Joystick Setup

Joysticks fly the vehicle by hand <img src=x onerror=alert(1)> <script>alert(2)</script>.

![Joystick setup screen](../images/joystick.png)

## Configuring the Joystick

To configure a joystick:

1. Connect the joystick to a USB port.
2. Open the Joystick tab.
3. Move every stick to its limits.
4. Press Next to save the calibration.

![Calibration screen](../images/calibration.png)

## Advanced Options

Expo and deadband are set here.
"""


def write_corpus(root: Path) -> Path:
    from services.cli.demo import DEMO_CORPUS
    from tests.corpus_fixtures import png

    (root / "docs").mkdir(parents=True)
    (root / "images").mkdir()
    for key in RECIPES:
        source = (DEMO_CORPUS / "docs" / f"{key}.md").read_text()
        (root / "docs" / f"{key}.md").write_text(source)
        for ref in parse_markdown(source).images:
            target = root / ref.source
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO_CORPUS / ref.source, target)
    (root / "docs" / "joystick.md").write_text(MANUAL.replace("../images/", "images/"))
    (root / "images" / "joystick.png").write_bytes(png((10, 20, 200)))
    (root / "images" / "calibration.png").write_bytes(png((200, 20, 10)))
    return root


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.slow
def test_answers_are_whole_sections_with_their_images_where_they_stood(workers, tmp_path):
    from services.common.celery_app import app
    from services.common.storage import get_store
    from tests.test_answer_stages import wait_for_queries
    from tests.test_ingest import ingest_in_process

    corpus = write_corpus(tmp_path / "corpus")
    name = f"sections-{uuid.uuid4().hex[:8]}"
    ingest_in_process(corpus, name)
    for stage in ("retriever", "generator", "inserter", "merger"):
        workers.start(stage)
    questions = {
        "pie": "How do I make Apple Pie?",
        "joystick": "Joystick Setup: How do I configure the Joystick?",
        "mars": "What is the orbital period of Mars?",
        "what": "What is Joystick Setup?",
    }
    with session_scope() as session:
        job = Job(kind="answer", config={"collection": name, "generator": "extractive", "inserter": "rule"})
        session.add(job)
        session.flush()
        queries = {key: Query(job_id=job.id, external_id=key, question=text) for key, text in questions.items()}
        session.add_all(queries.values())
        session.flush()
        ids = {key: query.id for key, query in queries.items()}
    for query_id in ids.values():
        app.send_task("retriever.retrieve", args=[{"query_id": str(query_id)}])
    done = wait_for_queries(list(ids.values()), 240)
    assert all(query.status == "succeeded" for query in done.values()), [q.error for q in done.values()]
    with session_scope() as session:
        answers = {
            key: session.execute(select(Answer).where(Answer.query_id == query_id)).scalar_one()
            for key, query_id in ids.items()
        }
    store = get_store()

    # The recipe: its photo first, then the recipe whole: ingredients and every step, numbered as written.
    pie = answers["pie"]
    assert pie.blocks[0]["type"] == "image" and pie.blocks[0]["source_name"] == "images/apple-pie.jpg"
    source = parse_markdown((corpus / "docs" / "apple-pie.md").read_text())
    steps = [u.text for u in source.units if u.kind == "item" and u.text[0].isdigit()]
    answered = [b["text"] for b in pie.blocks if b["type"] == "text"]
    assert len(steps) >= 10 and all(step in answered for step in steps)
    assert any(b.get("kind") == "heading" and "Ingredients" in b["text"] for b in pie.blocks)
    page = store.get(pie.html_key).decode()
    parsed = Elements()
    parsed.feed(page)
    tags = [tag for tag, _ in parsed.tags]
    assert {"ol", "ul", "li", "h2", "figure"} <= set(tags)
    outputs = outputs_of(ids["pie"])
    assert outputs.answer.mode == "section" and outputs.answer.sections == ["Apple Pie"]
    # provenance crossed the stage hops: every unit knows its document and position; the plan says why
    assert all(u.source is not None and u.source.doc_key.endswith("apple-pie") for u in outputs.answer.units)
    assert all(u.source.chunk_id for u in outputs.answer.units)  # every unit knows its chunk too
    assert [(p.image, p.after, p.evidence) for p in outputs.plan.placements] == [("images/apple-pie.jpg", 0, "source")]
    # Only the question was embedded at query time, once, by the retriever (every other vector was
    # stored at ingest), whichever way the answer was made.
    for query_id in ids.values():
        stored = outputs_of(query_id)
        assert (stored.retrieval.embedded, stored.answer.embedded, stored.plan.embedded) == (1, 0, 0)

    # The manual: the procedure whole, the screenshot after its last step, the other section left out,
    # and the document's script payload shown as text.
    joystick = outputs_of(ids["joystick"])
    texts = [u.text for u in joystick.answer.units]
    assert texts[1:5] == [
        "1. Connect the joystick to a USB port.",
        "2. Open the Joystick tab.",
        "3. Move every stick to its limits.",
        "4. Press Next to save the calibration.",
    ]
    assert "Expo and deadband are set here." not in texts
    assert [(p.image, p.after) for p in joystick.plan.placements] == [("images/calibration.png", 5)]

    # No section answers: still an answer, with the reason, and no image of an unrelated recipe.
    mars = outputs_of(ids["mars"])
    assert mars.answer.mode == "sentences" and "no section fits" in mars.answer.reason
    assert mars.answer.units and all(u.source is not None and u.source.chunk_id for u in mars.answer.units)
    assert answers["mars"].blocks

    # A document's script payload is shown as text, never run; the page's lead image leads its answer.
    what = answers["what"]
    page = store.get(what.html_key).decode()
    parsed = Elements()
    parsed.feed(page)
    assert "script" not in [tag for tag, _ in parsed.tags]
    assert not [key for _, attrs in parsed.tags for key in attrs if key.startswith("on")]
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert what.blocks[0]["type"] == "text" and "Joysticks fly the vehicle" in what.blocks[0]["text"]
    assert [b["source_name"] for b in what.blocks if b["type"] == "image"] == ["images/joystick.png"]


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, embedder):
        self.embedder, self.name, self.texts = embedder, embedder.name, []

    @property
    def dimension(self):
        return self.embedder.dimension

    def encode(self, texts, **kwargs):
        self.texts += list(texts)
        return self.embedder.encode(texts, **kwargs)


@pytest.mark.slow
def test_queries_embed_only_the_question_and_old_collections_embed_what_was_not_stored(servers, tmp_path):
    """Through the stages' own functions against the real database: with vectors stored at ingest the
    model sees the question alone; a collection indexed before they were stored (NULL columns) gets
    the same answer and plan, embedding those texts now and saying how many."""
    from sqlalchemy import text

    from services.common.embedding import get_embedder
    from services.common.vectors import QueryVectors
    from services.generator.core import generate
    from services.inserter.core import insert
    from services.retriever.search import get_collection, retrieve
    from tests.test_ingest import ingest_in_process

    corpus = write_corpus(tmp_path / "corpus")
    name = f"vectors-{uuid.uuid4().hex[:8]}"
    ingest_in_process(corpus, name)
    questions = ["How do I make Apple Pie?", "Joystick Setup: How do I configure the Joystick?", "Why is Mars red?"]

    def answer_all(counting):
        results = []
        with session_scope() as session:
            collection = get_collection(session, name)
            for question in questions:
                counting.texts.clear()
                retrieval = retrieve(session, collection, question, counting)
                asked = list(counting.texts)
                answer = generate(retrieval, "extractive", QueryVectors(counting, session))
                plan = insert(answer.units, retrieval.candidates, "rule", QueryVectors(counting, session))
                results.append((retrieval, answer, plan, asked, list(counting.texts)))
        return results

    counting = CountingEmbedder(get_embedder())
    fresh = answer_all(counting)
    for question, (retrieval, answer, plan, asked, everything) in zip(questions, fresh, strict=True):
        assert asked == everything == [question]  # the retriever's one call, nothing after it
        assert (retrieval.embedded, answer.embedded, plan.embedded) == (1, 0, 0)
    assert [p.image for p in fresh[1][2].placements] == ["images/calibration.png"]
    assert fresh[2][1].mode == "sentences"  # MMR over stored unit vectors, with the retriever's question vector

    with session_scope() as session:  # as a collection indexed before the vectors were stored
        ids = {"ids": [c.id for c in [get_collection(session, name)]]}
        session.execute(text("UPDATE chunks SET unit_vectors = NULL WHERE collection_id = ANY(:ids)"), ids)
        session.execute(text("UPDATE images SET text_vectors = NULL WHERE collection_id = ANY(:ids)"), ids)
        session.execute(
            text("UPDATE documents SET label_vectors = NULL, section_labels = NULL WHERE collection_id = ANY(:ids)"),
            ids,
        )
    old = answer_all(counting)
    for (_, answer, plan, *_), (old_retrieval, old_answer, old_plan, asked, _) in zip(fresh, old, strict=True):
        assert [u.text for u in old_answer.units] == [u.text for u in answer.units]
        assert [(p.image, p.after) for p in old_plan.placements] == [(p.image, p.after) for p in plan.placements]
        assert old_retrieval.embedded == len(asked) > 1  # the section labels, embedded now
    assert old[2][1].embedded > 0  # the sentences' units
