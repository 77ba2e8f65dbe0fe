"""Jobs over several collections (issue 16): the router's pure parts, submit's refusals against real
collections, and a mixed job through the four queues with real workers, the real embedding model,
Postgres and S3."""

from __future__ import annotations

import doctest
import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from services.common.db import session_scope
from services.common.models import Answer, Collection, Query

MANUAL = """# Joystick Setup

Joysticks fly the vehicle by hand instead of a radio transmitter.

![Joystick setup screen](images/joystick.png)

## Configuring the Joystick

To configure a joystick:

1. Connect the joystick to a USB port of the ground station.
2. Open the Joystick tab of the vehicle setup.
3. Move every stick to its limits.
4. Press Next to save the calibration.

![Calibration screen](images/calibration.png)

# Battery Monitor

The battery monitor warns when the flight battery voltage falls below the critical level.
Set the number of cells and the full and empty voltage of each cell.

![Battery settings](images/battery.png)
"""
RECIPES = ("apple-pie", "banana-muffins-with-chocolate", "beef-goulash")


def recipes_corpus(root: Path) -> Path:
    import shutil

    from services.cli.demo import DEMO_CORPUS
    from services.common.text import parse_markdown

    (root / "docs").mkdir(parents=True)
    for key in RECIPES:
        source = (DEMO_CORPUS / "docs" / f"{key}.md").read_text()
        (root / "docs" / f"{key}.md").write_text(source)
        for ref in parse_markdown(source).images:
            (root / ref.source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO_CORPUS / ref.source, root / ref.source)
    return root


def manual_corpus(root: Path) -> Path:
    from tests.corpus_fixtures import png

    (root / "docs").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "docs" / "joystick.md").write_text(MANUAL)
    for name, colour in (("joystick", (10, 20, 200)), ("calibration", (200, 20, 10)), ("battery", (20, 200, 10))):
        (root / "images" / f"{name}.png").write_bytes(png(colour))
    return root


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.unit
def test_routing_doctests():
    from services.retriever import routing

    result = doctest.testmod(routing)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.unit
def test_job_config_names_one_collection_or_several():
    from services.common.contracts import JobConfig
    from services.jobs.commands import JobError, job_config

    one = job_config("recipes")
    assert one.collection == "recipes" and one.collections == () and one.searched == ["recipes"]
    several = job_config(["recipes", "manual", "recipes"])
    assert several.collection is None and several.searched == ["recipes", "manual"]
    assert job_config(["all"]).searched == ["all"]  # expanded at submit, against the collections there are
    assert job_config(["manual"]).collection == "manual"
    for bad in ([], ["recipes", " "], ""):
        with pytest.raises(JobError, match="empty"):
            job_config(bad)
    with pytest.raises(ValueError, match="name a collection"):
        JobConfig()
    # a stored single-collection config reads as before
    assert JobConfig.model_validate({"collection": "x", "top_k": 3}).searched == ["x"]


@pytest.mark.unit
def test_the_router_answers_from_the_strongest_retrieval_and_records_why():
    from services.common.contracts import Passage, Retrieval, SourceSection
    from services.retriever.routing import Probe, answer_strength, ranked

    class Named:
        def __init__(self, name):
            self.name = name

    probes = ranked([Probe(Named("b"), 0.5, 0, 0.2), Probe(Named("a"), 0.6, 3, None), Probe(Named("c"), 0.5, 0, 0.2)])
    assert [p.collection.name for p in probes] == ["a", "b", "c"]  # score, then name
    assert probes[0].record().score == 0.6 and probes[1].record().score == 0.55
    section = SourceSection(document_id=1, doc_key="d", path="P", units=[], score=1.7)
    passage = Passage(chunk_id=1, document_id=1, doc_key="d", heading=None, text="t", score=0.03)
    assert answer_strength(Retrieval(collection="x", question="q", passages=[passage], candidates=[])) == 0.03
    assert (
        answer_strength(Retrieval(collection="x", question="q", passages=[], candidates=[], sections=[section])) == 1.7
    )


# ---------------------------------------------------------------------------------------------- real collections


@pytest.fixture(scope="module")
def two_collections(servers, tmp_path_factory) -> dict[str, str]:
    from tests.test_ingest import ingest_in_process

    tag = uuid.uuid4().hex[:8]
    names = {"recipes": f"route-recipes-{tag}", "manual": f"route-manual-{tag}", "empty": f"route-empty-{tag}"}
    ingest_in_process(recipes_corpus(tmp_path_factory.mktemp("recipes")), names["recipes"])
    ingest_in_process(manual_corpus(tmp_path_factory.mktemp("manual")), names["manual"])
    with session_scope() as session:
        model = session.execute(select(Collection).where(Collection.name == names["manual"])).scalar_one()
        session.add(Collection(name=names["empty"], embedding_model=model.embedding_model, embedding_dim=384))
    return names


def test_submit_refuses_bad_collections_up_front_with_the_list(two_collections, tmp_path):
    from services.client import Client
    from services.jobs.commands import JobError, job_config

    names = two_collections
    client = Client()
    marker = f"refused-{uuid.uuid4().hex[:8]}"
    questions = [{"id": marker, "question": "How do I make apple pie?"}]
    with pytest.raises(JobError) as unknown:
        client.submit(questions, job_config([names["recipes"], "no-such-collection"]))
    assert "'no-such-collection'" in str(unknown.value)
    assert names["recipes"] in str(unknown.value) and f"{names['empty']} (empty)" in str(unknown.value)
    with pytest.raises(JobError, match="holds no documents") as empty:
        client.submit(questions, job_config([names["recipes"], names["empty"]]))
    assert names["manual"] in str(empty.value)
    with pytest.raises(JobError, match="stands alone"):
        client.submit(questions, job_config(["all", names["recipes"]]))
    # the CLI says the same, on one error line, with the collections listed
    from tests.test_jobs import m2io

    lines = tmp_path / "questions.jsonl"
    lines.write_text("".join(json.dumps(question) + "\n" for question in questions))
    refused = m2io("submit", str(lines), "--collection", names["manual"], "--collection", "absent-one")
    assert refused.returncode == 1 and "'absent-one'" in refused.stderr and names["manual"] in refused.stderr
    with session_scope() as session:  # nothing was stored for the refused jobs
        assert not session.scalars(select(Query).where(Query.external_id == marker)).all()


def test_collection_all_is_every_collection_with_documents(two_collections):
    from services.jobs.commands import job_config, resolve_collections

    with session_scope() as session:
        config, single = resolve_collections(session, job_config("all"))
    assert single is None
    assert {two_collections["recipes"], two_collections["manual"]} <= set(config.collections)
    assert two_collections["empty"] not in config.collections


@pytest.mark.slow
def test_a_mixed_job_answers_each_question_from_its_own_collection(workers, two_collections, tmp_path):
    from services.client import Client
    from services.common.stage_runs import outputs_of
    from services.jobs.status import job_status
    from tests.test_jobs import m2io

    names = two_collections
    for stage in ("retriever", "generator", "inserter", "merger"):
        workers.start(stage)
    questions = [
        {"id": "pie", "question": "How do I make apple pie?"},
        {"id": "joystick", "question": "How do I configure the joystick?"},
        {"id": "battery", "question": "What does the battery monitor warn about?"},
        {"id": "nowhere", "question": "Who won the 2018 FIFA World Cup?"},
        {"id": "pinned", "question": "How do I configure the joystick?", "collection": names["recipes"]},
    ]
    client = Client()
    job_id = client.submit(questions, [names["recipes"], names["manual"]], name="mixed")
    final = client.wait(job_id, stall_timeout=180)
    assert final.state == "succeeded", final.failures
    with session_scope() as session:
        queries = {q.external_id: q for q in session.scalars(select(Query).where(Query.job_id == job_id))}
        answers = {
            key: session.execute(select(Answer).where(Answer.query_id == q.id)).scalar_one()
            for key, q in queries.items()
        }
    routed = {key: outputs_of(q.id).retrieval for key, q in queries.items()}

    # each question answered from its own collection, and the routing says what was considered and why
    assert routed["pie"].routing.chosen == [names["recipes"]] and routed["pie"].collection == names["recipes"]
    for key in ("joystick", "battery"):
        assert routed[key].routing.chosen == [names["manual"]], routed[key].routing
        assert {c.name for c in routed[key].routing.considered} == {names["recipes"], names["manual"]}
        assert routed[key].routing.steps and routed[key].routing.steps[0].query == queries[key].question
    assert any(b["type"] == "image" and b["source_name"] == "images/apple-pie.jpg" for b in answers["pie"].blocks)
    assert "Press Next to save the calibration" in answers["joystick"].markdown
    assert "battery" in answers["battery"].markdown.lower()
    assert not any(b["type"] == "image" and "apple" in b["source_name"] for b in answers["joystick"].blocks)

    # no collection answers: the answer says so, and no image is invented
    nowhere = routed["nowhere"].routing
    assert nowhere.answerable is False and nowhere.chosen == [] and "no collection holds an answer" in nowhere.reason
    assert routed["nowhere"].passages == [] and routed["nowhere"].candidates == []
    assert "None of the collections searched" in answers["nowhere"].markdown
    assert not any(b["type"] == "image" for b in answers["nowhere"].blocks)

    # a question's own collection pins it: no routing
    assert routed["pinned"].routing is None and routed["pinned"].collection == names["recipes"]

    # the status counts the router's choices; the export keeps every decision
    status = job_status(job_id)
    assert status.routing == {names["manual"]: 2, names["recipes"]: 1, "(none)": 1}
    shown = m2io("status", str(job_id)).stdout
    assert "routing (answered from)" in shown and f"{names['manual']}: 2" in shown and "(none): 1" in shown
    assert status.collection == f"{names['recipes']}, {names['manual']}"
    client.export(job_id, tmp_path / "export")
    records = {
        path.stem: json.loads(path.read_text())
        for path in (tmp_path / "export").rglob("*.json")
        if path.stem in ("joystick", "nowhere", "pinned")
    }
    assert records["joystick"]["routing"]["chosen"] == [names["manual"]]
    assert {c["name"] for c in records["joystick"]["routing"]["considered"]} == {names["recipes"], names["manual"]}
    assert records["joystick"]["routing"]["steps"][0]["query"] == "How do I configure the joystick?"
    assert records["nowhere"]["routing"]["chosen"] == []
    assert records["pinned"].get("routing") is None
