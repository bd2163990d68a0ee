"""Emission and the workers bridge on a real worker, Redis and PostgreSQL (docs/architecture.md)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.signals import task_postrun
from sqlalchemy import select

from scheduler.config import Settings
from scheduler.store.db import transaction
from scheduler.store.models import Job, utcnow
from scheduler.testing import detect_and_send, record_study, wait_session, wait_until
from workers_bridge.tasks import run_job

from .conftest import Define
from .engine import jobs_by_name

ENTRY = "dcm_testjobs:work"


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"jobName": name, "workerEntry": ENTRY, **fields}


def start(uid: str) -> str:
    record_study(uid, now=utcnow() - timedelta(seconds=1))
    sessions = detect_and_send()
    assert len(sessions) == 1
    return sessions[0]


def job_status(session_id: str, name: str) -> str | None:
    with transaction() as db:
        return db.scalar(
            select(Job.status).where(Job.session_id == session_id, Job.job_name == name)
        )


def calls_of(path: Path, name: str) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.split()[0] == name)


def test_diamond_dag_runs_in_dependency_order_and_passes_results(
    live: Settings, define: Define
) -> None:
    define(
        [
            job("a", params={"value": 1}),
            job("b", dependsOn="a", params={"value": 2}),
            job("c", dependsOn="a", params={"value": 3}),
            job("d", dependsOn=["b", "c"], params={"value": 4}),
        ]
    )
    doc = wait_session(start("10.1"))
    assert doc["status"] == "succeeded"
    jobs = jobs_by_name(doc)
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs.values())
    for later, earlier in [("b", "a"), ("c", "a"), ("d", "b"), ("d", "c")]:
        assert jobs[later]["started_at"] >= jobs[earlier]["finished_at"]
    results = jobs["d"]["result"]["results"]
    assert {name: r["value"] for name, r in results.items()} == {"b": 2, "c": 3}
    assert sorted(jobs["d"]["depends_on"]) == ["b", "c"]


def test_a_job_starts_when_its_own_dependencies_succeed_not_later(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    gate = tmp_path / "open-a"
    define(
        [
            job("a", params={"wait_for": str(gate)}),
            job("b", dependsOn="a"),
            job("c"),
            job("d", dependsOn="c"),
        ]
    )
    session_id = start("10.2")

    wait_until(lambda: job_status(session_id, "d") == "succeeded", what="d to succeed while a runs")
    gate.write_text("go")
    jobs = jobs_by_name(wait_session(session_id))
    assert jobs["d"]["finished_at"] < jobs["a"]["finished_at"]
    assert jobs["b"]["started_at"] >= jobs["a"]["finished_at"]


def test_a_failing_job_marks_only_its_descendants_upstream_failed(
    live: Settings, define: Define
) -> None:
    define(
        [
            job("a", params={"raise": "scanner data is corrupt"}),
            job("b", dependsOn="a"),
            job("c", dependsOn="b"),
            job("d"),
            job("e", dependsOn="d"),
            job("final", phase="post"),
        ]
    )
    doc = wait_session(start("10.3"))
    jobs = jobs_by_name(doc)
    status = {name: j["status"] for name, j in jobs.items()}
    assert status == {
        "a": "failed",
        "b": "upstream_failed",
        "c": "upstream_failed",
        "d": "succeeded",
        "e": "succeeded",
        "final": "succeeded",
    }
    assert jobs["a"]["error"].startswith("ValueError: scanner data is corrupt")
    assert "Traceback" in jobs["a"]["error"]
    assert jobs["b"]["error"] == "upstream_failed: dependency 'a' did not succeed"
    assert jobs["final"]["result"]["outcomes"]["a"] == "failed"
    assert doc["status"] == "partial"


def test_a_result_or_error_postgresql_cannot_store_fails_once_with_the_reason(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    define(
        [
            job("nul", params={"unstorable": True, "calls": str(calls)}),
            job("raises", params={"raise_unstorable": True, "calls": str(calls)}),
        ]
    )
    doc = wait_session(start("10.31"))
    jobs = jobs_by_name(doc)
    assert (jobs["nul"]["status"], jobs["nul"]["attempts"]) == ("failed", 1)
    assert jobs["nul"]["error"].startswith(
        "worker returned a value the store cannot keep: a string holds a NUL character"
    )
    assert (jobs["raises"]["status"], jobs["raises"]["attempts"]) == ("failed", 1)
    assert jobs["raises"]["error"].startswith("ValueError: bad\\x00byte \\ud800")
    assert (calls_of(calls, "nul"), calls_of(calls, "raises")) == (1, 1)


def test_a_job_failing_twice_then_succeeding_with_two_retries_succeeds_in_three_attempts(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    define([job("flaky", retries=2, retryDelay=0.2, params={"fail_times": 2, "calls": str(calls)})])
    doc = wait_session(start("10.4"))
    flaky = jobs_by_name(doc)["flaky"]
    assert (flaky["status"], flaky["attempts"]) == ("succeeded", 3)
    assert [e["status"] for e in flaky["attempt_log"]] == ["failed", "failed", "succeeded"]
    assert calls_of(calls, "flaky") == 3
    assert doc["status"] == "succeeded"


def test_a_job_exceeding_its_timeout_fails_as_a_timeout(live: Settings, define: Define) -> None:
    define([job("slow", timeout=1, params={"hang": True}), job("after", dependsOn="slow")])
    doc = wait_session(start("10.5"))
    jobs = jobs_by_name(doc)
    assert jobs["slow"]["status"] == "failed"
    assert jobs["slow"]["error"].startswith(
        "timeout: the attempt ran longer than its timeout of 1s and was killed"
    )
    assert "slow is about to hang" in jobs["slow"]["error"]  # output tail of the killed attempt
    assert jobs["after"]["status"] == "upstream_failed"
    assert doc["status"] == "failed"


def test_the_same_task_delivered_twice_runs_the_worker_once(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    calls, gate = tmp_path / "calls", tmp_path / "gate"
    define([job("once", params={"calls": str(calls), "wait_for": str(gate)})])
    session_id = start("10.6")
    wait_until(lambda: calls_of(calls, "once") == 1, what="the first delivery to start")
    with transaction() as db:
        job_id = db.scalars(select(Job.id).where(Job.session_id == session_id)).one()

    duplicates: list[str] = []

    def count(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if task_id == job_id:
            duplicates.append(task_id)

    task_postrun.connect(count, weak=False)
    try:
        for _ in range(3):  # while the first one runs
            run_job.apply_async(args=(job_id,), task_id=job_id)
        wait_until(lambda: len(duplicates) >= 3, what="the duplicates to be handled")
        gate.write_text("go")
        doc = wait_session(session_id)
        for _ in range(2):  # and after it finished
            run_job.apply_async(args=(job_id,), task_id=job_id)
        wait_until(lambda: len(duplicates) >= 6, what="the late duplicates to be handled")
    finally:
        task_postrun.disconnect(count)
    assert calls_of(calls, "once") == 1
    once = jobs_by_name(wait_session(session_id))["once"]
    assert (once["status"], once["attempts"]) == ("succeeded", 1)
    assert doc["status"] == "succeeded"


def test_workers_get_headers_params_added_params_and_context(
    live: Settings, define: Define
) -> None:
    define([job("probe", registryEntry="dcm_testjobs:accept", params={"value": "v"})])
    doc = wait_session(start("10.7"))
    result = jobs_by_name(doc)["probe"]["result"]
    assert result["value"] == "v"
    assert result["uid"] == "10.7"
    assert result["added_params"] == {"probe": {"seen": [], "uid": "10.7", "job": "probe"}}


def test_an_attempt_that_cannot_start_fails_with_the_reason(live: Settings, define: Define) -> None:
    define([{"jobName": "nowhere", "workerEntry": ENTRY, "python": "/nonexistent/bin/python"}])
    doc = wait_session(start("10.8"))
    job = jobs_by_name(doc)["nowhere"]
    assert job["status"] == "failed"
    assert job["error"].startswith(
        "the attempt could not be started (/nonexistent/bin/python): FileNotFoundError"
    )


def test_a_timed_out_attempt_is_logged_as_a_timeout(live: Settings, define: Define) -> None:
    define([{"jobName": "slow", "workerEntry": ENTRY, "timeout": 1, "params": {"hang": True}}])
    doc = wait_session(start("10.9"))
    assert [e["status"] for e in jobs_by_name(doc)["slow"]["attempt_log"]] == ["timeout"]


def test_a_long_running_worker_picks_up_a_changed_service(
    live: Settings, define: Define, services_root: Path
) -> None:
    package = services_root / "updatable" / "dcm_updatable"
    package.mkdir(parents=True, exist_ok=True)
    module = package / "__init__.py"
    module.write_text("def work(*args, **kwargs):\n    return {'version': 1}\n")
    define([{"jobName": "versioned", "workerEntry": "dcm_updatable:work"}], name="updatable")
    try:
        first = jobs_by_name(wait_session(start("10.10")))["versioned"]
        module.write_text("def work(*args, **kwargs):\n    return {'version': 2}\n")
        second = jobs_by_name(wait_session(start("10.11")))["versioned"]
    finally:
        import shutil
        import sys

        shutil.rmtree(services_root / "updatable")
        sys.modules.pop("dcm_updatable", None)
    assert (first["result"], second["result"]) == ({"version": 1}, {"version": 2})


def test_a_changed_helper_module_beside_the_package_is_picked_up_too(
    live: Settings, define: Define, services_root: Path
) -> None:
    import shutil
    import sys

    folder = services_root / "sibling"
    (folder / "dcm_sibling").mkdir(parents=True, exist_ok=True)
    helper = folder / "sibling_helpers.py"
    helper.write_text("VERSION = 1\n")
    (folder / "dcm_sibling" / "__init__.py").write_text(
        "import sibling_helpers\n\n\ndef work(*args, **kwargs):\n"
        "    return {'version': sibling_helpers.VERSION}\n"
    )
    define([{"jobName": "helped", "workerEntry": "dcm_sibling:work"}], name="sibling")
    try:
        first = jobs_by_name(wait_session(start("10.12")))["helped"]
        helper.write_text("VERSION = 2\n")
        second = jobs_by_name(wait_session(start("10.13")))["helped"]
    finally:
        shutil.rmtree(folder)
        for name in ("dcm_sibling", "sibling_helpers"):
            sys.modules.pop(name, None)
    assert (first["result"], second["result"]) == ({"version": 1}, {"version": 2})


def test_an_attempt_killed_with_sigkill_is_requeued_as_lost_with_its_peak_memory(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    """What the kernel's out-of-memory killer does to the attempt's own process."""
    import os
    import re
    import signal

    pidfile, calls = tmp_path / "pid", tmp_path / "calls"
    params = {"megabytes": 512, "pidfile": str(pidfile), "calls": str(calls)}
    define([job("hog", workerEntry="dcm_testjobs:hog", params=params)])
    session_id = start("45.1")
    wait_until(pidfile.exists, timeout=60, what="the attempt to hold its memory")
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    doc = wait_session(session_id)
    hog = jobs_by_name(doc)["hog"]
    assert (doc["status"], hog["status"], hog["attempts"]) == ("succeeded", "succeeded", 2)
    first = hog["attempt_log"][0]
    assert first["status"] == "lost"
    assert "killed by signal 9 (SIGKILL" in first["error"]
    peak = re.search(r"peak memory was (\d+) MiB", first["error"])
    assert peak is not None and int(peak.group(1)) >= 512


def test_a_timed_out_attempt_takes_down_what_it_started_even_in_another_session(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    from .test_callbacks import ended, sleepers

    path = tmp_path / "sleepers"
    define(
        [
            job(
                "greedy",
                workerEntry="dcm_testjobs:spawn_and_hang",
                params={"sleepers": str(path)},
                timeout=1,
            )
        ]
    )
    doc = wait_session(start("45.2"))
    assert jobs_by_name(doc)["greedy"]["error"].startswith("timeout:")
    for pid in sleepers(path):
        wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to be killed")


def test_a_timed_out_attempt_takes_down_a_daemon_it_started(
    live: Settings, define: Define, tmp_path: Path
) -> None:
    from .test_callbacks import ended

    daemon = tmp_path / "daemon"
    params = {"daemon": str(daemon)}
    define([job("stubborn", workerEntry="dcm_testjobs:stubborn", params=params, timeout=1)])
    doc = wait_session(start("45.3"))
    assert jobs_by_name(doc)["stubborn"]["error"].startswith("timeout:")
    pid = int(daemon.read_text())
    wait_until(lambda: ended(pid), timeout=10, what=f"daemon {pid} to be killed")


def test_retry_delays_double_up_to_a_week_and_never_overflow() -> None:
    from scheduler.jobstate import retry_delay

    # retries 3 (4 attempts): the delays after attempts 1, 2 and 3.
    assert [retry_delay(30.0, attempt, 4, 3) for attempt in (1, 2, 3)] == [30.0, 60.0, 120.0]
    week = 7 * 86400.0
    # The doubling once overflowed (a failed attempt then looked like a lost worker).
    assert retry_delay(3600.0, 999, 1001, 1000) == week
    assert retry_delay(30 * 86400.0, 5, 11, 10) == 30 * 86400.0  # a longer retryDelay stands
