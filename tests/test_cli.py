"""The command line (SPEC §11): JSON shapes, exit codes, dry runs."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.store.db import session_scope
from scheduler.store.models import SchedulingSession, utcnow

from .conftest import Define
from .engine import record_study

SESSION_KEYS = {"id", "event", "level", "uid", "revision", "status", "created_at", "finished_at"}
JOB_KEYS = {
    "id",
    "session_id",
    "job_name",
    "service",
    "phase",
    "channel",
    "status",
    "attempts",
    "depends_on",
    "result",
    "error",
    "worker",
    "started_at",
    "finished_at",
}


def run(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result


def run_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


@pytest.fixture
def planned(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A study planned inline (no broker needed) with a small DAG."""
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    from .support import apply_environment

    apply_environment({})
    define(
        [
            {"jobName": "a", "workerEntry": "dcm_testjobs:work"},
            {"jobName": "b", "workerEntry": "dcm_testjobs:work", "dependsOn": "a"},
            {
                "jobName": "never",
                "workerEntry": "dcm_testjobs:work",
                "registryEntry": "dcm_testjobs:decline",
            },
        ]
    )
    record_study("7.1", now=utcnow() - timedelta(seconds=300))
    from scheduler.celery_app import app

    app.conf.task_always_eager = True
    try:
        out = run_json("detect", "--inline")
    finally:
        app.conf.task_always_eager = False
    session_id: str = out["claimed"][0]["session_id"]
    return session_id


def test_sessions_and_jobs_json_have_the_stable_shape(planned: str) -> None:
    sessions = run_json("sessions")
    assert len(sessions) == 1 and set(sessions[0]) >= SESSION_KEYS
    assert sessions[0]["status"] == "succeeded"
    assert sessions[0]["created_at"].endswith("Z")
    jobs = run_json("jobs", "--session", planned)
    assert [j["job_name"] for j in jobs] == ["a", "b"]
    assert all(set(j) >= JOB_KEYS for j in jobs)
    assert jobs[1]["depends_on"] == ["a"]
    assert run_json("jobs", "--status", "failed") == []


def test_show_json_is_the_session_with_trace_and_jobs(planned: str) -> None:
    doc = run_json("show", planned)
    assert set(doc) >= SESSION_KEYS
    assert doc["trace"]["jobs"]["never"] == {
        "service": "testjobs",
        "phase": "main",
        "scheduled": False,
        "reason": "callback returned False",
    }
    assert [j["job_name"] for j in doc["jobs"]] == ["a", "b"]
    assert run_json("show", planned[:8])["id"] == planned  # short ids work


def test_show_draws_the_dag_with_statuses_and_reasons(planned: str) -> None:
    out = run("show", planned).stdout
    assert "succeeded" in out and "never: callback returned False" in out
    rows = [line for line in out.splitlines() if "✔" in line]
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in rows]
    assert [(c[0], c[1], c[-1]) for c in cells] == [("1", "✔ a", ""), ("2", "✔ b", "a")]


def test_unknown_session_is_a_reported_problem(env: Settings) -> None:
    result = run("show", "00000000-0000-0000-0000-000000000000", code=1)
    assert "no session" in result.output


def test_wrong_usage_exits_2(env: Settings) -> None:
    run("plan", code=2)
    run("plan", "--study", "1", "--series", "2", code=2)
    run("sessions", "--bogus", code=2)


def test_plan_dry_run_prints_the_trace_and_writes_nothing(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    from .support import apply_environment

    apply_environment({})
    define([{"jobName": "x", "workerEntry": "dcm_testjobs:work"}])
    record_study("8.1")
    doc = run_json("plan", "--study", "8.1", "--dry-run")
    assert doc["jobs"] == ["x"] and doc["dry_run"] is True
    assert doc["trace"]["jobs"]["x"]["scheduled"] is True
    with session_scope() as s:
        assert s.query(SchedulingSession).count() == 0
    assert "no registryEntry: always scheduled" in run("plan", "--study", "8.1", "--dry-run").stdout


def test_plan_of_an_unknown_study_exits_1(env: Settings) -> None:
    assert "no study '9.9'" in run("plan", "--study", "9.9", "--dry-run", code=1).output


def test_plan_twice_is_a_no_op_the_second_time(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    from scheduler.celery_app import app

    from .support import apply_environment

    apply_environment({})
    define([{"jobName": "x", "workerEntry": "dcm_testjobs:work"}])
    record_study("8.2")
    app.conf.task_always_eager = True
    try:
        first = run_json("plan", "--study", "8.2")
        second = run("plan", "--study", "8.2")
    finally:
        app.conf.task_always_eager = False
    assert first["jobs"] == ["x"]
    assert "already planned" in second.stdout
    with session_scope() as s:
        assert s.query(SchedulingSession).count() == 1


def test_services_validate_exits_1_and_names_the_problem(env: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bad-services" / "broken"
    bad.mkdir(parents=True)
    (bad / "dcm-processor.json").write_text('{"name": "broken", "jobs": [\n  {"jobName": }\n]}')
    result = run("services", "validate", str(tmp_path / "bad-services"), code=1)
    assert "line 2" in result.output
    doc = json.loads(
        run("services", "validate", str(tmp_path / "bad-services"), "--json", code=1).stdout
    )
    assert doc["ok"] is False and doc["problems"]


def test_services_list_shows_jobs(env: Settings) -> None:
    from .support import EXAMPLES, apply_environment

    apply_environment({"DCM_SERVICES_PATH": str(EXAMPLES)})
    doc = run_json("services", "list")
    jobs = {j["job_name"]: j for s in doc["services"] for j in s["jobs"]}
    assert jobs["study-report"]["depends_on"] == ["thumbnails"]
    assert jobs["anonymize"]["phase"] == "pre" and jobs["archive"]["phase"] == "post"
    assert run("services", "validate").exit_code == 0
