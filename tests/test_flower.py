"""Flower (README, "Commands"): a real `celery -A scheduler flower` shows jobs by their job names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.config import Settings
from scheduler.store.models import utcnow
from scheduler.testing import (
    detect_and_send,
    environment_values,
    free_port,
    record_study,
    using_environment,
    wait_session,
    wait_until,
)

from .conftest import Define
from .test_faults import Cluster

AUTH = ("operator", "s3cret")


@pytest.fixture
def worker(tmp_path: Path, pg_url: str, redis_url: str, services_root: Path) -> Iterator[Settings]:
    """A real `celery -A scheduler worker` process, as Flower watches in production."""
    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
    }
    with using_environment(values) as settings:
        workers = Cluster(tmp_path)
        try:
            workers.worker("flowered")
            yield settings
        finally:
            workers.stop()


@pytest.fixture
def flower(worker: Settings) -> Iterator[str]:
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
    """Workers send task events only while Flower asks for them (it turns
    them on every few seconds): a session run once Flower has done so shows."""
    define(
        [
            {"jobName": "segment-liver", "workerEntry": "dcm_testjobs:work"},
            {"jobName": "report", "workerEntry": "dcm_testjobs:work", "dependsOn": "segment-liver"},
        ]
    )
    job_ids: dict[str, str] = {}
    runs = iter(range(1, 1000))

    def seen() -> dict[str, Any] | None:
        response = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5)
        response.raise_for_status()
        tasks = response.json()
        found = {task_id: tasks[task_id] for task_id in job_ids if task_id in tasks}
        # A job that ran while Flower was turning events on is seen in part
        # (its success, not its receipt, which carries the name): not done.
        done = (
            bool(job_ids)
            and len(found) == len(job_ids)
            and all(t.get("state") == "SUCCESS" and t.get("name") for t in found.values())
        )
        if done:
            return found
        # Not seen: run another session, which Flower may by now be watching.
        record_study(f"50.{next(runs)}", now=utcnow() - timedelta(seconds=1))
        [session_id] = detect_and_send()
        job_ids.clear()
        job_ids.update({job["id"]: job["job_name"] for job in wait_session(session_id)["jobs"]})
        return None

    found = wait_until(seen, timeout=60, what="Flower to report both jobs")
    assert {task_id: task["name"] for task_id, task in found.items()} == {
        task_id: f"dcm:{name}" for task_id, name in job_ids.items()
    }
    assert all(
        task["args"] == repr((task_id,)) or task_id in task["args"]
        for task_id, task in found.items()
    )  # the job id only, never headers
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401  # basic auth on
