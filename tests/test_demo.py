"""`dcm-scheduler demo`: the README's first command works from any folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path


def test_demo_runs_every_session_to_the_end_with_outputs(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DCM_", "CELERY_"))}
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "demo", "--home", str(home)],
        cwd=elsewhere,
        env=environment | {"PYTHONPATH": str(Path(__file__).parent.parent), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = re.search(r"(\d+) sessions: \1 succeeded; (\d+) jobs: \2 succeeded", done.stdout)
    assert summary and int(summary.group(1)) >= 5, done.stdout
    archives = list((home / "outputs").rglob("session-*.zip"))
    thumbnails = list((home / "outputs").rglob("*.png"))
    reports = list((home / "outputs").rglob("*.html"))
    assert archives and thumbnails and reports
    with zipfile.ZipFile(archives[0]) as bundle:
        assert bundle.testzip() is None
    assert not list(elsewhere.iterdir())  # nothing written outside the demo folder


def test_the_summary_columns_follow_the_planning_order_whichever_session_came_first() -> None:
    from rich.console import Console

    from scheduler.demo import print_summary

    def job(session: str, name: str, created: str) -> dict[str, object]:
        return {
            "session_id": session,
            "job_name": name,
            "status": "succeeded",
            "created_at": created,
            "error": None,
        }

    sessions = [
        {"id": "s-early", "uid": "1.1", "status": "succeeded"},
        {"id": "s-later", "uid": "1.2", "status": "succeeded"},
    ]
    # The session planned first had no `archive`; `extra` is in no order given.
    jobs = [
        job("s-early", "convert", "2026-01-01T00:00:00Z"),
        job("s-early", "report", "2026-01-01T00:00:00Z"),
        job("s-later", "report", "2026-01-01T00:00:01Z"),
        job("s-later", "extra", "2026-01-01T00:00:01Z"),
        job("s-later", "archive", "2026-01-01T00:00:01Z"),
        job("s-later", "convert", "2026-01-01T00:00:01Z"),
    ]
    console = Console(record=True, width=200)
    print_summary(console, sessions, jobs, ["convert", "archive", "report", "unplanned"])
    header = next(line for line in console.export_text().splitlines() if "session" in line)
    columns = [header.index(name) for name in ("convert", "archive", "report", "extra")]
    assert columns == sorted(columns), header
    assert "unplanned" not in header
