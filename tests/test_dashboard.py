"""The dashboard's overview against the real servers and a real worker (Streamlit AppTest)."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.mark.slow
def test_overview_shows_servers_workers_and_queues(workers):
    workers.start("generator")
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics == {"PostgreSQL": "healthy", "Redis": "healthy", "S3": "healthy"}
    table = app.dataframe[0].value
    by_stage = {row["stage"]: row for row in table.to_dict("records")}
    assert set(by_stage) == {"retriever", "generator", "inserter", "merger", "trainer"}
    assert by_stage["generator"]["workers online"] == 1
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
