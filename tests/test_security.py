"""Security: JSON only, PHI minimisation, no credentials shown, doctor."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler import sessions
from scheduler.beat import renew_beat_lease
from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.store.db import transaction
from scheduler.store.models import Job, SchedulingSession, utcnow
from scheduler.testing import (
    detect_and_send,
    record_study,
    use_environment,
    wait_session,
    wait_until,
)
from workers_bridge.tasks import run_job

from .conftest import Define
from .engine import jobs_by_name

WORK = "dcm_testjobs:work"


def test_a_pickled_message_is_refused_and_runs_nothing(
    live: Settings,
    define: Define,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = tmp_path / "calls"
    define([{"jobName": "target", "workerEntry": WORK, "params": {"calls": str(calls)}}])
    record_study("90.1")
    monkeypatch.setattr(sessions, "send_jobs", lambda *args, **kwargs: 0)  # plan, send nothing
    session_id = sessions.open_session("study", "90.1", "study.stable", manual=False)
    assert session_id is not None
    planned = sessions.plan_session(session_id)
    assert planned is not None
    [job_id] = planned.ready

    caplog.set_level(logging.ERROR)
    # A producer that does not follow our settings: the payload is pickled.
    run_job.apply_async(args=(job_id,), task_id=job_id, queue="default", serializer="pickle")
    wait_until(
        lambda: any(
            "pickle" in r.getMessage()
            or "ContentDisallowed" in r.getMessage()
            or "untrusted content" in r.getMessage()
            for r in caplog.records
        ),
        timeout=30,
        what="the worker to refuse the pickled message",
    )
    with transaction() as db:
        assert db.scalar(select(Job.status).where(Job.id == job_id)) == "queued"
    assert not calls.exists()


def test_header_fields_limit_what_callbacks_workers_and_rows_see(
    live: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_HEADER_FIELDS", "Modality")
    use_environment({})
    define(
        [
            {
                "jobName": "echo",
                "workerEntry": WORK,
                "registryEntry": "dcm_testjobs:inspect",
                "params": {"echo_headers": True},
            }
        ]
    )
    from scheduler.ingest import record_instances

    with transaction() as db:
        record_instances(
            db,
            [
                {
                    "PatientID": "SECRET-ID",
                    "PatientName": "Secret^Name",
                    "PatientBirthDate": "19500101",
                    "StudyInstanceUID": "90.2",
                    "StudyDescription": "private",
                    "SeriesInstanceUID": "90.2.1",
                    "Modality": "MR",
                    "SOPInstanceUID": "90.2.1.1",
                    "location": "/x/1.dcm",
                }
            ],
            now=utcnow() - timedelta(seconds=1),
        )
    [session_id] = detect_and_send()
    doc = wait_session(session_id)
    echoed = jobs_by_name(doc)["echo"]["result"]["headers"]
    with transaction() as db:
        stored = db.scalar(
            select(SchedulingSession.headers).where(SchedulingSession.id == session_id)
        )
        job = db.scalars(select(Job).where(Job.session_id == session_id)).one()
        row = json.dumps([job.params, job.added_params, job.result])
    for document in (json.dumps(echoed), json.dumps(stored)):
        assert "Secret" not in document and "SECRET-ID" not in document
        assert "19500101" not in document and "private" not in document
        assert '"Modality": "MR"' in document
    assert "SECRET-ID" not in row.replace(json.dumps(echoed), "")


def test_credentials_never_appear_in_cli_output(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_DATABASE_URL", "postgresql+psycopg://scheduler:hunter2@127.0.0.1:1/x")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("DCM_ORTHANC_URL", "http://orthanc:hunter2@127.0.0.1:1")
    use_environment({})
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 1
    assert "hunter2" not in result.output
    assert "scheduler:***@127.0.0.1" in result.output
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["store"]["status"] == checks["broker"]["status"] == "problem"
    assert checks["orthanc"]["status"] == "problem"
    assert "hunter2" not in result.stdout


def test_doctor_says_what_is_wrong_and_how_to_fix_it(live: Settings, define: Define) -> None:
    define([{"jobName": "gpu-job", "workerEntry": WORK, "channel": "gpu"}])
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["store"]["status"] == checks["broker"]["status"] == "ok"
    assert checks["services"]["status"] == "ok"
    assert checks["workers"]["status"] == "problem"
    assert "no live worker consumes: gpu" in checks["workers"]["detail"]
    assert "celery -A scheduler worker -Q gpu" in checks["workers"]["fix"]
    assert checks["beat"]["status"] == "problem"  # this test runs no beat
    assert "never run" in checks["beat"]["detail"]
    define([{"jobName": "cpu-job", "workerEntry": WORK}])
    renew_beat_lease()  # what a running beat does every few seconds
    assert CliRunner().invoke(cli, ["doctor"]).exit_code == 0


def test_doctor_warns_where_processes_cannot_die_with_their_parent(
    live: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler import lifeline

    define([{"jobName": "cpu-job", "workerEntry": WORK}])
    renew_beat_lease()
    names = [c["name"] for c in json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).stdout)]
    assert "processes" not in names  # Linux: parent-death signals work

    class Refusing:  # a system-call filter that refuses prctl
        def prctl(self, *args: object) -> int:
            return -1

    for libc in (None, Refusing()):  # a C library without prctl; prctl refused
        monkeypatch.setattr(lifeline, "_libc", libc)
        result = CliRunner().invoke(cli, ["doctor", "--json"])
        processes = {c["name"]: c for c in json.loads(result.stdout)}["processes"]
        assert processes["status"] == "warning" and "SIGKILL" in processes["detail"]
        assert result.exit_code == 0  # a warning, not a problem


def test_doctor_reports_a_beat_that_stopped(live: Settings, define: Define) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from scheduler.store.db import transaction
    from scheduler.store.models import Lease, utcnow

    define([{"jobName": "cpu-job", "workerEntry": WORK}])
    renew_beat_lease()
    with transaction() as db:
        db.execute(update(Lease).values(expires_at=utcnow() - timedelta(seconds=90)))
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 1
    beat = {c["name"]: c for c in json.loads(result.stdout)}["beat"]
    assert beat["status"] == "problem"
    silent = re.search(r"last renewed its lease (\d+)s ago", beat["detail"])
    assert silent is not None and 120 <= int(silent.group(1)) < 150  # expired 90 s + its 30 s


def test_doctor_warns_about_header_fields_no_header_holds(
    live: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    define([{"jobName": "cpu-job", "workerEntry": WORK}])
    renew_beat_lease()

    def header_fields() -> dict[str, Any] | None:
        use_environment({})
        result = CliRunner().invoke(cli, ["doctor", "--json"])
        assert result.exit_code == 0, result.output  # a warning, not a problem
        return {c["name"]: c for c in json.loads(result.stdout)}.get("header_fields")

    assert header_fields() is None  # every field: nothing to check
    monkeypatch.setenv("DCM_HEADER_FIELDS", "StudyDescription,Modality")
    assert header_fields()["status"] == "ok"  # type: ignore[index]
    monkeypatch.setenv("DCM_HEADER_FIELDS", "StudyDescripton,Modality,PixelSpacingX")
    check = header_fields()
    assert check is not None and check["status"] == "warning"
    assert "StudyDescripton, PixelSpacingX" in check["detail"]
    assert "Modality," not in check["detail"].split("which the store does not record")[0]
