"""Cohort runs (README, "Cohort runs"): matching, throttled opening on beat,
low priority behind live work, cancel and retry of a whole cohort, CLI and API."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler import cohorts, sessions
from scheduler.api import create_app
from scheduler.celery_app import app as celery_app
from scheduler.cli import app as cli
from scheduler.cohorts import Criteria
from scheduler.config import Settings
from scheduler.store.db import transaction
from scheduler.store.models import Cohort, SchedulingSession, utcnow
from scheduler.testing import (
    detect_and_send,
    environment_values,
    record_study,
    use_environment,
    using_environment,
)
from scheduler.vocabulary import DEFAULT_CHANNEL, PLANNING_QUEUE

from .conftest import Define
from .test_api import AUTH, TOKEN, eager
from .test_operations import run_json

WORK = "dcm_testjobs:work"
RERUN = [{"jobName": "rerun", "workerEntry": WORK, "events": ["rerun"]}]


@pytest.fixture
def services(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """A fresh store (each backend) whose services listen to ``rerun``."""
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    monkeypatch.setenv("DCM_API_TOKEN", TOKEN)
    settings = use_environment({})
    define(RERUN)
    return settings


def archive() -> None:
    """Five studies: CT head and chest from 2025, a 2024 CT, an MR, a CT without date."""
    record_study("1.1", tags={"StudyDate": "20250310", "StudyDescription": "CT HEAD"})
    record_study("1.2", tags={"StudyDate": "20250601", "StudyDescription": "CT CHEST"})
    record_study("1.3", tags={"StudyDate": "20240105", "StudyDescription": "CT HEAD"})
    record_study("1.4", tags={"StudyDate": "20250702", "Modality": "MR"}, patient="P2")
    record_study("1.5", tags={"BodyPartExamined": "HEAD"}, patient="P2")


def matches(level: str = "study", **given: Any) -> list[str]:
    return [c.uid for c in _all(level, Criteria(**given))]


def _all(level: str, criteria: Criteria) -> list[cohorts.Candidate]:
    with transaction() as db:
        return list(cohorts.matching(db, level, criteria, up_to=cohorts.highest_pk(db, level)))


def cohort_sessions(name: str) -> list[SchedulingSession]:
    with transaction() as db:
        rows = db.scalars(select(SchedulingSession).where(SchedulingSession.cohort == name))
        return sorted(rows, key=lambda s: s.uid)


def test_where_since_until_and_limit_select_the_matching_studies(services: Settings) -> None:
    archive()
    assert matches(where={"Modality": ["CT"]}) == ["1.1", "1.2", "1.3", "1.5"]
    assert matches(where={"Modality": ["CT", "MR"]}) == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert matches(where={"StudyDescription": ["CT H*"]}) == ["1.1", "1.3"]
    assert matches(where={"Modality": ["CT"], "PatientID": ["P2"]}) == ["1.5"]
    # On the study date; a study without one counts on the day it arrived (today).
    assert matches(where={"Modality": ["CT"]}, since="20250101", until="20251231") == [
        "1.1",
        "1.2",
    ]
    assert matches(since="20250101") == ["1.1", "1.2", "1.4", "1.5"]
    assert matches(level="patient", where={"Modality": ["MR"]}) == ["P2"]
    assert matches(level="series", where={"StudyDescription": ["*CHEST"]}) == ["1.2.1"]
    assert cohorts.preview("study", Criteria(since="20250101", limit=2)).as_dict() == {
        "level": "study",
        "count": 2,
        "first": ["1.1", "1.2"],
    }


def test_dry_run_counts_and_opens_nothing(services: Settings) -> None:
    archive()
    found = run_json("trigger", "rerun", "--where", "Modality=CT", "--dry-run")
    assert (found["count"], found["first"], found["dry_run"]) == (
        4,
        ["1.1", "1.2", "1.3", "1.5"],
        True,
    )
    text = CliRunner().invoke(
        cli,
        ["trigger", "rerun", "--where", "Modality=MR", "--dry-run"],
    )
    assert "1 study(s) match; nothing opened" in text.stdout and "1.4" in text.stdout
    with transaction() as db:
        assert db.scalars(select(Cohort)).first() is None
        assert db.scalars(select(SchedulingSession)).first() is None


def test_opening_follows_the_rate_on_beat_ticks(services: Settings) -> None:
    for n in range(12):
        record_study(f"2.{n}")
    start = utcnow()
    started = cohorts.start("rerun", "study", Criteria(limit=12), rate_per_min=30, now=start)
    assert (started["status"], started["total"], started["opened"]) == ("opening", 12, 0)
    name = started["name"]
    assert name.startswith("rerun-")

    tick = cohorts.open_due(now=start + timedelta(seconds=10))
    assert len(tick.opened[name]) == 5  # 30/min for 10 s
    assert cohorts.open_due(now=start + timedelta(seconds=10)).opened == {}
    assert len(cohorts.open_due(now=start + timedelta(seconds=21)).opened[name]) == 5
    assert len(cohorts.open_due(now=start + timedelta(minutes=5)).opened[name]) == 2

    opened = cohort_sessions(name)
    assert [s.uid for s in opened] == sorted(f"2.{n}" for n in range(12))
    assert {(s.event, s.status, s.cohort) for s in opened} == {("rerun", "planning", name)}
    assert len({s.trigger for s in opened}) == 12 and all(s.trigger for s in opened)
    summary = cohorts.summary(name)
    assert (summary["status"], summary["opened"], summary["sessions"]["planning"]) == (
        "opened",
        12,
        12,
    )


def test_a_cohort_opens_no_more_than_a_tick_allows_and_waits_for_its_planners(
    services: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cohorts, "PER_TICK", 3)
    for n in range(5):
        record_study(f"3.{n}")
    started = cohorts.start("rerun", "study", Criteria(limit=5), name="fast")
    assert len(cohorts.open_due().opened["fast"]) == 3
    # Three sessions wait for a planner: nothing more until they are planned.
    assert cohorts.open_due().opened == {}
    for session in cohort_sessions("fast"):
        sessions.plan_session(session.id)
    assert len(cohorts.open_due().opened["fast"]) == 2
    assert started["total"] == cohorts.summary("fast")["opened"] == 5


def test_a_second_beat_opens_nothing_while_the_first_holds_the_lease(
    services: Settings,
) -> None:
    from scheduler import tasks
    from scheduler.leases import lease

    record_study("3.9")
    cohorts.start("rerun", "study", Criteria(limit=1), name="once")
    with lease(cohorts.LEASE, 60) as held:
        assert held
        assert tasks.open_cohorts() == {"opened": {}, "finished": [], "skipped": True}
    assert tasks.open_cohorts() == {"opened": {"once": 1}, "finished": [], "skipped": False}
    assert len(cohort_sessions("once")) == 1


def test_cancel_stops_opening_and_cancels_the_open_sessions(services: Settings) -> None:
    for n in range(4):
        record_study(f"4.{n}")
    start = utcnow()
    cohorts.start(
        "rerun", "study", Criteria(since="20000101"), rate_per_min=60, name="c1", now=start
    )
    cohorts.open_due(now=start + timedelta(seconds=2))
    report = run_json("cancel", "--cohort", "c1")
    assert len(report["sessions"]) == 2 and report["not_opened"] == 2
    assert {s.status for s in cohort_sessions("c1")} == {"cancelled"}
    assert cohorts.open_due(now=start + timedelta(minutes=5)).opened == {}
    assert len(cohort_sessions("c1")) == 2
    summary = cohorts.summary("c1")
    # What was asked for stays in view: 2 of 4 opened, then cancelled.
    assert (summary["status"], summary["opened"], summary["total"]) == ("cancelled", 2, 4)
    again = run_json("cancel", "--cohort", "c1", code=1)
    assert "already ended" in again.output
    assert "no cohort 'nope'" in run_json("cancel", "--cohort", "nope", code=1).output


def test_retry_reruns_the_failed_jobs_of_the_cohort(
    services: Settings, define: Define, tmp_path: Path
) -> None:
    marker = tmp_path / "fixed"
    define([{**RERUN[0], "params": {"fail_until": str(marker)}}])
    for n in range(3):
        record_study(f"5.{n}")
    started = CliRunner().invoke(
        cli, ["trigger", "rerun", "--where", "Modality=CT", "--name", "r1", "--no-wait"]
    )
    assert "cohort r1 (rerun, opening): opened 0/3, ended 0" in started.stdout
    assert "beat has never run" in started.stderr  # the cohort would wait for it
    with eager():
        cohorts.open_due()  # plans and runs inline
    listed = run_json("cohorts")
    assert [(c["name"], c["opened"], c["total"]) for c in listed] == [("r1", 3, 3)]
    assert listed[0]["sessions"]["failed"] == 3 and listed[0]["ended"] == 3

    marker.write_text("fixed")
    with eager():
        report = run_json("retry", "--cohort", "r1")
    assert (len(report["sessions"]), report["jobs"]) == (3, 3)
    assert {s.status for s in cohort_sessions("r1")} == {"succeeded"}
    assert cohorts.open_due().finished == ["r1"]
    [done] = run_json("cohorts")
    assert (done["status"], done["sessions"]["succeeded"], done["sessions"]["failed"]) == (
        "done",
        3,
        0,
    )
    assert "no failed job" in run_json("retry", "--cohort", "r1", code=1).output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--where", "Modality=CT", "--rate", "fast"], "--rate 'fast'"),
        (["--where", "Modality=CT", "--rate", "0/min"], "--rate '0/min'"),
        (["--where", "Colour=red"], "'Colour' is not a stored tag"),
        (["--where", "Modality"], "give FIELD=VALUE"),
        (["--since", "last year"], "--since 'last year'"),
        (["--since", "2025-02-01", "--until", "2025-01-01"], "is after --until"),
        (["--where", "Modality=CT", "--study", "1.1"], "not both"),
        (["--study", "1.1", "--rate", "30/min"], "are for cohorts"),
        (["--where", "Modality=CT", "--name", "a b"], "cohort name 'a b'"),
    ],
)
def test_bad_cohort_requests_exit_2_with_one_line(
    tmp_path: Path, args: list[str], says: str
) -> None:
    with using_environment(environment_values(tmp_path, f"sqlite:///{tmp_path / 's.db'}")):
        result = CliRunner().invoke(cli, ["trigger", "rerun", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output


def test_api_starts_lists_cancels_and_retries_cohorts(services: Settings) -> None:
    archive()
    client = TestClient(create_app())
    body = {"event": "rerun", "where": ["Modality=CT"], "name": "api1", "rate": "2/s"}
    assert client.post("/api/cohorts", json=body).status_code == 401
    dry = client.post("/api/cohorts", json=body | {"dry_run": True}, headers=AUTH)
    assert (dry.status_code, dry.json()["count"]) == (200, 4)
    started = client.post("/api/cohorts", json=body, headers=AUTH)
    assert started.status_code == 201, started.text
    assert (started.json()["name"], started.json()["total"]) == ("api1", 4)
    assert client.post("/api/cohorts", json=body, headers=AUTH).status_code == 409
    bad = client.post("/api/cohorts", json=body | {"rate": "soon", "name": "x"}, headers=AUTH)
    assert bad.status_code == 422 and "'soon'" in bad.json()["detail"]
    assert client.post("/api/cohorts", json={"event": "rerun"}, headers=AUTH).status_code == 422

    [listed] = client.get("/api/cohorts").json()
    assert (listed["name"], listed["status"], listed["opened"]) == ("api1", "opening", 0)
    assert client.post("/api/cohorts/api1/retry", headers=AUTH).status_code == 409
    cancelled = client.post("/api/cohorts/api1/cancel", headers=AUTH)
    assert cancelled.json() == {"cohort": "api1", "sessions": [], "jobs": 0, "not_opened": 4}
    assert client.post("/api/cohorts/api1/cancel", headers=AUTH).status_code == 409
    assert client.post("/api/cohorts/nope/cancel", headers=AUTH).status_code == 404


# -- live work first, on Redis -------------------------------------------------


def consumption_order(queue: str) -> list[str]:
    """The ids (session id for a plan, job id for a job) of the messages
    waiting in ``queue`` on Redis, in the order a worker takes them: the
    priority lists in turn (``queue``, ``queue:1`` … ``queue:9``), each
    oldest first."""
    client = redis.Redis.from_url(celery_app.conf.broker_url)
    order = []
    for key in [queue] + [f"{queue}:{p}" for p in range(1, 10)]:
        for raw in reversed(client.lrange(key, 0, -1)):
            message = json.loads(raw)
            args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            order.append(kwargs.get("session_id") or args[0])
    return order


@pytest.fixture
def on_redis(
    tmp_path: Path, pg_url: str, redis_url: str, define: Define, services_root: Path
) -> Iterator[Settings]:
    """PostgreSQL and Redis, with no worker: messages stay in the broker."""
    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(services_root)
    }
    with using_environment(values) as settings:
        define(RERUN + [{"jobName": "live", "workerEntry": WORK}])
        yield settings


def test_live_plans_and_jobs_go_ahead_of_the_cohort(on_redis: Settings) -> None:
    for n in range(3):
        record_study(f"6.{n}")
    cohorts.start("rerun", "study", Criteria(where={"Modality": ["CT"]}), name="behind")
    [*behind] = cohorts.open_due().opened["behind"]
    record_study("6.live", now=utcnow() - timedelta(seconds=120))
    [live] = detect_and_send()
    # Sent after the cohort's plans, the live plan is taken first.
    assert consumption_order(PLANNING_QUEUE) == [live, *behind]

    first = sessions.plan_session(behind[0])
    planned = sessions.plan_session(live)
    assert first is not None and planned is not None
    assert consumption_order(DEFAULT_CHANNEL) == planned.ready + first.ready
