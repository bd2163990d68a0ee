"""A claim committed is never taken again for a stranger's: what follows it
fails on its own, and a claim whose answer was lost is re-queued at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from scheduler import jobstate, sessions
from scheduler.clock import iso
from scheduler.config import Settings, reset_settings
from scheduler.store.db import transaction
from scheduler.store.models import Job
from scheduler.testing import (
    environment_values,
    record_study,
    use_environment,
    using_environment,
)
from workers_bridge import runner

from .conftest import Define

WORK = "dcm_testjobs:work"


@pytest.fixture
def store(
    env: Settings, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """A fresh store (each backend) with the test services."""
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    yield use_environment({})
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def pg_store(
    tmp_path: Path, pg_url: str, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """PostgreSQL, where a claim is one statement committed on its own."""
    values = environment_values(tmp_path, pg_url) | {"DCM_SERVICES_PATH": str(services_root)}
    with using_environment(values) as settings:
        yield settings


def queued_job(define: Define, uid: str, calls: Path) -> str:
    define([{"jobName": "only", "workerEntry": WORK, "params": {"calls": str(calls)}}])
    record_study(uid)
    session_id = sessions.open_session("study", uid, "study.stable", manual=True)
    assert session_id is not None
    sessions.plan_session(session_id)
    with transaction() as db:
        return db.scalars(select(Job.id).where(Job.session_id == session_id)).one()


def job_row(job_id: str) -> tuple[Any, ...]:
    with transaction() as db:
        job = db.get(Job, job_id)
        assert job is not None
        return job.status, job.attempts, [e["status"] for e in job.attempt_log]


def calls_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


class DropsOnce:
    """``function`` whose first call loses the connection: before it runs, or
    after (done on the server, the answer never came)."""

    def __init__(self, function: Callable[..., Any], *, after: bool) -> None:
        self.function, self.after, self.dropped = function, after, False

    def __call__(self, *args: Any) -> Any:
        drop = not self.dropped
        self.dropped = True
        if drop and not self.after:
            raise self.error()
        value = self.function(*args)
        if drop:
            raise self.error()
        return value

    @staticmethod
    def error() -> OperationalError:
        return OperationalError("SELECT …", {}, Exception("server closed the connection"))


def test_a_store_error_after_the_claim_does_not_take_the_job_for_another_s(
    store: Settings, define: Define, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    job_id = queued_job(define, "70.1", calls)
    presence = DropsOnce(runner.record_presence, after=False)  # right after the claim
    monkeypatch.setattr(runner, "record_presence", presence)
    runner._touched.clear()
    assert runner.run_job(job_id, "w@host") == "succeeded"
    assert presence.dropped
    assert job_row(job_id) == ("succeeded", 1, ["succeeded"])
    assert calls_of(calls) == 1


def test_a_claim_committed_whose_answer_was_lost_is_requeued_at_once(
    pg_store: Settings, define: Define, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    job_id = queued_job(define, "70.2", calls)
    monkeypatch.setattr(jobstate, "claim", DropsOnce(jobstate.claim, after=True))
    assert runner.run_job(job_id, "w@host") is None  # not run by a claim it cannot see
    status, attempts, log = job_row(job_id)
    assert (status, attempts, log) == ("queued", 1, ["lost"])
    with transaction() as db:
        job = db.get(Job, job_id)
        assert job is not None and "connection dropped" in (job.error or "")
    assert runner.run_job(job_id, "w@host") == "succeeded"  # the message the re-queue sent
    assert job_row(job_id) == ("succeeded", 2, ["lost", "succeeded"])
    assert calls_of(calls) == 1


def planned_pair(define: Define, uid: str, calls: Path) -> tuple[str, str]:
    """A session of ``first`` → ``second``; their ids."""
    params = {"calls": str(calls)}
    define(
        [
            {"jobName": "first", "workerEntry": WORK, "params": params},
            {"jobName": "second", "workerEntry": WORK, "params": params, "dependsOn": ["first"]},
        ]
    )
    record_study(uid)
    session_id = sessions.open_session("study", uid, "study.stable", manual=True)
    assert session_id is not None
    sessions.plan_session(session_id)
    with transaction() as db:
        found = db.execute(select(Job.job_name, Job.id).where(Job.session_id == session_id))
        jobs = {name: job_id for name, job_id in found}
    return jobs["first"], jobs["second"]


def test_a_success_is_logged_with_the_worker_and_start_its_claim_wrote(
    store: Settings, define: Define, tmp_path: Path
) -> None:
    first, second = planned_pair(define, "70.3", tmp_path / "calls")
    assert runner.run_job(first, "w@host") == "succeeded"
    with transaction() as db:
        job, dependent = db.get(Job, first), db.get(Job, second)
        assert job is not None and dependent is not None
        [entry] = job.attempt_log
        assert entry["status"] == "succeeded" and entry["attempt"] == 1
        assert (entry["worker"], entry["error"]) == ("w@host", None)
        assert entry["started_at"] == iso(job.started_at)
        assert entry["finished_at"] == iso(job.finished_at)
        assert entry["output_dir"].endswith("first") and "python" in entry
        assert job.result["job"] == "first" and job.error is None
        # Released, and marked sent with the ending.
        assert (dependent.pending_deps, dependent.status) == (0, "queued")
        assert dependent.dispatched_at == job.finished_at


def test_a_success_of_an_attempt_no_longer_the_job_s_is_ignored(
    store: Settings, define: Define, tmp_path: Path
) -> None:
    first, second = planned_pair(define, "70.4", tmp_path / "calls")
    taken = runner.claim(first, "w@host")
    assert taken is not None
    # Meanwhile the re-sender took the attempt for lost and re-queued the job.
    lost = jobstate.Ending(ok=False, lost=True, error="worker lost")
    assert jobstate.record(first, taken.number, lost).retry is not None
    success = jobstate.Ending(ok=True, result={"late": True}, claimed_by=taken.claimed_by)
    released = jobstate.record(first, taken.number, success)
    assert (released.recorded, released.ready, released.finished) == (False, [], False)
    assert job_row(first) == ("queued", 1, ["lost"])
    with transaction() as db:
        dependent = db.get(Job, second)
        assert dependent is not None and dependent.pending_deps == 1
        assert dependent.dispatched_at is None
