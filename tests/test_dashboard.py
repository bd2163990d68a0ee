"""The dashboard (``serve``) in a real browser: on a live session (PostgreSQL,
Redis and a Celery worker run the jobs while headless Chromium watches), and
on a known history in SQLite for the sessions list, the session graph and
the services page (README, "HTTP API and dashboard").

Needs the Debian package ``chromium`` (``/usr/bin/chromium``, or the binary named
by ``DCM_TEST_CHROMIUM``); Playwright never downloads a browser here. Locally
the tests skip without it; under CI they fail. One browser serves the module.
Each page is saved as a screenshot for a person to look at, in
``DCM_SCREENSHOTS`` (default ``build/screenshots`` of the repository).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from scheduler.api import create_app
from scheduler.cohorts import Criteria, parse_where
from scheduler.cohorts import start as cohort_start
from scheduler.config import Settings, get_settings, reset_settings
from scheduler.sessions import trigger
from scheduler.store.db import init_db, transaction
from scheduler.store.models import Cohort, Job, SchedulingSession, utcnow
from scheduler.testing import (
    environment_values,
    free_port,
    record_study,
    session_doc,
    using_environment,
)
from scheduler.windows import waiting_for

from .conftest import Define, require
from .engine import jobs_by_name
from .history import History, add_session, record_history

CHROMIUM = Path(os.environ.get("DCM_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-token"
WAIT_MS = 60_000
SCREENSHOTS = Path(
    os.environ.get("DCM_SCREENSHOTS")
    or Path(__file__).resolve().parent.parent / "build" / "screenshots"
)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn in a thread of this process, on a free port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, name="dashboard-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not served.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        served.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def server(live: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The real server on the live setup."""
    monkeypatch.setenv("DCM_API_TOKEN", TOKEN)
    reset_settings()
    with serving(create_app()) as url:
        yield url
    reset_settings()


@pytest.fixture
def history(tmp_path: Path, define: Define, services_root: Path) -> Iterator[tuple[str, History]]:
    """The server over a SQLite store holding the known history of tests/history.py."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url)
    values = environment_values(tmp_path, url) | {"DCM_SERVICES_PATH": str(services_root)}
    with using_environment(values):
        recorded = record_history(define)
        with serving(create_app()) as served:
            yield served, recorded


def screenshot(page: Any, name: str) -> Path:
    """Save the whole page where a person can look at it, and say where."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot of the {name} page: {path}")
    assert path.stat().st_size > 0
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require(CHROMIUM.exists(), f"Chromium ({CHROMIUM}, Debian package chromium)")
    from playwright.sync_api import expect, sync_playwright

    # A loaded machine (CI runs tests side by side) may take seconds to render.
    expect.set_options(timeout=WAIT_MS)

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_dashboard_follows_a_running_session_and_retries_a_failed_job(
    browser: object, server: str, define: Define, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    go_on, fixed = tmp_path / "go-on", tmp_path / "fixed"
    define(
        [
            {
                "jobName": "wait",
                "workerEntry": "dcm_testjobs:work",
                "params": {"wait_for": str(go_on)},
                "events": "reprocess",
            },
            {
                "jobName": "then",
                "workerEntry": "dcm_testjobs:work",
                "dependsOn": "wait",
                "events": "reprocess",
            },
            {
                "jobName": "flaky",
                "workerEntry": "dcm_testjobs:work",
                "params": {"fail_until": str(fixed)},
                "events": "reprocess",
            },
            {
                "jobName": "skipped",
                "workerEntry": "dcm_testjobs:work",
                "registryEntry": "dcm_testjobs:decline",
                "events": "reprocess",
            },
        ]
    )
    record_study("9.1")
    session_id = trigger("reprocess", "study", "9.1").session_id

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    # The list: the session is there, found by UID, hidden by another status.
    page.goto(f"{server}/#/?uid=9.1")
    row = page.locator(f'tr[data-session="{session_id}"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    page.select_option("#filter-status", "succeeded")
    expect(row).to_have_count(0, timeout=WAIT_MS)
    page.goto(f"{server}/#/")
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#filter-status")).to_have_value("")
    page.screenshot(path=str(tmp_path / "sessions.png"), full_page=True)
    row.locator("a").click()

    # The session page draws the DAG and follows it while the jobs run.
    node = lambda name: page.locator(f'svg.dag [data-job="{name}"]')  # noqa: E731
    expect(node("wait")).to_have_attribute("data-status", "running", timeout=WAIT_MS)
    expect(node("then")).to_have_attribute("data-status", "queued")
    expect(page.locator('path.edge[data-from="wait"][data-to="then"]')).to_have_count(1)
    expect(node("flaky")).to_have_attribute("data-status", "failed", timeout=WAIT_MS)
    expect(page.locator('[data-job-card="flaky"] .error-message')).to_contain_text("missing")
    expect(page.locator('[data-trace-job="skipped"]')).to_contain_text("callback returned False")
    page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)

    go_on.write_text("go")
    expect(node("wait")).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    expect(node("then")).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    expect(page.locator("#session")).to_have_attribute("data-status", "partial", timeout=WAIT_MS)

    # Retry the failed job once the fault is fixed; the page asks for the token once.
    fixed.write_text("fixed")
    page.click('button[data-retry-job="flaky"]')
    expect(page.locator("#token-dialog")).to_be_visible()
    page.fill("#token-input", TOKEN)
    page.click("#token-save")
    expect(node("flaky")).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    expect(page.locator("#session")).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    assert page.evaluate("localStorage.getItem('dcm-scheduler.api-token')") == TOKEN
    expect(page.locator("#retry-session")).to_be_disabled()

    screenshot(page, "session-live")
    assert problems == []


def watched_page(browser: Any) -> tuple[Any, list[str]]:
    """A page whose console errors and uncaught exceptions are collected."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return page, problems


def crosses(start: tuple[float, float], end: tuple[float, float], box: tuple[float, ...]) -> bool:
    """Whether the segment passes through the inside of ``box`` (left, top,
    right, bottom); touching its border does not count (Liang–Barsky)."""
    left, top, right, bottom = box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1
    (x, y), (dx, dy) = start, (end[0] - start[0], end[1] - start[1])
    enter, leave = 0.0, 1.0
    for p, q in ((-dx, x - left), (dx, right - x), (-dy, y - top), (dy, bottom - y)):
        if p == 0:
            if q < 0:
                return False
        elif p < 0:
            enter = max(enter, q / p)
        else:
            leave = min(leave, q / p)
    return enter < leave


GRAPH_SHAPES = """() => ({
  boxes: [...document.querySelectorAll("svg.dag g.node")].map((g) => {
    const m = g.transform.baseVal.consolidate().matrix;
    const r = g.querySelector("rect");
    return [g.dataset.job, m.e, m.f, m.e + r.width.baseVal.value, m.f + r.height.baseVal.value];
  }),
  edges: [...document.querySelectorAll("svg.dag path.edge")].map((p) => ({
    from: p.dataset.from, to: p.dataset.to, classes: p.getAttribute("class"),
    d: p.getAttribute("d"), width: parseFloat(getComputedStyle(p).strokeWidth),
    opacity: parseFloat(getComputedStyle(p).strokeOpacity),
  })),
})"""


def test_session_graph_routes_every_edge_between_boxes_and_draws_implied_edges_lighter(
    browser: Any, history: tuple[str, History]
) -> None:
    from playwright.sync_api import expect

    server, recorded = history
    page, problems = watched_page(browser)
    page.goto(f"{server}/#/sessions/{recorded.graph}")
    expect(page.locator('svg.dag [data-job="notify"]')).to_be_visible(timeout=WAIT_MS)

    shapes = page.evaluate(GRAPH_SHAPES)
    boxes = {name: tuple(box) for name, *box in shapes["boxes"]}
    assert set(boxes) == {"prep", "segment", "measure", "report", "qc", "notify"}
    edges = {(e["from"], e["to"]): e for e in shapes["edges"]}
    assert len(edges) == 13
    for (upstream, job), edge in edges.items():
        points = [(float(x), float(y)) for x, y in re.findall(r"([-\d.]+),([-\d.]+)", edge["d"])]
        for other, box in boxes.items():
            if other in (upstream, job):
                continue
            for start, end in zip(points, points[1:], strict=False):
                assert not crosses(start, end, box), f"{upstream} → {job} passes behind {other}"
    # The check has something to catch: segment → report spans measure's rank.
    over = edges[("segment", "report")]["d"]
    xs = [float(x) for x, _ in re.findall(r"([-\d.]+),([-\d.]+)", over)]
    assert min(xs) < boxes["measure"][0] and max(xs) > boxes["measure"][2]

    implied = {key for key, edge in edges.items() if "implicit" in edge["classes"].split()}
    mains = ["segment", "measure", "report", "qc"]
    assert implied == {("prep", m) for m in mains} | {(u, "notify") for u in ["prep", *mains]}
    declared = edges[("segment", "measure")]
    for key in implied:
        assert edges[key]["width"] < declared["width"]
        assert edges[key]["opacity"] < declared["opacity"]

    # Which code ran: on the box and on the job's card.
    node = page.locator('svg.dag [data-job="segment"] .provenance')
    job = jobs_by_name(session_doc(recorded.graph))["segment"]
    expect(node).to_contain_text(f"testjobs {job['service_version']} · {job['service_hash'][:8]}")
    expect(page.locator('[data-job-card="segment"] .provenance')).to_contain_text(
        job["service_hash"][:12]
    )
    screenshot(page, "session-graph")
    assert problems == []


def test_sessions_list_filters_by_status_event_and_patient_and_follows_new_sessions(
    browser: Any, history: tuple[str, History]
) -> None:
    from playwright.sync_api import expect

    server, recorded = history
    sessions = recorded.sessions
    page, problems = watched_page(browser)
    row = lambda session_id: page.locator(f'tr[data-session="{session_id}"]')  # noqa: E731

    page.goto(f"{server}/#/")
    expect(row(recorded.graph)).to_be_visible(timeout=WAIT_MS)
    page.fill("#filter-q", "thorax")
    page.press("#filter-q", "Enter")
    expect(page.locator("#sessions tbody tr")).to_have_count(2, timeout=WAIT_MS)
    expect(row(recorded.graph)).to_be_visible()
    expect(row(sessions["series"])).to_be_visible()
    page.select_option("#filter-status", "succeeded")
    expect(page.locator("#sessions tbody tr[data-session]")).to_have_count(1, timeout=WAIT_MS)
    expect(row(sessions["series"])).to_be_visible()
    assert "q=thorax" in page.url and "status=succeeded" in page.url

    # A link with the filters opens the same list; it follows new sessions.
    page.goto(f"{server}/#/?q=richard&event=patient.stable")
    expect(row(sessions["patient"])).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#sessions tbody tr[data-session]")).to_have_count(1)
    updated = page.get_attribute("#sessions-updated", "data-updated")
    with transaction() as db:
        arrived = add_session(
            db, "patient", "PAT-8", "patient.stable", "running", recorded.now + timedelta(seconds=1)
        )
        add_session(db, "study", "1.2.7", "patient.stable", "running", recorded.now)
    expect(row(arrived)).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#sessions tbody tr[data-session]")).to_have_count(2)
    assert page.get_attribute("#sessions-updated", "data-updated") != updated
    expect(page.locator("#filter-q")).to_have_value("richard")
    expect(page.locator("#filter-event")).to_have_value("patient.stable")
    # The event filter suggests what the loaded services listen to.
    expect(page.locator('#known-events option[value="graph"]')).to_have_count(1)
    screenshot(page, "sessions")
    assert problems == []


def test_services_page_shows_runs_success_durations_and_the_last_failure_per_period(
    browser: Any, history: tuple[str, History]
) -> None:
    from playwright.sync_api import expect

    server, recorded = history
    page, problems = watched_page(browser)
    page.goto(f"{server}/services")
    segment = page.locator('tr[data-stats="seg/segment"]')
    expect(segment.locator('[data-field="runs"]')).to_have_text("5", timeout=WAIT_MS)
    expect(page.locator("#period")).to_have_value("7d")
    expect(segment.locator('[data-field="success"]')).to_have_text("80%")
    expect(segment.locator('[data-field="p50"]')).to_have_text("3.0s")
    expect(segment.locator('[data-field="p95"]')).to_have_text("8.8s")
    failure = segment.locator('[data-field="last-failure"]')
    expect(failure).to_contain_text("RuntimeError: out of memory")
    expect(failure.locator("a")).to_have_attribute(
        "href", f"#/sessions/{recorded.sessions['failed-run']}"
    )
    expect(page.locator('tr[data-stats="testjobs/measure"]')).to_contain_text("no lungs found")
    screenshot(page, "services")

    page.select_option("#period", "all")
    expect(segment.locator('[data-field="runs"]')).to_have_text("6", timeout=WAIT_MS)
    expect(segment.locator('[data-field="p95"]')).to_have_text("1m 18s")
    assert page.url.endswith("#/services?period=all")
    page.select_option("#period", "24h")
    expect(segment.locator('[data-field="runs"]')).to_have_text("5", timeout=WAIT_MS)
    failure.locator("a").click()
    expect(page.locator("#session")).to_have_attribute(
        "data-session", recorded.sessions["failed-run"], timeout=WAIT_MS
    )
    assert problems == []


def held_back(db: Any, now: datetime, recorded: History) -> tuple[str, str, str]:
    """An urgent session (its trace says why) and, in cohort ``ct-rerun``
    with the failed MR session, a session whose job waits for an off-peak
    window that is closed now, on channel ``gpu``: the urgent id, the waiting
    one's, and the window."""
    zone = get_settings().timezone
    local = now.astimezone(zone)
    window = f"{local + timedelta(hours=2):%H:%M}-{local + timedelta(hours=3):%H:%M}"
    assert waiting_for(window, now, zone) is not None
    urgent = add_session(db, "study", "1.2.7", "study.stable", "running", now)
    waiting = add_session(db, "study", "1.2.8", "reprocess", "running", now)
    row = db.get(SchedulingSession, urgent)
    row.urgent = True
    row.trace = {"urgent": ["job 'triage': urgent: StudyDescription matches (?i)thorax"]}
    db.get(SchedulingSession, waiting).cohort = "ct-rerun"
    db.get(SchedulingSession, recorded.sessions["mr"]).cohort = "ct-rerun"
    for session_id, name, status, channel in (
        (urgent, "triage", "running", "default"),
        (waiting, "heavy", "queued", "gpu"),
    ):
        db.add(
            Job(
                session_id=session_id,
                job_name=name,
                service="seg",
                worker_entry="seg:run",
                status=status,
                channel=channel,
                window=window if status == "queued" else None,
                created_at=now,
                started_at=now if status == "running" else None,
            )
        )
    cohort = db.get(Cohort, "ct-rerun")
    cohort.opened, cohort.status = 2, "opened"
    return urgent, waiting, window


def test_urgent_waiting_jobs_channels_and_cohorts_in_the_dashboard(
    browser: Any, history: tuple[str, History]
) -> None:
    from playwright.sync_api import expect

    server, recorded = history
    criteria = Criteria(parse_where(["Modality=CT"]), None, None, None)
    cohort_start("reprocess", "study", criteria, rate_per_min=30, name="ct-rerun")
    with transaction() as db:
        urgent, waiting, window = held_back(db, utcnow(), recorded)
    page, problems = watched_page(browser)
    page.on(
        "dialog", lambda d: d.accept("scanner maintenance") if d.type == "prompt" else d.accept()
    )
    row = lambda session_id: page.locator(f'tr[data-session="{session_id}"]')  # noqa: E731

    # The list: urgent marked, the cohort named; the urgent filter keeps the urgent only.
    page.goto(f"{server}/#/")
    expect(row(urgent).locator(".badge.urgent")).to_be_visible(timeout=WAIT_MS)
    expect(row(waiting).locator(".badge.urgent")).to_have_count(0)
    expect(row(waiting).locator('[data-cohort="ct-rerun"]')).to_have_text("ct-rerun")
    page.check("#filter-urgent")
    expect(page.locator("#sessions tbody tr[data-session]")).to_have_count(1, timeout=WAIT_MS)
    expect(row(urgent)).to_be_visible()

    # The urgent session says why; the waiting job shows what holds it back.
    row(urgent).locator("a").first.click()
    expect(page.locator("#urgent-why")).to_contain_text("StudyDescription matches (?i)thorax")
    page.goto(f"{server}/#/sessions/{waiting}")
    card = page.locator('[data-job-card="heavy"]')
    expect(card.locator(".waiting-note")).to_contain_text(f"window {window} opens at")
    expect(card).to_have_class(re.compile(r"\bwaiting\b"))
    expect(page.locator('svg.dag [data-job="heavy"]')).to_have_class(re.compile(r"\bwaiting\b"))
    screenshot(page, "session-waiting")

    # Pause gpu from the Channels page (asking for the token), then resume it.
    with using_environment({"DCM_API_TOKEN": TOKEN}):
        page.click('nav a[data-nav="channels"]')
        gpu = page.locator('tr[data-channel="gpu"]')
        expect(gpu.locator('[data-field="queued"]')).to_have_text("1", timeout=WAIT_MS)
        gpu.locator("button[data-pause]").click()
        page.fill("#token-input", TOKEN)
        page.click("#token-save")
        expect(gpu).to_have_attribute("data-paused", "true", timeout=WAIT_MS)
        expect(gpu.locator('[data-field="state"]')).to_contain_text("scanner maintenance")
        channel = lambda: next(  # noqa: E731
            c for c in page.request.get(f"{server}/api/channels").json() if c["channel"] == "gpu"
        )
        assert channel()["paused"] and channel()["reason"] == "scanner maintenance"
        screenshot(page, "channels")
        gpu.locator("button[data-resume]").click()
        expect(gpu).to_have_attribute("data-paused", "false", timeout=WAIT_MS)
        assert not channel()["paused"]

        # The cohort with its sessions by status; count matches, then cancel it.
        page.goto(f"{server}/cohorts")
        cohort = page.locator('tr[data-cohort="ct-rerun"]')
        expect(cohort.locator('[data-field="opened"]')).to_have_text("2/2", timeout=WAIT_MS)
        expect(cohort.locator('[data-count="running"]')).to_have_text("running 1")
        expect(cohort.locator('[data-count="failed"]')).to_have_text("failed 1")
        expect(cohort.locator('[data-cohort-action="retry"]')).to_be_enabled()
        page.click(".start-cohort summary")
        page.fill('#cohort-form [name="event"]', "reprocess")
        page.fill('#cohort-form [name="where"]', "Modality=CT\nStudyDescription=*BRAIN*")
        page.click("#cohort-dry-run")
        expect(page.locator("#cohort-count")).to_have_attribute("data-count", "1")
        expect(page.locator("#cohort-preview")).to_contain_text("1.2.8")
        screenshot(page, "cohorts")
        cohort.locator('[data-cohort-action="cancel"]').click()
        expect(cohort).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
        expect(cohort.locator('[data-count="cancelled"]')).to_have_text("cancelled 1")

    # A cohort's name lists its sessions.
    cohort.locator("a[data-cohort]").click()
    expect(page.locator("#sessions tbody tr[data-session]")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator("#filter-cohort")).to_have_value("ct-rerun")
    assert problems == []
