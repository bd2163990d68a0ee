"""Retention (README, "Retention"): `prune` removes what ended long ago, and
only that; the beat task does the same when DCM_RETENTION is set."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update
from typer.testing import CliRunner

import celeryconfig
from scheduler import detection, retention, sessions
from scheduler.cli import app as cli
from scheduler.config import ConfigError, Settings, load_settings, parse_age
from scheduler.leases import acquire, new_holder, release, take
from scheduler.presence import record_presence
from scheduler.sessions import lease_name
from scheduler.store.db import transaction
from scheduler.store.models import (
    Instance,
    Job,
    JobDependency,
    Lease,
    Patient,
    SchedulingSession,
    Series,
    Study,
    WebhookDelivery,
    Worker,
    utcnow,
)
from scheduler.testing import NOOP, noop_service, record_study, using_environment

from .engine import sessions_of

DAY = timedelta(days=1)
LONG_AGO = utcnow() - 100 * DAY
JOBS = [
    {"jobName": "convert", "workerEntry": NOOP},
    {"jobName": "report", "workerEntry": NOOP, "dependsOn": "convert"},
]


@pytest.fixture
def store(env: Settings) -> Settings:
    """A store on each backend with a service of two jobs, one needing the other."""
    noop_service(env.services_path[0], JOBS)
    return env


def planned(uid: str, at: datetime, patient: str = "P1", first: int = 1) -> str:
    """A session for study ``uid`` received at ``at``, planned (jobs queued)."""
    record_study(uid, patient=patient, now=at, first=first)
    [session_id] = detection.detect(now=at + timedelta(seconds=61)).sessions
    assert sessions.plan_session(session_id) is not None
    return session_id


def end(session_id: str, at: datetime, status: str = "succeeded") -> str:
    with transaction() as db:
        db.execute(
            update(Job).where(Job.session_id == session_id).values(status=status, finished_at=at)
        )
        db.execute(
            update(SchedulingSession)
            .where(SchedulingSession.id == session_id)
            .values(status=status, finished_at=at)
        )
    return session_id


def ended(uid: str, at: datetime = LONG_AGO, status: str = "succeeded", **kw: Any) -> str:
    return end(planned(uid, at, **kw), at + timedelta(minutes=5), status)


def counts() -> dict[str, int]:
    with transaction() as db:
        return {
            model.__tablename__: db.scalar(select(func.count()).select_from(model)) or 0
            for model in (SchedulingSession, Job, JobDependency, Patient, Study, Series, Instance)
        }


def studies() -> set[str]:
    with transaction() as db:
        return set(db.scalars(select(Study.study_uid)))


def prune_cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(cli, ["prune", *args])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if "--json" in args and code == 0 else result


def test_workers_silent_since_before_the_age_leave_the_list(store: Settings) -> None:
    with transaction() as db:
        record_presence(db, "killed@old-host", ["default"], now=LONG_AGO)
        record_presence(db, "alive@host", ["default"])
    assert prune_cli("--older-than", "90d", "--dry-run", "--json")["workers"] == 1
    assert prune_cli("--older-than", "90d", "--json")["workers"] == 1
    with transaction() as db:
        assert list(db.scalars(select(Worker.hostname))) == ["alive@host"]
    # A live worker stays, however short the age.
    assert prune_cli("--older-than", "1s", "--json")["workers"] == 0
    # One whose row went anyway (silent past the cutoff, then back) beats
    # it back with its channels.
    with transaction() as db:
        db.execute(delete(Worker))
        record_presence(db, "alive@host", None, if_new=["default", "gpu"])
        assert db.scalar(select(Worker.channels)) == {"default": True, "gpu": True}


def test_only_sessions_that_ended_before_the_age_go_with_their_jobs_and_data(
    store: Settings,
) -> None:
    old = [ended("1.1", patient="PA"), ended("1.2", status="failed", patient="PB")]
    recent = ended("1.3", at=utcnow() - DAY)
    # Study 1.4: its first revision ended long ago, its second yesterday.
    ended("1.4")
    second = ended("1.4", at=utcnow() - DAY, first=9)
    running = planned("1.5", LONG_AGO)
    retried = end(planned("1.6", LONG_AGO), LONG_AGO, "failed")
    with transaction() as db:  # a job of a long-ended session is being retried
        db.execute(update(Job).where(Job.session_id == retried).values(status="queued"))
    record_study("1.7", now=LONG_AGO)
    planning = detection.detect().sessions[0]
    with transaction() as db:  # left by a planner that died
        take(db, lease_name(old[0]), 15, new_holder(), now=LONG_AGO)
    before = counts()

    dry = prune_cli("--older-than", "90d", "--dry-run", "--json")
    assert counts() == before  # a dry run deletes nothing
    report = prune_cli("--older-than", "90d", "--json")

    del report["cutoff"], dry["cutoff"]  # each run's own now
    assert report == dry | {"dry_run": False}
    assert {k: report[k] for k in ("sessions", "jobs", "dependencies", "studies")} == {
        "sessions": 3,
        "jobs": 6,
        "dependencies": 3,
        "studies": 2,  # 1.4 keeps its rows for the session of yesterday
    }
    assert (report["series"], report["instances"], report["patients"]) == (2, 4, 2)
    assert report["leases"] == 1
    left = {s.id for n in range(1, 8) for s in sessions_of(f"1.{n}")}
    assert left == {recent, second, running, retried, planning}
    assert not set(old) & left
    assert studies() == {"1.3", "1.4", "1.5", "1.6", "1.7"}
    with transaction() as db:
        assert db.scalar(select(Study.instance_count).where(Study.study_uid == "1.4")) == 4
        assert set(db.scalars(select(Patient.patient_id))) == {"P1"}
        assert db.get(Lease, lease_name(old[0])) is None
        assert set(db.scalars(select(Job.status).where(Job.session_id == running))) == {"queued"}
    assert counts()["jobs"] == before["jobs"] - 6
    # Nothing more is old enough: a second prune finds nothing.
    assert prune_cli("--older-than", "90d", "--json")["sessions"] == 0


def test_rows_other_tables_keep_about_a_session_go_with_it(store: Settings) -> None:
    old, kept = ended("1.8", status="failed"), ended("1.9", at=utcnow() - DAY, status="failed")
    with transaction() as db:
        for session_id in (old, kept):
            db.add(
                WebhookDelivery(
                    session_id=session_id, event="session.failed", sequence=1, url="http://x"
                )
            )
    report = retention.prune(30 * 86400)
    assert (report.sessions, report.other_rows) == (1, {"webhook_outbox": 1})
    with transaction() as db:
        assert list(db.scalars(select(WebhookDelivery.session_id))) == [kept]


def test_the_table_names_what_went(store: Settings) -> None:
    ended("2.1")
    output = prune_cli("--older-than", "2w").output
    assert "ended before" in output and "sessions" in output and "instances" in output
    assert studies() == set()


def test_outputs_go_with_their_sessions_without_following_symlinks(
    store: Settings, tmp_path: Path
) -> None:
    old, linked, kept = ended("3.1"), ended("3.2"), ended("3.3", at=utcnow() - DAY)
    outside = tmp_path / "elsewhere"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "precious.nii").write_bytes(b"x" * 5000)
    job_folder = store.output_dir / old / "convert"
    job_folder.mkdir(parents=True)
    (job_folder / "volume.nii").write_bytes(b"v" * 1000)
    (job_folder / "notes.txt").write_bytes(b"n" * 24)
    os.symlink(outside / "data", job_folder / "shared")  # a link out of the output root
    os.symlink(outside, store.output_dir / linked)  # a session folder that is a link
    (store.output_dir / kept).mkdir()

    dry = prune_cli("--older-than", "30d", "--outputs", "--dry-run", "--json")
    assert (dry["output_folders"], dry["bytes_freed"]) == (2, 1024)
    assert (job_folder / "volume.nii").exists()
    report = prune_cli("--older-than", "30d", "--outputs", "--json")

    assert (report["output_folders"], report["bytes_freed"]) == (2, 1024)
    assert not (store.output_dir / old).exists()
    assert not (store.output_dir / linked).is_symlink()
    assert (outside / "data" / "precious.nii").read_bytes() == b"x" * 5000
    assert (store.output_dir / kept).is_dir()


def test_folders_left_by_a_prune_without_outputs_go_with_a_later_one(store: Settings) -> None:
    old = ended("3.4")
    (store.output_dir / old / "convert").mkdir(parents=True)
    (store.output_dir / old / "convert" / "mask.nii").write_bytes(b"m" * 300)
    report = prune_cli("--older-than", "30d", "--json")
    assert (report["sessions"], report["output_folders"]) == (1, 0)
    assert (store.output_dir / old).is_dir()  # rows only: the folder stays

    fresh, notes = store.output_dir / str(uuid.uuid4()), store.output_dir / "notes"
    fresh.mkdir()  # a session's folder that is not old: left alone
    notes.mkdir()  # not named like a session: not ours
    for folder in (store.output_dir / old, notes):
        os.utime(folder, (LONG_AGO.timestamp(), LONG_AGO.timestamp()))
    report = prune_cli("--older-than", "30d", "--outputs", "--json")
    assert report["sessions"] == 0
    assert (report["output_folders"], report["orphan_folders"], report["bytes_freed"]) == (
        1,
        1,
        300,
    )
    assert not (store.output_dir / old).exists()
    assert fresh.is_dir() and notes.is_dir()


def test_a_study_arriving_again_after_its_prune_is_a_new_session_planned_normally(
    store: Settings,
) -> None:
    first = ended("4.1")
    retention.prune(30 * 86400)
    assert sessions_of("4.1") == [] and studies() == set()

    again = planned("4.1", utcnow() - timedelta(minutes=5))
    [session] = sessions_of("4.1")
    assert (session.id, session.revision, session.status) == (again, 1, "running")
    assert session.id != first
    with transaction() as db:
        names = db.scalars(select(Job.job_name).where(Job.session_id == again))
        assert sorted(names) == ["convert", "report"]
        assert db.scalar(select(Study.instance_count).where(Study.study_uid == "4.1")) == 2


def test_a_patient_keeping_other_studies_is_recounted(store: Settings) -> None:
    ended("5.1", patient="P5")
    ended("5.2", patient="P5", at=utcnow() - DAY)
    report = retention.prune(30 * 86400)
    assert (report.studies, report.patients) == (1, 0)
    with transaction() as db:
        patient = db.scalars(select(Patient).where(Patient.patient_id == "P5")).one()
        assert patient.instance_count == 2
        study = db.scalars(select(Study).where(Study.study_uid == "5.2")).one()
        assert patient.fingerprint == study.fingerprint  # the same two instances


def test_a_study_receiving_again_keeps_its_rows(store: Settings) -> None:
    ended("6.1")
    record_study("6.1", instances=1, first=9)  # late data, not detected yet
    report = retention.prune(30 * 86400)
    assert (report.sessions, report.studies, report.instances) == (1, 0, 0)
    assert studies() == {"6.1"}


def test_one_prune_at_a_time(store: Settings) -> None:
    ended("7.1")
    holder = new_holder()
    assert acquire(retention.PRUNE_LEASE, 60, holder)
    try:
        result = prune_cli("--older-than", "30d", code=1)
        assert "another prune is running" in result.output
    finally:
        release(retention.PRUNE_LEASE, holder)
    assert prune_cli("--older-than", "30d", "--json")["sessions"] == 1


@pytest.mark.parametrize(
    "age", ["soon", "-3d", "90y", "", "2w3", "90", "99999999d", "9" * 22 + "d", "\uff12d"]
)
def test_a_bad_age_is_refused_with_one_line(age: str) -> None:
    result = CliRunner().invoke(cli, ["prune", "--older-than", age])
    assert result.exit_code == 2
    assert "--older-than" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ages_in_every_unit() -> None:
    assert [parse_age(a) for a in ("90d", "12h", "30m", "2w", "45s", "1.5h")] == [
        90 * 86400,
        12 * 3600,
        1800,
        14 * 86400,
        45,
        5400,
    ]


def test_retention_setting_is_checked() -> None:
    assert load_settings({"DCM_RETENTION": "2w"}).retention == 14 * 86400
    assert load_settings({}).retention is None
    # Without a unit, or under an hour: beat would delete outputs on a typo.
    for bad in ("forever", "0", "90", "0.001h", "59m", "99999999d"):
        with pytest.raises(ConfigError, match="DCM_RETENTION"):
            load_settings({"DCM_RETENTION": bad})


def test_beat_prunes_rows_and_outputs_only_when_retention_is_set(
    store: Settings, tmp_path: Path
) -> None:
    unset = celeryconfig.celery_settings(load_settings({}))["beat_schedule"]
    assert "dcm-prune" not in unset
    from scheduler import tasks

    assert tasks.prune() == {"skipped": "DCM_RETENTION is not set"}
    old = ended("8.1")
    (store.output_dir / old).mkdir(parents=True)
    with using_environment({"DCM_RETENTION": "30d"}) as settings:
        entry = celeryconfig.celery_settings(settings)["beat_schedule"]["dcm-prune"]
        assert (entry["task"], entry["schedule"]) == ("scheduler.prune", timedelta(hours=1))
        report = tasks.prune()
    assert (report["sessions"], report["output_folders"]) == (1, 1)
    assert not (store.output_dir / old).exists() and sessions_of("8.1") == []
