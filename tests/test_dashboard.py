"""The dashboard (``serve``) in a real browser, on a live session: PostgreSQL,
Redis and a Celery worker run the jobs while headless Chromium watches.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``, or the binary named
by ``DCM_TEST_CHROMIUM``); Playwright never downloads a browser here. Locally
the test skips without it; under CI it fails.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from scheduler.api import create_app
from scheduler.config import Settings, reset_settings
from scheduler.sessions import trigger
from scheduler.testing import free_port, record_study

from .conftest import Define, require

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


@pytest.fixture
def server(live: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The real server (uvicorn, in a thread of this process) on a free port."""
    monkeypatch.setenv("DCM_API_TOKEN", TOKEN)
    reset_settings()
    config = uvicorn.Config(create_app(), host="127.0.0.1", port=free_port(), log_level="warning")
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, name="dashboard-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not served.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{config.port}"
    served.should_exit = True
    thread.join(timeout=30)
    reset_settings()


@pytest.fixture
def browser() -> Iterator[object]:
    require(CHROMIUM.exists(), f"Chromium ({CHROMIUM}, Debian package chromium)")
    from playwright.sync_api import sync_playwright

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

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"dashboard screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0
    assert problems == []
