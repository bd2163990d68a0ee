"""Detection (docs/architecture.md, "How it works"): stability, atomic claims, revisions, onNewData."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from scheduler import detection
from scheduler.config import Settings, get_settings
from scheduler.store.db import transaction
from scheduler.store.models import SchedulingSession, Study, utcnow
from scheduler.testing import record_study

from .conftest import Define
from .engine import sessions_of


def test_a_study_is_stable_only_after_stable_age(env: Settings) -> None:
    t0 = utcnow()
    record_study("1.1", now=t0)
    assert detection.detect(now=t0 + timedelta(seconds=59)).claimed == []
    run = detection.detect(now=t0 + timedelta(seconds=61))
    assert [(c.level, c.uid, c.revision, c.event) for c in run.claimed] == [
        ("study", "1.1", 1, "study.stable")
    ]
    with transaction() as db:
        assert db.scalar(select(Study.state)) == "stable"


def test_detecting_twice_creates_exactly_one_session(env: Settings) -> None:
    t0 = utcnow() - timedelta(seconds=120)
    record_study("1.2", now=t0)
    first = detection.detect()
    second = detection.detect()
    assert len(first.sessions) == 1 and second.claimed == []
    assert len(sessions_of("1.2")) == 1


def test_concurrent_claims_without_the_lock_still_make_one_session_per_study(
    env: Settings,
) -> None:
    t0 = utcnow() - timedelta(seconds=120)
    for n in range(30):
        record_study(f"2.{n}", now=t0)
    cutoff = utcnow()
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: detection.claim_level("study", cutoff), range(4)))
    claimed = [c.uid for run in runs for c in run]
    assert sorted(claimed) == sorted(f"2.{n}" for n in range(30))  # each claimed once
    with transaction() as db:
        assert db.scalar(select(func.count()).select_from(SchedulingSession)) == 30


def test_two_detect_processes_at_once_create_one_session_per_study(
    pg_url: str, tmp_path: Path
) -> None:
    from scheduler.testing import environment_values, using_environment

    values = environment_values(tmp_path, pg_url) | {"DCM_STABLE_AGE": "0"}
    with using_environment(values):
        t0 = utcnow() - timedelta(seconds=5)
        for n in range(40):
            record_study(f"3.{n}", now=t0)
        child_env = dict(os.environ)
        command = [sys.executable, "-m", "scheduler.cli", "detect", "--json"]
        processes = [
            subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [json.loads(p.communicate(timeout=120)[0]) for p in processes]
        assert all(p.returncode == 0 for p in processes)
        claimed = [c["uid"] for out in outputs for c in out["claimed"]]
        assert sorted(claimed) == sorted(f"3.{n}" for n in range(40))
        with transaction() as db:
            assert db.scalar(select(func.count()).select_from(SchedulingSession)) == 40


def test_a_late_instance_gives_a_new_revision(env: Settings) -> None:
    t0 = utcnow() - timedelta(seconds=300)
    record_study("4.1", now=t0)
    detection.detect()
    record_study("4.1", instances=1, first=10, now=t0 + timedelta(seconds=100))
    with transaction() as db:
        assert db.scalar(select(Study.state)) == "receiving"
    run = detection.detect()
    assert [(c.uid, c.revision) for c in run.claimed] == [("4.1", 2)]
    revisions = [(db.revision, db.fingerprint) for db in sessions_of("4.1")]
    assert [r for r, _ in revisions] == [1, 2]
    assert revisions[0][1] != revisions[1][1]


def test_detection_covers_each_configured_level(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_DETECT_LEVELS", "series,study,patient")
    from scheduler.config import reset_settings

    reset_settings()
    record_study("5.1", now=utcnow() - timedelta(seconds=120), patient="P5")
    events = sorted(c.event for c in detection.detect(get_settings()).claimed)
    assert events == ["patient.stable", "series.stable", "study.stable"]
    reset_settings()


def test_detection_runs_never_overlap(env: Settings) -> None:
    from scheduler.leases import lease

    record_study("6.1", now=utcnow() - timedelta(seconds=120))
    with lease("detect", 60) as held:
        assert held
        blocked = detection.detect()
    assert blocked.skipped and blocked.claimed == []
    assert len(detection.detect().claimed) == 1  # released: the next run goes ahead


def test_on_new_data_ignore_job_is_absent_in_revision_two(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler import sessions
    from scheduler.celery_app import app
    from scheduler.testing import use_environment

    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    use_environment({})
    define(
        [
            {"jobName": "first-only", "workerEntry": "dcm_testjobs:work", "onNewData": "ignore"},
            {"jobName": "every-time", "workerEntry": "dcm_testjobs:work"},
        ]
    )
    t0 = utcnow() - timedelta(seconds=600)
    record_study("6.2", now=t0)
    app.conf.task_always_eager = True
    try:
        first = [sessions.plan_session(s) for s in detection.detect().sessions]
        record_study("6.2", instances=1, first=9, now=t0 + timedelta(seconds=100))
        second = [sessions.plan_session(s) for s in detection.detect().sessions]
    finally:
        app.conf.task_always_eager = False
    assert [sorted(p.plan.job_names) for p in first if p] == [["every-time", "first-only"]]
    assert [p.plan.job_names for p in second if p] == [["every-time"]]
    assert "revision 2" in second[0].plan.trace["jobs"]["first-only"]["reason"]  # type: ignore[union-attr]


def test_a_session_holds_exactly_the_instances_its_fingerprint_covers(env: Settings) -> None:
    from scheduler import sessions
    from scheduler.ingest import fingerprint

    t0 = utcnow() - timedelta(seconds=120)
    record_study("1.30", instances=2, now=t0)
    [session_id] = detection.detect().sessions
    # An instance arriving between detection and planning ...
    record_study("1.30", instances=1, first=3, now=t0 + timedelta(seconds=1))
    planned = sessions.plan_session(session_id)
    assert planned is not None
    sops = [i["SOPInstanceUID"] for s in planned.headers["series"] for i in s["instances"]]
    assert planned.headers["instance_count"] == 2 and len(sops) == 2
    [session] = sessions_of("1.30")
    assert fingerprint(sops) == session.fingerprint
    # ... belongs to the next revision, and only there once more.
    [second_id] = detection.detect().sessions
    second = sessions.plan_session(second_id)
    assert second is not None and second.headers["instance_count"] == 3
    assert [s.revision for s in sessions_of("1.30")] == [1, 2]
