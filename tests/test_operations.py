"""Operating it (README, "Commands"): trigger, retry, cancel, workers, channel warnings, run."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.store.db import transaction
from scheduler.store.models import Job, utcnow
from scheduler.testing import detect_and_send, record_study, wait_session, wait_until

from .conftest import Define
from .engine import jobs_by_name, sessions_of

WORK = "dcm_testjobs:work"


def run_json(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else result


def job_row(session_id: str, name: str) -> Job | None:
    with transaction() as db:
        return db.scalars(
            select(Job).where(Job.session_id == session_id, Job.job_name == name)
        ).first()


def test_trigger_runs_only_the_jobs_listening_to_that_event(live: Settings, define: Define) -> None:
    define(
        [
            {"jobName": "routine", "workerEntry": WORK},
            {"jobName": "redo", "workerEntry": WORK, "events": ["reprocess"]},
        ]
    )
    record_study("30.1", now=utcnow() - timedelta(seconds=1))
    [detected] = detect_and_send()
    assert set(jobs_by_name(wait_session(detected))) == {"routine"}

    first = run_json("trigger", "reprocess", "--study", "30.1")
    second = run_json("trigger", "reprocess", "--study", "30.1")
    assert first["jobs"] == ["redo"] and first["session_id"] != second["session_id"]
    for planned in (first, second):
        doc = wait_session(planned["session_id"])
        assert (doc["event"], doc["status"]) == ("reprocess", "succeeded")
        assert set(jobs_by_name(doc)) == {"redo"}
    assert len(sessions_of("30.1")) == 3
    assert run_json("trigger", "reprocess", "--study", "nope", code=1).exit_code == 1


def test_retry_after_the_fault_is_fixed_ends_the_session_succeeded(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    marker = tmp_path / "fixed"
    define(
        [
            {"jobName": "flaky", "workerEntry": WORK, "params": {"fail_until": str(marker)}},
            {"jobName": "after", "workerEntry": WORK, "dependsOn": "flaky"},
            {"jobName": "final", "workerEntry": WORK, "phase": "post"},
        ]
    )
    record_study("30.2", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    doc = wait_session(session_id)
    assert doc["status"] == "partial"
    assert {n: j["status"] for n, j in jobs_by_name(doc).items()} == {
        "flaky": "failed",
        "after": "upstream_failed",
        "final": "succeeded",
    }

    marker.write_text("fixed")
    report = run_json("retry", "--session", session_id)
    assert report["requeued"] == ["flaky", "after", "final"]
    doc = wait_session(session_id)
    jobs = jobs_by_name(doc)
    assert doc["status"] == "succeeded"
    assert {n: (j["status"], j["attempts"]) for n, j in jobs.items()} == {
        "flaky": ("succeeded", 2),
        "after": ("succeeded", 1),
        "final": ("succeeded", 2),
    }
    assert [e["status"] for e in jobs["flaky"]["attempt_log"]] == ["failed", "succeeded"]
    assert jobs["final"]["result"]["outcomes"] == {"flaky": "succeeded", "after": "succeeded"}
    assert run_json("retry", "--session", session_id, code=1).exit_code == 1  # nothing failed now


def test_retry_of_one_job_by_id(live: Settings, define: Define, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    define([{"jobName": "flaky", "workerEntry": WORK, "params": {"fail_until": str(marker)}}])
    record_study("30.3", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    job_id = jobs_by_name(wait_session(session_id))["flaky"]["id"]
    marker.write_text("fixed")
    assert run_json("retry", job_id)["requeued"] == ["flaky"]
    assert wait_session(session_id)["status"] == "succeeded"


def test_cancel_stops_the_running_attempt_and_leaves_no_job_running(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    pidfile, gate = tmp_path / "pid", tmp_path / "never"
    define(
        [
            {
                "jobName": "long",
                "workerEntry": WORK,
                "params": {"pidfile": str(pidfile), "wait_for": str(gate)},
            },
            {"jobName": "next", "workerEntry": WORK, "dependsOn": "long"},
        ]
    )
    record_study("30.4", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    wait_until(pidfile.exists, what="the long job to start")
    attempt = psutil.Process(int(pidfile.read_text()))

    report = run_json("cancel", session_id)
    assert report == {"session_id": session_id, "cancelled": ["next"], "stopped": ["long"]}
    attempt.wait(timeout=30)  # killed at its next heartbeat
    doc = wait_session(session_id)
    assert doc["status"] == "cancelled"
    assert {j["status"] for j in doc["jobs"]} == {"cancelled"}
    assert jobs_by_name(doc)["long"]["attempt_log"][-1]["status"] == "cancelled"
    assert run_json("cancel", session_id, code=1).exit_code == 1


def test_workers_are_listed_with_channels_and_unconsumed_channels_are_warned(
    live: Settings, define: Define
) -> None:
    workers = run_json("workers")
    assert workers and workers[0]["live"] is True
    assert {"dcm.planning", "default"} <= set(workers[0]["channels"])

    define(
        [
            {"jobName": "cpu", "workerEntry": WORK},
            {"jobName": "gpu-seg", "workerEntry": WORK, "channel": "gpu"},
        ]
    )
    record_study("30.5")
    doc = run_json("plan", "--study", "30.5", "--dry-run")
    assert doc["trace"]["jobs"]["gpu-seg"]["warning"].startswith(
        "job 'gpu-seg' is sent to channel 'gpu', which no live worker consumes"
    )
    assert "warning" not in doc["trace"]["jobs"]["cpu"]


def test_retrying_an_upstream_failed_job_reruns_what_failed_upstream(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    marker = tmp_path / "fixed"
    define(
        [
            {"jobName": "root", "workerEntry": WORK, "params": {"fail_until": str(marker)}},
            {"jobName": "leaf", "workerEntry": WORK, "dependsOn": "root"},
        ]
    )
    record_study("31.1", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    leaf_id = jobs_by_name(wait_session(session_id))["leaf"]["id"]
    marker.write_text("fixed")
    assert run_json("retry", leaf_id)["requeued"] == ["root", "leaf"]
    doc = wait_session(session_id)
    assert {j["job_name"]: j["status"] for j in doc["jobs"]} == {
        "root": "succeeded",
        "leaf": "succeeded",
    }


def test_a_post_job_waits_for_the_new_run_of_a_retried_job(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    marker, gate = tmp_path / "fixed", tmp_path / "gate"
    define(
        [
            {"jobName": "quick", "workerEntry": WORK, "params": {"fail_until": str(marker)}},
            {"jobName": "slow", "workerEntry": WORK, "params": {"wait_for": str(gate)}},
            {"jobName": "store", "workerEntry": WORK, "phase": "post"},
        ]
    )
    record_study("31.2", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    wait_until(
        lambda: (j := job_row(session_id, "quick")) is not None and j.status == "failed",
        what="quick to fail while slow runs",
    )
    marker.write_text("fixed")
    run_json("retry", "--session", session_id)
    wait_until(
        lambda: (j := job_row(session_id, "quick")) is not None and j.status == "succeeded",
        what="quick to succeed on retry",
    )
    store = job_row(session_id, "store")
    assert store is not None and store.status == "queued"  # slow still runs
    gate.write_text("go")
    jobs = jobs_by_name(wait_session(session_id))
    assert jobs["store"]["attempts"] == 1
    assert jobs["store"]["started_at"] >= jobs["slow"]["finished_at"]
    assert jobs["store"]["result"]["outcomes"] == {"quick": "succeeded", "slow": "succeeded"}


def test_a_cancelled_session_can_be_retried(live: Settings, define: Define, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    define(
        [
            {"jobName": "held", "workerEntry": WORK, "params": {"wait_for": str(gate)}},
            {"jobName": "next", "workerEntry": WORK, "dependsOn": "held"},
        ]
    )
    record_study("31.3", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    wait_until(
        lambda: (j := job_row(session_id, "held")) is not None and j.status == "running",
        what="held to start",
    )
    run_json("cancel", session_id)
    assert wait_session(session_id)["status"] == "cancelled"
    gate.write_text("go")
    assert run_json("retry", "--session", session_id)["requeued"] == ["held", "next"]
    doc = wait_session(session_id)
    assert doc["status"] == "succeeded"
    assert jobs_by_name(doc)["held"]["attempts"] == 2


def test_jobs_of_an_unknown_session_is_a_reported_problem(env: Settings) -> None:
    result = run_json("jobs", "--session", "no-such-session", code=1)
    assert "no session" in result.output
