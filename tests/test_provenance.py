"""Which code produced a result (README, "Provenance"): every job keeps the
version and content hash of its service, the interpreter and the output
folder of its attempt; ``jobs --service NAME --version V`` and the API find
what one version ran."""

from __future__ import annotations

import json
import platform
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scheduler import entry
from scheduler.api import create_app
from scheduler.config import Settings
from scheduler.store.models import utcnow
from scheduler.testing import detect_and_send, record_study, wait_session, write_service

from .conftest import Define
from .engine import jobs_by_name
from .test_cli import run, run_json

SERVICE = "testjobs"
ENTRY = "dcm_testjobs:work"


def run_version(services_root: Path, version: str, uid: str) -> dict:
    """Plan and run one study with ``version`` of the service loaded."""
    write_service(services_root, [{"jobName": "segment", "workerEntry": ENTRY}], SERVICE, version)
    record_study(uid, now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    session = wait_session(session_id)
    assert session["status"] == "succeeded", session
    return jobs_by_name(session)["segment"]


@pytest.fixture
def two_versions(live: Settings, define: Define, services_root: Path) -> tuple[dict, dict]:
    """The same job run by version 1.0, then by version 2.0 of its service."""
    return run_version(services_root, "1.0", "60.1"), run_version(services_root, "2.0", "60.2")


def test_a_job_records_the_code_interpreter_and_folder_that_produced_its_output(
    two_versions: tuple[dict, dict], live: Settings
) -> None:
    old, new = two_versions
    assert (old["service"], old["service_version"], new["service_version"]) == (
        SERVICE,
        "1.0",
        "2.0",
    )
    assert len(old["service_hash"]) == 64
    # The definition changed with the version: so did the content hash.
    assert old["service_hash"] != new["service_hash"]
    assert old["interpreter"] == f"{platform.python_version()} {sys.executable}"
    assert old["output_dir"] == str(live.output_dir / old["session_id"] / "segment")
    assert Path(old["output_dir"]).is_dir()
    assert old["attempt_log"][-1]["output_dir"] == old["output_dir"]


def test_jobs_of_a_recalled_version_are_found_by_cli_fast_path_and_api(
    two_versions: tuple[dict, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = two_versions
    found = run_json("jobs", "--service", SERVICE, "--version", "1.0")
    assert [job["id"] for job in found] == [old["id"]]
    assert found[0]["output_dir"] == old["output_dir"]
    assert {job["id"] for job in run_json("jobs", "--service", SERVICE)} == {
        old["id"],
        new["id"],
    }
    assert run_json("jobs", "--service", SERVICE, "--version", "9.9") == []

    args = entry._parsed(["jobs", "--service", SERVICE, "--version", "2.0", "--json"])
    assert args is not None
    assert entry.answer(args) == 0
    assert [job["id"] for job in json.loads(capsys.readouterr().out)] == [new["id"]]

    table = run("jobs", "--service", SERVICE, "--version", "1.0").stdout
    assert old["id"][:8] in table and new["id"][:8] not in table
    assert old["service_hash"][:12] in table

    with TestClient(create_app()) as client:
        response = client.get("/api/jobs", params={"service": SERVICE, "version": "2.0"})
        assert response.status_code == 200
        assert [job["id"] for job in response.json()] == [new["id"]]
        assert client.get("/api/jobs", params={"version": "2.0"}).status_code == 422


def test_show_says_which_code_ran_each_job(two_versions: tuple[dict, dict]) -> None:
    old, _new = two_versions
    out = run("show", old["session_id"]).stdout
    assert f"code: {SERVICE} 1.0 hash {old['service_hash'][:12]}" in out
    assert f"python {platform.python_version()} {sys.executable}" in out


def test_a_version_without_its_service_is_wrong_usage(env: Settings) -> None:
    out = run("jobs", "--version", "1.0", code=2).output
    assert "--version needs --service" in out
    assert entry._parsed(["jobs", "--version", "1.0", "--json"]) is None


def test_a_retry_after_a_fix_records_the_code_that_ran_it(
    live: Settings, define: Define, services_root: Path, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    jobs = [{"jobName": "segment", "workerEntry": ENTRY, "params": {"fail_until": str(fixed)}}]
    write_service(services_root, jobs, SERVICE, "1.0")
    record_study("60.3", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    failed = jobs_by_name(wait_session(session_id))["segment"]
    assert (failed["status"], failed["service_version"]) == ("failed", "1.0")

    # The operator fixes the service (a new version) and retries the session.
    fixed.touch()
    write_service(services_root, jobs, SERVICE, "1.1")
    run("retry", "--session", session_id)
    retried = jobs_by_name(wait_session(session_id))["segment"]
    assert (retried["status"], retried["service_version"]) == ("succeeded", "1.1")
    assert retried["service_hash"] != failed["service_hash"]
    assert [job["id"] for job in run_json("jobs", "--service", SERVICE, "--version", "1.1")] == [
        retried["id"]
    ]


def test_a_mistyped_version_names_the_versions_that_ran(two_versions: tuple[dict, dict]) -> None:
    out = run("jobs", "--service", SERVICE, "--version", "2.0.0", code=1).output
    assert f"no jobs of service {SERVICE!r} at version '2.0.0'; versions with jobs: 1.0, 2.0" in (
        " ".join(out.split())
    )
    unknown = run("jobs", "--service", "segmentaton", code=1).output
    assert "no job of that service was ever planned" in " ".join(unknown.split())
    # A script reading JSON gets the empty list.
    assert run_json("jobs", "--service", SERVICE, "--version", "2.0.0") == []
