"""The reads behind the dashboard's pages (README, "HTTP API and dashboard"):
service statistics, the sessions search and the kind of each DAG edge, on
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scheduler.api import create_app
from scheduler.config import Settings
from scheduler.queries import percentile
from scheduler.testing import use_environment

from .conftest import Define
from .history import History, record_history


@pytest.fixture
def history(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> History:
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    use_environment({})
    return record_history(define)


@pytest.fixture
def client(history: History) -> TestClient:
    return TestClient(create_app())


def stats_of(client: TestClient, **params: str) -> dict[tuple[str, str], dict]:
    response = client.get("/api/services/stats", params=params)
    assert response.status_code == 200, response.text
    return {(row["job_name"], row["service"]): row for row in response.json()}


def test_service_stats_count_runs_rates_percentiles_and_the_last_failure(
    client: TestClient, history: History
) -> None:
    day = stats_of(client, since=(history.now - timedelta(hours=24)).isoformat())
    segment = day[("segment", "seg")]
    assert segment == {
        "job_name": "segment",
        "service": "seg",
        "runs": 5,
        "succeeded": 4,
        "failed": 1,
        "success_rate": 0.8,
        "p50_s": 3.0,
        "p95_s": 8.8,
        "last_version": "1.1",
        "last_failure": {
            "finished_at": segment["last_failure"]["finished_at"],
            "session_id": history.sessions["failed-run"],
            "job_id": segment["last_failure"]["job_id"],
            "error": "RuntimeError: out of memory",
        },
    }
    failed_at = history.now - timedelta(hours=3) + timedelta(seconds=3)
    assert segment["last_failure"]["finished_at"].startswith(
        failed_at.strftime("%Y-%m-%dT%H:%M:%S")
    )
    # The same job name in another service is counted apart; a job that never
    # ran (upstream_failed) is no run.
    assert day[("segment", "testjobs")]["runs"] == 1
    assert day[("measure", "testjobs")]["last_failure"]["error"] == "ValueError: no lungs found"
    assert ("report", "testjobs") not in day

    ever = stats_of(client)[("segment", "seg")]
    assert (ever["runs"], ever["failed"], ever["success_rate"]) == (6, 2, 0.6667)
    assert (ever["p50_s"], ever["p95_s"]) == (3.5, 77.5)
    assert ever["last_failure"]["session_id"] == history.sessions["failed-run"]

    assert stats_of(client, since=(history.now + timedelta(hours=1)).isoformat()) == {}
    assert client.get("/api/services/stats", params={"since": "yesterday"}).status_code == 422


def test_percentiles_interpolate_like_percentile_cont() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 10.0], 0.95) == pytest.approx(8.8)


def session_ids(client: TestClient, **params: str) -> set[str]:
    response = client.get("/api/sessions", params=params)
    assert response.status_code == 200, response.text
    return {row["id"] for row in response.json()}


def test_sessions_are_found_by_status_event_and_patient_or_study(
    client: TestClient, history: History
) -> None:
    sessions = history.sessions
    on_jane = {history.graph, sessions["series"]}
    on_richard = {sessions["patient"], sessions["mr"], sessions["old"]}
    assert session_ids(client, q="doe^jane") == on_jane  # patient name, any case
    assert session_ids(client, q="PAT-7") == on_jane  # patient id
    assert session_ids(client, q="thorax") == on_jane  # study description
    assert session_ids(client, q="acc-0815") == on_richard  # accession number
    assert session_ids(client, q="1.2.7") == on_jane  # study UID, and the series' own UID
    assert session_ids(client, q="1.2.7.1") == {sessions["series"]}
    assert session_ids(client, q="%") == set()  # LIKE wildcards are plain characters
    assert session_ids(client, q="richard", status="failed") == {sessions["mr"]}
    assert session_ids(client, q="richard", event="reprocess") == {sessions["old"]}
    assert session_ids(client, status="running", event="patient.stable") == {sessions["patient"]}
    assert session_ids(client, q="nobody") == set()


def test_each_dependency_says_whether_it_was_declared_or_added_by_the_phase_rules(
    client: TestClient, history: History
) -> None:
    jobs = {
        job["job_name"]: job for job in client.get(f"/api/sessions/{history.graph}").json()["jobs"]
    }
    kinds = {
        (dependency["job_name"], name): dependency["kind"]
        for name, job in jobs.items()
        for dependency in job["dependencies"]
    }
    mains = ["segment", "measure", "report", "qc"]
    assert kinds == {
        ("segment", "measure"): "declared",
        ("segment", "report"): "declared",
        ("measure", "report"): "declared",
        ("segment", "qc"): "declared",
        **{("prep", main): "implicit" for main in mains},
        **{(upstream, "notify"): "implicit" for upstream in ["prep", *mains]},
    }
    assert jobs["report"]["depends_on"] == ["prep", "segment", "measure"]
    assert jobs["segment"]["service_version"] and len(jobs["segment"]["service_hash"]) >= 8
