"""The HTTP API (``serve``; README, "HTTP API and dashboard"): reads, writes, tokens, dcm-processor's push."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from sqlalchemy import select

from scheduler.api import create_app
from scheduler.config import Settings, reset_settings
from scheduler.presence import record_presence
from scheduler.redact import mask
from scheduler.store.db import transaction
from scheduler.store.models import Instance, Job, SchedulingSession, utcnow
from scheduler.testing import record_study, use_environment, using_environment

from .conftest import Define

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SESSION_KEYS = {"id", "event", "level", "uid", "revision", "status", "created_at", "finished_at"}
DAG = [
    {"jobName": "a", "workerEntry": "dcm_testjobs:work", "events": ["study.stable", "reprocess"]},
    {
        "jobName": "b",
        "workerEntry": "dcm_testjobs:work",
        "dependsOn": "a",
        "events": ["study.stable", "reprocess"],
    },
    {
        "jobName": "never",
        "workerEntry": "dcm_testjobs:work",
        "registryEntry": "dcm_testjobs:decline",
        "events": ["study.stable", "reprocess"],
    },
]


@contextmanager
def eager() -> Iterator[None]:
    """Jobs sent while in this block run inline, in this process."""
    from scheduler.celery_app import app

    app.conf.task_always_eager = True
    try:
        yield
    finally:
        app.conf.task_always_eager = False


@pytest.fixture
def client(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    """The API on loopback over a fresh store, with the token configured."""
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    monkeypatch.setenv("DCM_API_TOKEN", TOKEN)
    use_environment({})
    define(DAG)
    return TestClient(create_app())


def trigger(client: TestClient, uid: str, event: str = "reprocess", **extra: Any) -> Any:
    with eager():
        response = client.post(
            "/api/trigger",
            json={"event": event, "level": "study", "uid": uid} | extra,
            headers=AUTH,
        )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def sessions(client: TestClient) -> list[str]:
    """Three finished sessions: 7.1 twice (reprocess, study.stable), 7.2 once."""
    record_study("7.1")
    record_study("7.2")
    return [
        trigger(client, "7.1")["session_id"],
        trigger(client, "7.2")["session_id"],
        trigger(client, "7.1", event="study.stable")["session_id"],
    ]


# -- reads ---------------------------------------------------------------------


def test_openapi_describes_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/services",
        "/api/workers",
        "/api/health",
        "/api/trigger",
        "/api/jobs/{job_id}/retry",
        "/api/sessions/{session_id}/retry",
        "/api/sessions/{session_id}/cancel",
        "/stable-patient",
    } <= set(paths)


def test_sessions_are_listed_newest_first_with_filters_and_pages(
    client: TestClient, sessions: list[str]
) -> None:
    rows = client.get("/api/sessions").json()
    assert [r["id"] for r in rows] == sessions[::-1]
    assert all(set(r) >= SESSION_KEYS for r in rows)
    assert {r["status"] for r in rows} == {"succeeded"}

    def ids(**params: Any) -> list[str]:
        response = client.get("/api/sessions", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()]

    assert ids(uid="7.2") == [sessions[1]]
    assert ids(event="study.stable") == [sessions[2]]
    assert ids(status="succeeded", uid="7.1") == [sessions[2], sessions[0]]
    assert ids(status="failed") == []
    assert ids(limit=1) == [sessions[2]]
    assert ids(limit=1, offset=1) == [sessions[1]]
    assert ids(offset=3) == []
    assert ids(since=(utcnow() + timedelta(minutes=1)).isoformat()) == []
    assert len(ids(since=(utcnow() - timedelta(minutes=5)).isoformat())) == 3


def test_sessions_are_filtered_by_cohort_and_urgency(
    client: TestClient, sessions: list[str]
) -> None:
    with transaction() as db:
        rerun = db.get(SchedulingSession, sessions[0])
        urgent = db.get(SchedulingSession, sessions[1])
        assert rerun is not None and urgent is not None
        rerun.cohort = "ct-rerun"
        urgent.urgent = True

    def ids(**params: Any) -> list[str]:
        response = client.get("/api/sessions", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()]

    assert ids(cohort="ct-rerun") == [sessions[0]]
    assert ids(cohort="other") == []
    assert ids(urgent="true") == [sessions[1]]
    assert ids(urgent="false") == [sessions[2], sessions[0]]
    assert ids(urgent="true", cohort="ct-rerun") == []
    assert client.get("/api/sessions", params={"urgent": "maybe"}).status_code == 422


@pytest.mark.parametrize(
    "query",
    ["status=bogus", "limit=0", "limit=100000", "offset=-1", "since=yesterday"],
)
def test_bad_session_filters_are_422(client: TestClient, query: str) -> None:
    response = client.get(f"/api/sessions?{query}")
    assert response.status_code == 422
    assert response.json()["detail"]


def test_session_document_is_the_show_json(client: TestClient, sessions: list[str]) -> None:
    doc = client.get(f"/api/sessions/{sessions[0]}").json()
    assert set(doc) >= SESSION_KEYS | {"trace", "jobs"}
    assert [j["job_name"] for j in doc["jobs"]] == ["a", "b"]
    assert doc["jobs"][1]["depends_on"] == ["a"]
    assert doc["trace"]["jobs"]["never"]["reason"] == "callback returned False"
    assert client.get(f"/api/sessions/{sessions[0][:8]}").json()["id"] == sessions[0]


@pytest.mark.parametrize(
    "path",
    [
        "/api/sessions?q=%00",
        "/api/sessions?event=a%00b",
        "/api/jobs?service=%00&version=1",
        "/api/sessions/%00",
        "/metrics?x=%00",
    ],
)
def test_a_nul_character_anywhere_is_422_not_a_server_error(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert (response.status_code, response.json()) == (
        422,
        {"detail": "NUL characters are not allowed"},
    )


def test_unknown_ids_are_404_with_a_message(client: TestClient) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    for path in (
        f"/api/sessions/{unknown}",
        f"/api/jobs/{unknown}",
        f"/api/jobs?session_id={unknown}",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "no " in response.json()["detail"]
    for path in (
        f"/api/jobs/{unknown}/retry",
        f"/api/sessions/{unknown}/retry",
        f"/api/sessions/{unknown}/cancel",
    ):
        response = client.post(path, headers=AUTH)
        assert response.status_code == 404, path
        assert unknown in response.json()["detail"]


def test_jobs_are_listed_with_filters_and_pages(client: TestClient, sessions: list[str]) -> None:
    def names(**params: Any) -> list[str]:
        response = client.get("/api/jobs", params=params)
        assert response.status_code == 200, response.text
        return [j["job_name"] for j in response.json()]

    assert names(session_id=sessions[1]) == ["a", "b"]
    assert names(session_id=sessions[1][:8], job_name="b") == ["b"]
    assert names(session_id=sessions[1], limit=1, offset=1) == ["b"]
    assert len(names(status="succeeded")) == 6
    assert names(status="failed") == []
    assert len(names(job_name="a")) == 3
    assert client.get("/api/jobs?status=done").status_code == 422

    job = client.get("/api/jobs", params={"session_id": sessions[1]}).json()[1]
    one = client.get(f"/api/jobs/{job['id']}").json()
    assert one == job
    assert one["status"] == "succeeded" and one["depends_on"] == ["a"] and one["attempts"] == 1


def test_services_show_jobs_and_problems(client: TestClient, define: Define) -> None:
    define([{"jobName": "half", "callback": "x:y"}], name="broken")
    doc = client.get("/api/services").json()
    jobs = {j["job_name"]: j for s in doc["services"] for j in s["jobs"]}
    assert set(jobs) == {"a", "b", "never"}
    assert jobs["b"]["depends_on"] == ["a"]
    assert jobs["never"]["registry_entry"] == "dcm_testjobs:decline"
    assert doc["broken"] == ["broken"]
    assert any("half" in problem for problem in doc["problems"])


def test_workers_show_channels_and_heartbeat_age(client: TestClient) -> None:
    assert client.get("/api/workers").json() == []
    with transaction() as db:
        record_presence(
            db, "celery@gpu-1", ["gpu", "default"], now=utcnow() - timedelta(seconds=90)
        )
    [row] = client.get("/api/workers").json()
    assert row["hostname"] == "celery@gpu-1"
    assert row["channels"] == ["default", "gpu"]
    assert row["last_heartbeat"].endswith("Z")
    assert 89 <= row["age_s"] < 200 and row["live"] is False


def test_health_reports_store_broker_and_services(client: TestClient, define: Define) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    doc = response.json()
    assert doc["ok"] is True and doc["store"]["ok"] is True
    assert doc["broker"]["scheme"] == "filesystem"
    assert doc["services"] == 1 and doc["problems"] == 0

    with using_environment({"CELERY_BROKER_URL": "redis://:hunter2@broker.example:6379/0"}):
        response = client.get("/api/health")
    assert response.json()["broker"] == {
        "scheme": "redis",
        "url": "redis://:***@broker.example:6379/0",
    }
    assert "hunter2" not in response.text


def test_health_is_503_when_the_store_is_unreachable(client: TestClient) -> None:
    url = "postgresql+psycopg://scheduler:hunter2@127.0.0.1:9/store?connect_timeout=2"
    with using_environment({"DCM_DATABASE_URL": url}):
        response = client.get("/api/health")
        listing = client.get("/api/sessions")
    assert response.status_code == 503
    doc = response.json()
    assert doc["ok"] is False and doc["store"]["ok"] is False and doc["store"]["error"]
    assert (
        doc["store"]["url"]
        == "postgresql+psycopg://scheduler:***@127.0.0.1:9/store?connect_timeout=2"
    )
    assert listing.status_code == 503 and "store is unreachable" in listing.json()["detail"]
    assert "hunter2" not in response.text + listing.text


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://guest:pw@rabbit//", "amqp://guest:***@rabbit//"),
        ("redis://h1;redis://:pw@h2", "redis://h1;redis://:***@h2"),
        ("filesystem://", "filesystem://"),
        ("postgresql+psycopg://scheduler@db/store", "postgresql+psycopg://scheduler@db/store"),
        ("redis://:pw@[::1/0", "redis://***@[::1/0"),
        ("sqlite:////tmp/store.db", "sqlite:////tmp/store.db"),
    ],
)
def test_urls_are_shown_without_passwords(url: str, masked: str) -> None:
    assert mask(url) == masked


# -- tokens --------------------------------------------------------------------


def test_writes_need_the_bearer_token(client: TestClient) -> None:
    record_study("7.3")
    body = {"event": "reprocess", "level": "study", "uid": "7.3"}
    missing = client.post("/api/trigger", json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["detail"]
    wrong = client.post("/api/trigger", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "wrong" in wrong.json()["detail"]
    # The token is checked before the body: no hint about what is valid.
    assert client.post("/api/trigger", content=b"{not json").status_code == 401
    with transaction() as db:
        assert db.query(SchedulingSession).count() == 0
    assert TOKEN not in missing.text + wrong.text


def test_without_a_configured_token_writes_are_refused(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DCM_API_TOKEN")
    use_environment({})
    for path in ("/api/trigger", "/api/sessions/x/cancel", "/stable-patient"):
        response = client.post(path, json={}, headers=AUTH)
        assert response.status_code == 403, path
        assert "set DCM_API_TOKEN" in response.json()["detail"]
    assert client.get("/api/sessions").status_code == 200  # loopback reads stay open


def test_off_loopback_reads_need_the_token_too(client: TestClient) -> None:
    public = TestClient(create_app(host="0.0.0.0"))
    assert public.get("/api/sessions").status_code == 401
    assert public.get("/api/services").status_code == 401
    assert public.get("/api/sessions", headers=AUTH).status_code == 200
    # Health answers load balancers, with details only for token holders.
    assert public.get("/api/health").json() == {"ok": True}
    assert public.get("/api/health", headers=AUTH).json()["store"]["ok"] is True
    assert public.get("/").status_code == 200  # the page itself holds no data
    loopback = TestClient(create_app(host="::1"))
    assert loopback.get("/api/sessions").status_code == 200


# -- writes --------------------------------------------------------------------


def test_trigger_plans_a_new_session_and_returns_jobs_and_trace(client: TestClient) -> None:
    record_study("7.4")
    doc = trigger(client, "7.4")
    assert doc["status"] == "running"
    assert doc["jobs"] == ["a", "b"]
    assert doc["trace"]["jobs"]["never"]["scheduled"] is False
    session = client.get(f"/api/sessions/{doc['session_id']}").json()
    assert session["event"] == "reprocess" and session["trigger"]
    assert session["status"] == "succeeded"  # eager: the jobs ran inline
    assert trigger(client, "7.4")["session_id"] != doc["session_id"]  # every trigger is new


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"event": "reprocess", "level": "study", "uid": "9.9.9"}, 404),
        ({"event": "reprocess", "level": "instance", "uid": "7.5"}, 422),
        ({"event": "reprocess", "uid": "7.5"}, 422),
        ({"event": "", "level": "study", "uid": "7.5"}, 422),
        ({"event": "re process", "level": "study", "uid": "7.5"}, 422),
        ({"event": "reprocess", "level": "study", "uid": "7.5", "extra": 1}, 422),
        (["reprocess", "study", "7.5"], 422),
    ],
)
def test_bad_triggers_are_refused_with_a_reason(client: TestClient, body: Any, code: int) -> None:
    record_study("7.5")
    response = client.post("/api/trigger", json=body, headers=AUTH)
    assert response.status_code == code, response.text
    assert response.json()["detail"]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/api/trigger",
        content=b'{"event": "reprocess",',
        headers=AUTH | {"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_retry_of_a_failed_job_and_of_a_session(
    client: TestClient, define: Define, tmp_path: Path
) -> None:
    marker = tmp_path / "fixed"
    define(
        [
            {
                "jobName": "flaky",
                "workerEntry": "dcm_testjobs:work",
                "events": "reprocess",
                "params": {"fail_until": str(marker)},
            },
            {
                "jobName": "after",
                "workerEntry": "dcm_testjobs:work",
                "events": "reprocess",
                "dependsOn": "flaky",
            },
        ]
    )
    record_study("7.6")
    session_id = trigger(client, "7.6")["session_id"]
    doc = client.get(f"/api/sessions/{session_id}").json()
    assert doc["status"] == "failed"
    flaky, after = doc["jobs"]
    assert (flaky["status"], after["status"]) == ("failed", "upstream_failed")
    assert "marker" in flaky["error"]

    with eager():
        response = client.post(f"/api/sessions/{session_id}/retry", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {
        "session_id": session_id,
        "requeued": ["flaky", "after"],
        "dispatched": 1,
    }
    assert client.get(f"/api/sessions/{session_id}").json()["status"] == "failed"  # still broken

    marker.write_text("fixed")
    with eager():
        response = client.post(f"/api/jobs/{flaky['id']}/retry", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["requeued"] == ["flaky", "after"]
    doc = client.get(f"/api/sessions/{session_id}").json()
    assert doc["status"] == "succeeded"
    assert [j["attempts"] for j in doc["jobs"]] == [3, 1]

    again = client.post(f"/api/jobs/{flaky['id']}/retry", headers=AUTH)
    assert again.status_code == 409 and "succeeded" in again.json()["detail"]
    nothing = client.post(f"/api/sessions/{session_id}/retry", headers=AUTH)
    assert nothing.status_code == 409 and "no failed job" in nothing.json()["detail"]


def test_cancel_stops_what_has_not_run_then_is_409(client: TestClient) -> None:
    record_study("7.7")
    # No worker consumes the broker here: the jobs stay queued.
    response = client.post(
        "/api/trigger", json={"event": "reprocess", "level": "study", "uid": "7.7"}, headers=AUTH
    )
    session_id = response.json()["session_id"]
    cancelled = client.post(f"/api/sessions/{session_id[:8]}/cancel", headers=AUTH)
    assert cancelled.status_code == 200
    assert cancelled.json() == {"session_id": session_id, "cancelled": ["a", "b"], "stopped": []}
    doc = client.get(f"/api/sessions/{session_id}").json()
    assert doc["status"] == "cancelled"
    assert {j["status"] for j in doc["jobs"]} == {"cancelled"}
    again = client.post(f"/api/sessions/{session_id}/cancel", headers=AUTH)
    assert again.status_code == 409 and "already ended" in again.json()["detail"]


# -- dcm-processor's POST /stable-patient ----------------------------------------

PATIENT_JOBS = [
    {"jobName": "per-patient", "workerEntry": "dcm_testjobs:work", "events": "patient.stable"},
    {"jobName": "per-study", "workerEntry": "dcm_testjobs:work", "events": "study.stable"},
]


def dicom_copy(sample: str, target: Path, **changes: str) -> pydicom.Dataset:
    """A pydicom sample file copied to ``target``, with some tags changed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = get_testdata_file(sample)
    assert source is not None
    if not changes:
        shutil.copyfile(source, target)
        return pydicom.dcmread(target, stop_before_pixels=True)
    dataset = pydicom.dcmread(source)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.save_as(target)
    return dataset


def orthanc_push(dataset: pydicom.Dataset, patient: str, study: str, series: str) -> dict:
    """The body dcm-processor's Orthanc script sends for one series (Orthanc ids)."""
    return {
        "id": patient,
        "tags": {"PatientID": str(dataset.PatientID), "PatientName": str(dataset.PatientName)},
        "studies": [
            {
                "id": study,
                "tags": {"StudyInstanceUID": str(dataset.StudyInstanceUID)},
                "series": [
                    {
                        "id": series,
                        "tags": {
                            "SeriesInstanceUID": str(dataset.SeriesInstanceUID),
                            "Modality": str(dataset.Modality),
                            "SOPInstanceUID": str(dataset.SOPInstanceUID),
                        },
                    }
                ],
            }
        ],
        "studyIds": [study],
        "seriesIds": [series],
        "dcmpath": f"dicom/{patient}",
    }


@pytest.fixture
def data_root(
    client: TestClient, define: Define, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """dcm-processor's shared DATA folder, where Orthanc writes each series."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("DCM_DATA_ROOT", str(root))
    reset_settings()
    define(PATIENT_JOBS)
    return root


def test_stable_patient_push_records_the_files_and_plans_a_patient_session(
    client: TestClient, data_root: Path
) -> None:
    series_dir = data_root / "dicom" / "orthanc-patient-1" / "orthanc-series-1"
    first = dicom_copy("CT_small.dcm", series_dir / "orthanc-instance-1.dcm")
    dicom_copy(
        "CT_small.dcm",
        series_dir / "orthanc-instance-2.dcm",
        SOPInstanceUID=first.SOPInstanceUID + ".2",
        InstanceNumber="2",
    )
    (series_dir / "notes.txt").write_text("not DICOM")
    body = orthanc_push(first, "orthanc-patient-1", "orthanc-study-1", "orthanc-series-1")

    with eager():
        response = client.post("/stable-patient", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["status"] == "accepted" and doc["created"] is True
    assert doc["patient_id"] == "1CT1" and doc["recorded"] == 2
    assert [db["jobs"] for db in doc["sessions"]] == [["per-patient"]]
    assert [Path(db["location"]).name for db in doc["skipped"]] == ["notes.txt"]

    session = client.get(f"/api/sessions/{doc['session_id']}").json()
    assert (session["event"], session["level"], session["uid"]) == (
        "patient.stable",
        "patient",
        "1CT1",
    )
    assert session["trigger"] is None  # like detection: idempotent per data
    assert session["status"] == "succeeded"
    [job] = session["jobs"]
    assert job["job_name"] == "per-patient" and job["result"]["uid"] == "1CT1"
    assert session["trace"]["jobs"]["per-study"]["scheduled"] is False
    with transaction() as db:
        locations = sorted(db.scalars(select(Instance.location)))
    assert locations == sorted(str(p.resolve()) for p in series_dir.glob("*.dcm"))

    # Orthanc pushing the same data again (a restart, a retry) is the same session.
    again = client.post("/stable-patient", json=body, headers=AUTH).json()
    assert again["session_id"] == doc["session_id"] and again["created"] is False
    assert again["recorded"] == 0 and again["known"] == 2


def test_stable_patient_without_planning_inline_leaves_queued_jobs(
    client: TestClient, data_root: Path
) -> None:
    series_dir = data_root / "dicom" / "p2" / "s2"
    dataset = dicom_copy("MR_small.dcm", series_dir / "i.dcm")
    response = client.post(
        "/stable-patient", json=orthanc_push(dataset, "p2", "st2", "s2"), headers=AUTH
    )
    assert response.status_code == 200, response.text
    with transaction() as db:
        row = db.get(SchedulingSession, response.json()["session_id"])
        assert row is not None and (row.uid, row.status) == ("4MR1", "running")
        jobs = list(db.scalars(select(Job).where(Job.session_id == row.id)))
    assert [(j.job_name, j.status) for j in jobs] == [("per-patient", "queued")]


def test_stable_patient_with_two_patients_plans_one_session_each(
    client: TestClient, data_root: Path
) -> None:
    ct = dicom_copy("CT_small.dcm", data_root / "push" / "ct" / "1.dcm")
    mr = dicom_copy("MR_small.dcm", data_root / "push" / "mr" / "1.dcm")
    body = {"PatientID": "ignored", "dcmPath": str(data_root / "push"), "seriesIds": ["ct", "mr"]}
    doc = client.post("/stable-patient", json=body, headers=AUTH).json()
    assert [s["patient_id"] for s in doc["sessions"]] == [ct.PatientID, mr.PatientID]
    assert len({s["session_id"] for s in doc["sessions"]}) == 2


def test_stable_patient_accepts_listed_instances_and_lenient_keys(
    client: TestClient, data_root: Path
) -> None:
    body = {
        "patient": {"PatientID": "P-LISTED"},
        "Studies": [
            {
                "MainDicomTags": {"StudyInstanceUID": "5.1", "StudyDescription": "head"},
                "series": [
                    {
                        "tags": {"SeriesInstanceUID": "5.1.1", "Modality": "CT"},
                        "instances": [
                            {"SOPInstanceUID": "5.1.1.1", "location": "5.1.1/1.dcm"},
                            {
                                "tags": {"SOPInstanceUID": "5.1.1.2"},
                                "path": f"{data_root}/5.1.1/2.dcm",
                            },
                            {"location": "missing.dcm", "tags": {"SOPInstanceUID": ""}},
                        ],
                    }
                ],
            }
        ],
    }
    response = client.post("/stable-patient", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["patient_id"] == "P-LISTED" and doc["recorded"] == 2
    assert doc["skipped"][0]["location"].endswith("missing.dcm")
    with transaction() as db:
        rows = list(db.scalars(select(Instance).order_by(Instance.sop_uid)))
    assert [(i.sop_uid, i.location) for i in rows] == [
        ("5.1.1.1", f"{data_root.resolve()}/5.1.1/1.dcm"),
        ("5.1.1.2", f"{data_root.resolve()}/5.1.1/2.dcm"),
    ]


def test_stable_patient_accepts_the_token_as_basic_auth_password(
    client: TestClient, data_root: Path
) -> None:
    """dcm-processor's Orthanc builds its URL from SCHEDULER_HOST, which can carry
    credentials (http://dcm:TOKEN@scheduler) but not a bearer header."""
    dataset = dicom_copy("CT_small.dcm", data_root / "dicom" / "p" / "s" / "1.dcm")
    body = orthanc_push(dataset, "p", "st", "s")
    assert client.post("/stable-patient", json=body).status_code == 401
    wrong = base64.b64encode(b"dcm:nope").decode()
    assert (
        client.post(
            "/stable-patient", json=body, headers={"Authorization": f"Basic {wrong}"}
        ).status_code
        == 401
    )
    basic = base64.b64encode(f"dcm:{TOKEN}".encode()).decode()
    response = client.post(
        "/stable-patient", json=body, headers={"Authorization": f"Basic {basic}"}
    )
    assert response.status_code == 200, response.text
    # Elsewhere only the bearer token counts.
    assert (
        client.post(
            "/api/sessions/x/cancel", headers={"Authorization": f"Basic {basic}"}
        ).status_code
        == 401
    )


@pytest.mark.parametrize(
    ("body", "code", "reason"),
    [
        ({"id": "p", "dcmpath": "dicom/nobody", "seriesIds": ["s"]}, 400, "no such file or folder"),
        ({"id": "p", "dcmpath": "../../etc"}, 400, "outside DCM_DATA_ROOT"),
        ({"id": "p", "dcmpath": "/etc"}, 400, "outside DCM_DATA_ROOT"),
        ({"id": "p"}, 400, "nothing to record"),
        ({"id": "p", "studies": [{"series": [{"id": "s"}]}]}, 400, "no dcmpath"),
        ({"id": "p", "studies": "not a list"}, 400, "nothing to record"),
        (["not", "an", "object"], 422, "dict"),
    ],
)
def test_stable_patient_bodies_that_describe_nothing_are_refused(
    client: TestClient, data_root: Path, body: Any, code: int, reason: str
) -> None:
    response = client.post("/stable-patient", json=body, headers=AUTH)
    assert response.status_code == code, response.text
    assert reason in str(response.json())
    with transaction() as db:
        assert db.query(SchedulingSession).count() == 0


def _recorded() -> int:
    with transaction() as db:
        return db.query(Instance).count()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the data root holding one real DICOM file."""
    folder = tmp_path / "elsewhere"
    dicom_copy("CT_small.dcm", folder / "secret.dcm")
    return folder


def test_without_a_data_root_pushes_are_confined_to_the_working_folder(
    client: TestClient,
    define: Define,
    tmp_path: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    work = tmp_path / "work"
    dicom_copy("CT_small.dcm", work / "inside" / "1.dcm")
    monkeypatch.delenv("DCM_DATA_ROOT", raising=False)
    monkeypatch.chdir(work)
    reset_settings()
    define(PATIENT_JOBS)
    for dcmpath in (str(outside), "../elsewhere", f"{work}/../elsewhere"):
        response = client.post(
            "/stable-patient", json={"id": "p", "dcmpath": dcmpath}, headers=AUTH
        )
        assert response.status_code == 400, response.text
        assert "outside DCM_DATA_ROOT" in response.json()["detail"]
        assert dcmpath in caplog.text  # the refusal is logged
    assert _recorded() == 0
    inside = client.post("/stable-patient", json={"id": "p", "dcmpath": "inside"}, headers=AUTH)
    assert inside.status_code == 200, inside.text
    assert _recorded() == 1


def test_a_symlink_leading_out_of_the_data_root_is_refused(
    client: TestClient, data_root: Path, outside: Path
) -> None:
    (data_root / "linked").symlink_to(outside, target_is_directory=True)
    folder = data_root / "mixed"
    dicom_copy("CT_small.dcm", folder / "1.dcm")
    (folder / "2.dcm").symlink_to(outside / "secret.dcm")
    for dcmpath in ("linked", "mixed"):
        response = client.post(
            "/stable-patient", json={"id": "p", "dcmpath": dcmpath}, headers=AUTH
        )
        assert response.status_code == 400, response.text
        assert "outside DCM_DATA_ROOT" in response.json()["detail"]
    assert _recorded() == 0


def test_a_listed_instance_outside_the_data_root_is_refused(
    client: TestClient, data_root: Path, outside: Path
) -> None:
    for instance in (
        {"location": str(outside / "secret.dcm")},  # a file to read
        {"location": f"file://{outside}/secret.dcm"},
        {"SOPInstanceUID": "9.9.9.1", "location": "../elsewhere/secret.dcm"},  # for workers
        {"SOPInstanceUID": "9.9.9.1", "location": f"file://{outside}/secret.dcm"},
        {"SOPInstanceUID": "9.9.9.1", "location": "file:///etc/passwd"},
        {"SOPInstanceUID": "9.9.9.1", "location": "ftp://example.org/x.dcm"},
    ):
        series = {"tags": {"StudyInstanceUID": "9.9", "SeriesInstanceUID": "9.9.9"}}
        body = {"id": "p", "series": [series | {"instances": [instance]}]}
        response = client.post("/stable-patient", json=body, headers=AUTH)
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "outside DCM_DATA_ROOT" in detail or "under the data root" in detail, detail
    assert _recorded() == 0


def test_listed_locations_are_kept_as_http_urls_or_resolved_paths(
    client: TestClient, data_root: Path
) -> None:
    url = "http://orthanc:8042/instances/abc/file"
    instances = [
        {"SOPInstanceUID": "9.9.8.1", "location": f"file://{data_root}/a/1.dcm"},
        {"SOPInstanceUID": "9.9.8.2", "location": url},
    ]
    series = {"tags": {"StudyInstanceUID": "9.9", "SeriesInstanceUID": "9.9.8"}}
    body = {"id": "p", "series": [series | {"instances": instances}]}
    response = client.post("/stable-patient", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    with transaction() as db:
        rows = dict(db.execute(select(Instance.sop_uid, Instance.location)).all())
    assert rows == {"9.9.8.1": f"{data_root.resolve()}/a/1.dcm", "9.9.8.2": url}


def test_paths_that_cannot_be_used_are_400_never_500(
    client: TestClient, data_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (data_root / "loopy").symlink_to(data_root / "loopy")
    for dcmpath in (
        "loopy",  # a symlink to itself
        "dicom\u0000/../../outside",  # a NUL byte
        "a/" * 3000,  # longer than any path
        "x" * 300,  # a longer name than any folder's
        "file:/etc",  # a file: URL, decoded, then outside
        "FILE:///etc",
        "dicom:series",  # a scheme that is no location
    ):
        body = {"id": "p", "dcmpath": dcmpath}
        response = client.post("/stable-patient", json=body, headers=AUTH)
        assert response.status_code == 400, (dcmpath[:40], response.text)
    for location in ("http://a\n/etc/shadow", "HtTp:/\\169.254.169.254/", "file:/etc/shadow"):
        series = {"tags": {"StudyInstanceUID": "9.9", "SeriesInstanceUID": "9.9.7"}}
        instance = {"SOPInstanceUID": "9.9.7.1", "location": location}
        body = {"id": "p", "series": [series | {"instances": [instance]}]}
        response = client.post("/stable-patient", json=body, headers=AUTH)
        assert response.status_code == 400, (location, response.text)
    assert _recorded() == 0
    assert "refused a push" in caplog.text


def test_stable_patient_malformed_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/stable-patient", content=b"{", headers=AUTH | {"Content-Type": "application/json"}
    )
    assert response.status_code == 422


# -- the dashboard's files -------------------------------------------------------


def test_dashboard_is_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    redirect = client.get("/sessions/abc", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/#/sessions/abc"
