"""The dashboard in a real browser (Playwright driving Debian's chromium) against a live local cluster:
real Postgres, Redis, S3 and pipeline workers, and the dashboard as its own `streamlit run` process.
A finished job shows on the jobs page, its answer shows its text and its images (really loaded by the
browser), and a job submitted through the page's form runs to the end. Screenshots (and each page's
HTML) are kept under test-artifacts/dashboard/."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from services.client import Client
from tests.conftest import REPO_ROOT
from tests.corpus_fixtures import write_markdown_corpus
from tests.test_ingest import ingest_in_process
from tests.test_jobs import QUESTIONS

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(600)]  # a busy machine: slow models

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (infra/setup.sh installs it); Playwright's download is not used
ARTIFACTS = REPO_ROOT / "test-artifacts" / "dashboard"
PIPELINE = ("retriever", "generator", "inserter", "merger")
WAIT_MS = 60_000  # Streamlit renders asynchronously, and this machine may be busy


@contextmanager
def dashboard(log: Path, timeout: float = 90.0) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on a free port, with this session's M2IO_* settings; its base URL."""
    from infra.processes import free_port

    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "dashboard/app.py",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            argv,
            env=os.environ.copy(),
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the dashboard exited ({process.returncode}): {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not answer in {timeout:.0f}s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def settle(page) -> None:
    """Wait until Streamlit has finished running the page's script (the app marks its state)."""
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=WAIT_MS)


def keep(page, name: str) -> None:
    """A screenshot of the whole page and its HTML, as test artifacts. Streamlit scrolls inside its own
    container, not the document, so the viewport is stretched to the content's height for the picture."""
    size = page.viewport_size
    height = page.evaluate(
        """() => Math.max(...['stMain', 'stAppViewContainer', 'stSidebarContent'].map(
            (id) => document.querySelector(`[data-testid="${id}"]`)?.scrollHeight || 0))"""
    )
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(height, 10_000))})
    try:
        page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        (ARTIFACTS / f"{name}.html").write_text(page.content())
    finally:
        page.set_viewport_size(size)


def assert_no_exception(page, name: str) -> None:
    shown = page.locator('[data-testid="stException"]')
    assert shown.count() == 0, f"{name}: the page shows an exception: {shown.first.inner_text()[:3000]}"


def jobs_page_lists(page, url: str, job_id: uuid.UUID, name: str) -> None:
    page.goto(f"{url}/?page=jobs")
    page.get_by_role("heading", name="Jobs").wait_for()
    # The table is a canvas (glide-data-grid); its accessible twin, a hidden <table role=grid>, holds the
    # text. The newest job comes first, so it is in the rows the grid renders whatever else is there.
    row = page.locator('[data-testid="stDataFrame"] table[role="grid"] tr', has_text=name)
    row.wait_for(state="attached")
    assert f"?page=job&job={job_id}" in row.inner_text()
    # the actions' job chooser shows `<short id> · <name> · <state>`
    chosen = page.get_by_role("combobox", name="Job", exact=True)
    chosen.wait_for()
    assert chosen.input_value().startswith(f"{str(job_id)[:8]} · {name} · "), chosen.input_value()
    assert chosen.input_value().endswith("succeeded")
    settle(page)
    keep(page, "01-jobs")
    assert_no_exception(page, "jobs")


def job_page_shows(page, url: str, job_id: uuid.UUID) -> None:
    page.goto(f"{url}/?page=job&job={job_id}")
    page.get_by_role("heading", name="Job detail").wait_for()
    page.locator('[data-testid="stMetricValue"]').filter(has_text="succeeded").wait_for()
    page.locator('[data-testid="stMetricValue"]').filter(has_text="2 / 2").wait_for()
    settle(page)
    keep(page, "02-job-detail")
    assert_no_exception(page, "job detail")


def answer_page_shows(page, url: str, query_id: uuid.UUID) -> None:
    """The answer's text and its images, really loaded by the browser (not only <img> tags)."""
    page.goto(f"{url}/?page=answer&query={query_id}")
    page.get_by_role("heading", name="How do I fry pancakes?").wait_for()
    page.get_by_text("Fry each pancake in butter").first.wait_for()
    page.get_by_text("Pancake frying in a pan").first.wait_for()  # the caption of the answer's image
    settle(page)
    page.wait_for_function(
        """() => {
            const images = [...document.querySelectorAll('[data-testid="stMain"] img')];
            return images.length > 0 && images.every((image) => image.complete);
        }""",
        timeout=WAIT_MS,
    )
    images = page.evaluate(
        """() => [...document.querySelectorAll('[data-testid="stMain"] img')].map((image) => ({
            caption: image.closest('[data-testid="stImage"]')?.querySelector('[data-testid="stImageCaption"]')
                ?.innerText,
            src: image.src,
            size: [image.naturalWidth, image.naturalHeight],
        }))"""
    )
    keep(page, "03-answer")
    assert_no_exception(page, "answer")
    assert images and all(min(image["size"]) > 0 for image in images), images
    sizes = {image["caption"]: image["size"] for image in images}
    assert sizes.get("Pancake frying in a pan") == [40, 40], images  # the fixture's frying.jpg, in the answer


def submit_through_the_form(page, url: str, collection: str, questions: Path) -> uuid.UUID:
    page.goto(f"{url}/?page=jobs")
    page.get_by_text("Submit a job").wait_for()
    settle(page)
    # The form preselects the only collection there is; with other tests' collections there, this one is chosen.
    chosen = page.locator('[data-testid="stMultiSelect"]', has_text="Collections").locator("[data-tag]")
    if chosen.count() == 0:
        chooser = page.get_by_role("combobox", name="Collections", exact=True)
        chooser.click()
        chooser.fill(collection)
        page.get_by_role("option", name=collection, exact=True).click()
    chosen.first.wait_for()
    assert chosen.count() == 1 and chosen.first.get_attribute("aria-label") == collection  # this one alone
    uploader = page.locator('[data-testid="stFileUploader"]')
    uploader.locator('input[type="file"]').set_input_files(questions)
    chip = uploader.locator(  # the file's chip, its name in full in the title (the text is shortened)
        '[data-testid="stFileChip"]', has=page.locator(f'[data-testid="stFileChipName"][title="{questions.name}"]')
    )
    chip.wait_for()
    chip.locator('[data-testid="stFileChipIconSpinner"]').wait_for(state="detached")  # uploaded to the server
    assert chip.locator('[data-testid="stFileChipIconError"]').count() == 0, chip.inner_text()
    page.locator('[data-testid="stFormSubmitButton"] button').click()
    submitted = page.get_by_text(re.compile(r"Job [0-9a-f-]{36} submitted"))
    submitted.wait_for()
    job_id = uuid.UUID(re.search(r"Job ([0-9a-f-]{36}) submitted", submitted.inner_text()).group(1))
    settle(page)
    keep(page, "04-submitted")
    assert_no_exception(page, "jobs after submitting")
    return job_id


def test_dashboard_in_a_real_browser(workers, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' (make setup)")
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: infra/setup.sh (make setup) installs Debian's chromium"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        old.unlink()

    collection = f"browser-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), collection)
    for stage in PIPELINE:
        workers.start(stage)
    client = Client()
    name = f"{collection}-batch"
    job_id = client.submit(QUESTIONS, collection, name=name)
    finished = client.wait(job_id, stall_timeout=120)
    assert finished.state == "succeeded", finished
    fry = next(view for view in client.queries(job_id) if view.id == "pancakes/fry")
    questions = tmp_path / f"{collection}-form.jsonl"
    questions.write_text(json.dumps({"id": "fry", "question": "How do I fry pancakes?"}) + "\n")

    with dashboard(ARTIFACTS / "streamlit.log") as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],  # --no-sandbox: we may be root
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            try:
                jobs_page_lists(page, url, job_id, name)
                job_page_shows(page, url, job_id)
                answer_page_shows(page, url, fry.query_id)
                form_job = submit_through_the_form(page, url, collection, questions)
            except Exception:
                with suppress(Exception):  # what the page showed when it failed, if it still can
                    keep(page, "failure")
                raise
        finally:
            browser.close()

    done = client.wait(form_job, stall_timeout=120)
    assert done.state == "succeeded" and done.collection == collection and done.total == 1, done
    assert done.name == questions.name  # the form names a job after its file
