"""Flower (README, "Commands"): a real `celery -A scheduler flower` shows jobs by their job names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from scheduler.config import Settings
from scheduler.store.models import utcnow
from scheduler.testing import detect_and_send, free_port, record_study, wait_session, wait_until

from .conftest import Define

AUTH = ("operator", "s3cret")


@pytest.fixture
def flower(live: Settings) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "scheduler",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={AUTH[0]}:{AUTH[1]}",
        ],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"flower exited: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what="Flower to answer")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_flower_shows_each_job_by_its_job_name_and_state(flower: str, define: Define) -> None:
    define(
        [
            {"jobName": "segment-liver", "workerEntry": "dcm_testjobs:work"},
            {"jobName": "report", "workerEntry": "dcm_testjobs:work", "dependsOn": "segment-liver"},
        ]
    )
    record_study("50.1", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    doc = wait_session(session_id)
    job_ids = {job["id"]: job["job_name"] for job in doc["jobs"]}

    def seen() -> dict[str, Any] | None:
        response = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5)
        response.raise_for_status()
        tasks = response.json()
        found = {task_id: tasks[task_id] for task_id in job_ids if task_id in tasks}
        done = len(found) == len(job_ids) and all(
            t.get("state") == "SUCCESS" for t in found.values()
        )
        return found if done else None

    found = wait_until(seen, timeout=60, what="Flower to report both jobs")
    assert {task_id: task["name"] for task_id, task in found.items()} == {
        task_id: f"dcm:{name}" for task_id, name in job_ids.items()
    }
    assert all(
        task["args"] == repr((task_id,)) or task_id in task["args"]
        for task_id, task in found.items()
    )  # the job id only, never headers
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401  # basic auth on
