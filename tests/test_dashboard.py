"""The dashboard's overview against the real servers and a real worker (Streamlit AppTest)."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from services.common.health import worker_warmth
from services.common.settings import get_settings
from tests.test_workers import wait_for

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture(autouse=True)
def _listening_on_loopback():
    """AppTest runs the script in this process, where Streamlit's `server.address` is unset, which
    means every interface: bind it to 127.0.0.1, as `m2io up` does (tests of other binds set theirs)."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", before)


@pytest.mark.slow
def test_overview_shows_servers_workers_and_queues(workers):
    worker = workers.start("inserter")
    wait_for(lambda: (worker_warmth(get_settings().redis_url) or {}).get(worker.name, None), 120, "a warm-up record")
    wait_for(lambda: worker_warmth(get_settings().redis_url)[worker.name].state == "ready", 120, "a ready inserter")
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics == {"PostgreSQL": "healthy", "Redis": "healthy", "S3": "healthy"}
    table = app.dataframe[0].value
    by_stage = {row["stage"]: row for row in table.to_dict("records")}
    assert set(by_stage) == {"retriever", "generator", "inserter", "merger", "trainer"}
    assert by_stage["inserter"]["workers online"] == 1
    assert by_stage["inserter"]["workers ready"] == 1 and by_stage["inserter"]["warm-up s"] > 0
    assert by_stage["inserter"]["workers"] == f"{worker.name} (ready)"
    assert by_stage["retriever"]["workers online"] == 0
    assert "retriever" in app.warning[0].value


def test_password_gate(monkeypatch):
    monkeypatch.setenv("M2IO_DASHBOARD_PASSWORD", "s3cret-for-test")
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.metric  # nothing shown before the password
    app.text_input[0].input("wrong").run()
    assert app.error and "Wrong password" in app.error[0].value
    assert not app.metric
    app.text_input[0].input("s3cret-for-test").run()
    assert [metric.label for metric in app.metric] == ["PostgreSQL", "Redis", "S3"]


def page(name: str, **params: str) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=90)
    app.query_params["page"] = name
    for key, value in params.items():
        app.query_params[key] = value
    return app.run()


@pytest.mark.slow
def test_every_page_on_a_finished_job(workers, tmp_path):
    """Each page rendered by AppTest against the real servers, a job answered by real workers, its
    evaluation, and training rows as the trainer writes them."""
    import uuid

    from services.client import Client
    from services.common.db import session_scope
    from services.common.models import RegisteredModel, TrainingRun, TrainingStep
    from tests.corpus_fixtures import write_markdown_corpus
    from tests.test_ingest import ingest_in_process
    from tests.test_jobs import QUESTIONS

    name = f"dash-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    for stage in ("retriever", "generator", "inserter", "merger"):
        workers.start(stage)
    client = Client()
    job_id = client.submit(QUESTIONS, name, name=f"dashboard {name}")
    assert client.wait(job_id, stall_timeout=120).state == "succeeded"
    client.evaluate([job_id])
    fry = next(view for view in client.queries(job_id) if view.id == "pancakes/fry")

    jobs = page("jobs")
    assert not jobs.exception
    table = jobs.dataframe[0].value
    row = table[table["id"] == str(job_id)].iloc[0]
    assert row["progress"] == 1.0 and "succeeded" in row["state"] and row["merger"] == 2
    assert jobs.get_by_key("submit-collection") is not None
    assert name in jobs.multiselect(key="submit-collection").options
    jobs.selectbox(key="action-job").set_value(str(job_id))
    jobs.button(key="retry").click().run()
    assert not jobs.exception and "nothing to retry" in jobs.success[0].value

    detail = page("job", job=str(job_id))
    assert not detail.exception
    stages = detail.dataframe[0].value.set_index("stage")
    assert stages.loc["merger", "done"] == 2 and stages.loc["retriever", "failed"] == 0
    questions = detail.dataframe[-1].value.set_index("id")
    assert questions.loc["pancakes/fry", "answer"].endswith(f"query={fry.query_id}")

    answer = page("answer", query=str(fry.query_id))
    assert not answer.exception
    assert any("Fry each pancake in butter." in block.value for block in answer.markdown)
    assert len(answer.image) >= 2  # the answer's image and the gold's
    assert {metric.label for metric in answer.metric} >= {"image f1", "ordering", "rouge l"}
    plan = answer.dataframe[0].value
    assert "images/frying.jpg" in set(plan["image"])
    evidence = next(e for e in answer.expander if e.label.startswith("Evidence"))
    placed = next(frame.value for frame in evidence.dataframe if "placed_by" in frame.value.columns)
    assert "images/frying.jpg" in set(placed["image"]) and set(placed["placed_by"]) <= {"source", "context"}
    used = next(frame.value for frame in evidence.dataframe if "fused" in frame.value.columns)
    assert list(used["rank"]) == list(range(1, len(used) + 1)) and used["dense"].notna().all()

    collections = page("collections")
    assert not collections.exception
    assert name in set(collections.dataframe[0].value["name"])
    collections.selectbox(key="collection-pick").set_value(name).run()
    assert not collections.exception and len(collections.image) >= 3  # the gallery, images from S3

    evaluation = page("evaluation")
    assert not evaluation.exception
    runs = evaluation.dataframe[0].value
    assert str(job_id) in set(runs["job"]) and "extractive+rule" in set(runs["backends"])

    with session_scope() as session:
        run = TrainingRun(status="succeeded", config={"steps": 2}, last_checkpoint_key="models/t/ckpt")
        session.add(run)
        session.flush()
        session.add_all(
            [
                TrainingStep(
                    run_id=run.id,
                    phase="grpo",
                    step=step,
                    metrics={"reward_format": 0.5 * step, "reward": 1.5 * step, "loss": 1 / step, "step_time": 9.0},
                )
                for step in (1, 2)
            ]
            + [
                TrainingStep(run_id=run.id, phase="data", step=0, metrics={"train": 5, "val": 2}),
                TrainingStep(run_id=run.id, phase="eval", step=1, metrics={"val_image_f1": 0.5, "val_parse_rate": 1.0}),
            ]
        )
        session.add(
            RegisteredModel(
                name=f"m-{name}", kind="inserter", base_model="tiny", s3_prefix="models/t", training_run_id=run.id
            )
        )
        run_id = str(run.id)
    training = page("training")
    assert not training.exception
    assert run_id in set(training.dataframe[0].value["run"])
    assert f"m-{name}" in set(training.dataframe[-1].value["name"])
    label = f"{run_id} ({run_id[:8]})"  # runs side by side: total reward per GRPO step, and a summary row each
    training.multiselect(key="training-compare").set_value([label]).run()
    assert not training.exception
    compared = next(frame.value for frame in training.dataframe if "reward, last 10" in frame.value.columns)
    assert list(compared["run"]) == [label] and list(compared["reward, last 10"]) == [2.25]
    assert list(compared["s / step (median)"]) == [9.0]

    overview = page("overview")
    assert not overview.exception and [m.label for m in overview.metric] == ["PostgreSQL", "Redis", "S3"]


def test_refuses_a_public_bind_without_password(monkeypatch):
    monkeypatch.setenv("M2IO_DASHBOARD_HOST", "0.0.0.0")
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert app.error and "no password is set" in app.error[0].value
    assert not app.metric and not app.dataframe


def test_the_answer_page_shows_evidence_and_routing(servers):
    """A stored answer whose retrieval was routed and filtered: the answer page shows the routing, the
    passages used and rejected, the images placed and the candidates left out, as the export has them."""
    from tests.test_evidence import HOSTILE, stored_evidence_job

    _, query_id = stored_evidence_job()
    answer = page("answer", query=str(query_id))
    assert not answer.exception
    evidence = next(e for e in answer.expander if e.label.startswith("Evidence"))
    assert evidence.label == "Evidence (1 passages used, 1 rejected; 1 images placed, 1 not)"
    assert any("answered from `kitchen`" in block.value for block in evidence.markdown)
    tables = [frame.value for frame in evidence.dataframe]
    considered, steps, used, rejected, placed, left_out = tables
    assert list(considered["name"]) == ["kitchen", f"garage{HOSTILE}"] and list(considered["score"]) == [0.9, 0.1]
    assert list(steps["query"]) == [f"fry {HOSTILE}"]
    assert used.iloc[0][["rank", "doc_key", "dense", "full_text"]].tolist() == [1, "doc1.md", 0.71, 0.1]
    assert list(rejected["reason"]) == [f"far {HOSTILE}"]
    assert placed.iloc[0][["image", "placed_by", "similarity"]].tolist() == ["images/pic.png", "context", 0.93]
    assert list(left_out["image"]) == ["images/other.png"]
