"""The re-sender (README, "Failure modes"): a lost message is a delay, never a lost job."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from scheduler import resender, sessions
from scheduler.config import Settings
from scheduler.store.db import transaction
from scheduler.store.models import Job, Lease, SchedulingSession, utcnow
from scheduler.testing import environment_values, record_study, using_environment, wait_session
from workers_bridge import runner

from .conftest import Define
from .engine import jobs_by_name
from .support import worker_in_process

WORK = "dcm_testjobs:work"


def one_job_session(define: Define, study_uid: str) -> str:
    """A study with one job to run, and its session opened but not planned."""
    define([{"jobName": "a", "workerEntry": WORK}])
    record_study(study_uid)
    session_id = sessions.open_session("study", study_uid, "study.stable", manual=False)
    assert session_id is not None
    return session_id


def test_jobs_planned_while_the_broker_is_down_are_sent_when_it_is_back(
    tmp_path: Path, pg_url: str, redis_url: str, services_root: Path, define: Define
) -> None:
    define(
        [
            {"jobName": "a", "workerEntry": WORK},
            {"jobName": "b", "workerEntry": WORK, "dependsOn": "a"},
        ]
    )
    values = environment_values(tmp_path, pg_url, "redis://127.0.0.1:1/0") | {
        "DCM_SERVICES_PATH": str(services_root)
    }
    with using_environment(values):
        record_study("20.1")
        session_id = sessions.open_session("study", "20.1", "study.stable", manual=False)
        assert session_id is not None
        planned = sessions.plan_session(session_id)  # the broker refuses: rows stay
        assert planned is not None and planned.ready
        with transaction() as db:
            a = db.scalars(select(Job).where(Job.job_name == "a")).one()
            assert (a.status, a.dispatched_at) == ("queued", None)

    values["CELERY_BROKER_URL"] = redis_url
    with worker_in_process(values, concurrency=2) as settings:
        assert resender.resend(settings).jobs == 0  # just committed: still in its grace time
        report = resender.resend(settings, now=utcnow() + timedelta(seconds=30))
        assert report.jobs == 1
        doc = wait_session(session_id)
    assert doc["status"] == "succeeded"
    assert [j["attempts"] for j in doc["jobs"]] == [1, 1]


def test_a_running_job_whose_worker_went_silent_is_run_again(
    live: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    session_id = one_job_session(define, "20.2")
    # Plan without sending, then take the job as a worker that dies at once.
    monkeypatch.setattr(sessions, "send_jobs", lambda *args, **kwargs: 0)
    planned = sessions.plan_session(session_id)
    assert planned is not None
    job_id = planned.ready[0]
    assert runner.claim(job_id, "ghost@nowhere") is not None
    with transaction() as db:
        db.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )

    report = resender.resend(live)
    assert report.lost == 1
    doc = wait_session(session_id)
    job = jobs_by_name(doc)["a"]
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert job["attempt_log"][0]["status"] == "lost"
    assert "ghost@nowhere stopped heart-beating" in job["attempt_log"][0]["error"]


def test_a_session_whose_plan_message_was_lost_is_planned_again(
    live: Settings, define: Define
) -> None:
    session_id = one_job_session(define, "20.3")  # and no plan task was sent
    assert resender.resend(live).plans == 0
    with transaction() as db:
        db.execute(
            update(SchedulingSession)
            .where(SchedulingSession.id == session_id)
            .values(created_at=utcnow() - timedelta(minutes=5))
        )
    assert resender.resend(live).plans == 1
    assert wait_session(session_id)["status"] == "succeeded"


def test_a_session_being_planned_is_left_alone_and_a_dead_planner_s_lease_lapses(
    live: Settings, define: Define
) -> None:
    from scheduler.leases import acquire
    from scheduler.sessions import lease_name

    session_id = one_job_session(define, "20.4")
    with transaction() as db:
        db.execute(
            update(SchedulingSession)
            .where(SchedulingSession.id == session_id)
            .values(created_at=utcnow() - timedelta(minutes=5))
        )
    assert acquire(lease_name(session_id), ttl=60, holder="planner-elsewhere")
    assert sessions.plan_session(session_id) is None  # someone is planning it
    assert resender.resend(live).plans == 0
    # That planner died: its lease (never renewed) lapses.
    assert acquire(lease_name(session_id), ttl=-1, holder="planner-elsewhere")
    assert resender.resend(live).plans == 1
    assert wait_session(session_id)["status"] == "succeeded"


def test_planning_leaves_no_lease_row_behind(live: Settings, define: Define) -> None:
    from scheduler.sessions import lease_name

    session_id = one_job_session(define, "20.5")
    assert sessions.plan_session(session_id) is not None
    # A second plan message for the same session finds it planned.
    assert sessions.plan_session(session_id) is None
    with transaction() as db:
        names = set(db.scalars(select(Lease.name)))
    assert lease_name(session_id) not in names
    assert wait_session(session_id)["status"] == "succeeded"


def test_a_plan_message_arriving_as_another_planner_finishes_runs_no_callback(
    live: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The status is read after the lease is taken: a planner that has just
    # written the plan (and dropped its lease) is never planned again.
    session_id = one_job_session(define, "20.6")
    real_take_and_read = sessions._take_and_read

    def take_as_the_other_planner_commits(*args: Any) -> Any:
        with transaction() as other:  # the other planner's write transaction
            other.execute(
                update(SchedulingSession)
                .where(SchedulingSession.id == session_id)
                .values(status="running")
            )
        return real_take_and_read(*args)

    computed: list[str] = []
    real_compute = sessions.decide_for
    monkeypatch.setattr(sessions, "_take_and_read", take_as_the_other_planner_commits)
    monkeypatch.setattr(
        sessions,
        "decide_for",
        lambda *a, **k: computed.append(a[1]) or real_compute(*a, **k),  # type: ignore[func-returns-value]
    )
    assert sessions.plan_session(session_id) is None
    assert computed == []  # no callback ran
    with transaction() as db:
        assert db.get(Lease, sessions.lease_name(session_id)) is None


def test_a_plan_whose_session_was_planned_elsewhere_meanwhile_writes_nothing(
    tmp_path: Path,
    store_url: str,
    services_root: Path,
    define: Define,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = environment_values(tmp_path, store_url) | {"DCM_SERVICES_PATH": str(services_root)}
    with using_environment(values):
        session_id = one_job_session(define, "20.7")
        real_decide = sessions.decide_for

        def decide_while_another_planner_writes(*args: Any, **kwargs: Any) -> Any:
            decided = real_decide(*args, **kwargs)
            # The lease lapsed (a planner stalled) and another planner wrote the plan.
            with transaction() as other:
                other.execute(
                    update(SchedulingSession)
                    .where(SchedulingSession.id == session_id)
                    .values(status="running")
                )
            return decided

        monkeypatch.setattr(sessions, "decide_for", decide_while_another_planner_writes)
        assert sessions.plan_session(session_id) is None
        with transaction() as db:
            assert db.scalars(select(Job).where(Job.session_id == session_id)).all() == []
            assert db.get(SchedulingSession, session_id).headers is None  # type: ignore[union-attr]
            assert db.get(Lease, sessions.lease_name(session_id)) is None


def test_a_plan_that_loses_its_postgresql_connection_is_tried_again(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from scheduler import tasks

    calls: list[str] = []

    def plan_session(session_id: str) -> None:
        calls.append(session_id)
        if len(calls) == 1:  # what psycopg itself raises under plans_pg's statements
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(sessions, "plan_session", plan_session)
    result = tasks.plan.apply(args=("s-1",))
    assert result.successful()
    assert calls == ["s-1", "s-1"]
