"""Helpers for tests that run sessions: recording data, waiting for outcomes."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select

from scheduler import detection, messages, queries
from scheduler.ingest import record_instances
from scheduler.store.db import transaction
from scheduler.store.models import SchedulingSession
from scheduler.vocabulary import SESSION_FINAL_STATUSES

T = TypeVar("T")


def record_study(
    study_uid: str,
    instances: int = 2,
    *,
    patient: str = "P1",
    now: datetime | None = None,
    series_uid: str | None = None,
    first: int = 1,
) -> None:
    series_uid = series_uid or f"{study_uid}.1"
    items = [
        {
            "PatientID": patient,
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": f"{series_uid}.{n}",
            "Modality": "CT",
            "location": f"/data/{series_uid}/{n}.dcm",
        }
        for n in range(first, first + instances)
    ]
    with transaction() as db:
        record_instances(db, items, now=now)


def wait_until(check: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll the store until ``check`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def detect_and_send() -> list[str]:
    run = detection.detect()
    messages.send_plans(run.sessions)
    return run.sessions


def session_doc(session_id: str) -> dict[str, Any]:
    with transaction() as db:
        return queries.show_session(db, session_id)


def wait_session(session_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        doc = session_doc(session_id)
        return doc if doc["status"] in SESSION_FINAL_STATUSES else None

    try:
        return wait_until(ended, timeout, f"session {session_id} to end")
    except AssertionError as exc:
        doc = session_doc(session_id)
        jobs = {j["job_name"]: (j["status"], j["error"]) for j in doc["jobs"]}
        raise AssertionError(
            f"{exc}: status {doc['status']}, jobs {jobs}; broker: {broker_state()}"
        ) from None


def broker_state() -> dict[str, Any]:
    """Queue lengths, for a test that waited in vain."""
    from scheduler.celery_app import app

    state: dict[str, Any] = {}
    try:
        with app.connection_for_read() as conn:
            client = conn.default_channel.client
            for key in client.keys("*"):
                kind = client.type(key).decode()
                size = (
                    client.llen(key)
                    if kind == "list"
                    else client.hlen(key)
                    if kind == "hash"
                    else kind
                )
                state[key.decode()] = size
    except Exception as error:  # noqa: BLE001 - diagnostics only
        state["error"] = repr(error)
    return state


def sessions_of(uid: str) -> list[SchedulingSession]:
    with transaction() as db:
        return list(
            db.scalars(
                select(SchedulingSession)
                .where(SchedulingSession.uid == uid)
                .order_by(SchedulingSession.revision)
            )
        )


def jobs_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in doc["jobs"]}
