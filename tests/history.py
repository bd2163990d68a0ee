"""A known history for the dashboard's tests: patients and studies with
names, descriptions and accession numbers, sessions at each level, and
jobs with set statuses and durations (README, "HTTP API and dashboard").

The session graph comes from the real planner (``trigger``), so its edges
are the ones the phase rules and ``dependsOn`` produce; the rest is written
as rows, so the numbers a test expects are known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from scheduler.ingest import record_instances
from scheduler.sessions import trigger
from scheduler.store.db import transaction
from scheduler.store.models import Job, SchedulingSession, new_id, utcnow

from .conftest import Define

# prep (pre) → every main job; segment → measure → report and segment →
# report (an edge over measure); segment → qc; notify (post) after all.
GRAPH: list[dict[str, Any]] = [
    {"jobName": "prep", "workerEntry": "dcm_testjobs:work", "phase": "pre", "events": "graph"},
    {"jobName": "segment", "workerEntry": "dcm_testjobs:work", "events": "graph"},
    {
        "jobName": "measure",
        "workerEntry": "dcm_testjobs:work",
        "dependsOn": "segment",
        "events": "graph",
    },
    {
        "jobName": "report",
        "workerEntry": "dcm_testjobs:work",
        "dependsOn": ["segment", "measure"],
        "events": "graph",
    },
    {
        "jobName": "qc",
        "workerEntry": "dcm_testjobs:work",
        "dependsOn": "segment",
        "events": "graph",
    },
    {"jobName": "notify", "workerEntry": "dcm_testjobs:work", "phase": "post", "events": "graph"},
]
GRAPH_STATUSES = {
    "prep": "succeeded",
    "segment": "succeeded",
    "measure": "failed",
    "report": "upstream_failed",
    "qc": "succeeded",
    "notify": "succeeded",
}
# Durations in seconds of the "segment" job of service "seg" in the last
# day; one more 40 days ago. p50 = 3, p95 = 4 + 0.8 * (10 - 4) = 8.8.
SEGMENT_RECENT = [(1.0, "succeeded"), (2.0, "succeeded"), (3.0, "failed"), (4.0, "succeeded")]
SEGMENT_SLOWEST = 10.0
SEGMENT_OLD = 100.0


@dataclass
class History:
    now: datetime
    graph: str = ""  # the planned session of GRAPH, study 1.2.7
    sessions: dict[str, str] = field(default_factory=dict)  # label → session id


def record_patients() -> None:
    """Two patients with one study each: 1.2.7 (DOE^JANE, CT THORAX,
    ACC-4711) and 1.2.8 (ROE^RICHARD, MR BRAIN, ACC-0815)."""
    items = []
    for patient, name, study, description, accession in (
        ("PAT-7", "DOE^JANE", "1.2.7", "CT THORAX", "ACC-4711"),
        ("PAT-8", "ROE^RICHARD", "1.2.8", "MR BRAIN", "ACC-0815"),
    ):
        items.append(
            {
                "PatientID": patient,
                "PatientName": name,
                "StudyInstanceUID": study,
                "StudyDescription": description,
                "AccessionNumber": accession,
                "SeriesInstanceUID": f"{study}.1",
                "SOPInstanceUID": f"{study}.1.1",
                "Modality": "CT",
                "location": f"/data/{study}.1.1.dcm",
            }
        )
    with transaction() as db:
        record_instances(db, items)


def add_session(
    db: Any, level: str, uid: str, event: str, status: str, created_at: datetime
) -> str:
    session = SchedulingSession(
        id=new_id(),
        event=event,
        level=level,
        uid=uid,
        trigger=new_id(),
        status=status,
        created_at=created_at,
        planned_at=created_at,
        finished_at=None if status == "running" else created_at + timedelta(minutes=1),
    )
    db.add(session)
    db.flush()
    return session.id


def add_run(
    db: Any,
    job_name: str,
    service: str,
    status: str,
    started_at: datetime,
    seconds: float,
    error: str | None = None,
    version: str = "1.0",
) -> str:
    """One job in a session of its own (study 1.2.9); its session's id."""
    session_id = add_session(db, "study", "1.2.9", "study.stable", status, started_at)
    db.add(
        Job(
            session_id=session_id,
            job_name=job_name,
            service=service,
            service_version=version,
            service_hash="c0ffee" * 4,
            worker_entry="seg:run",
            status=status,
            attempts=1,
            error=error,
            created_at=started_at,
            # Jobs that never ran (upstream_failed, cancelled) have no start.
            started_at=started_at if status in ("succeeded", "failed") else None,
            finished_at=started_at + timedelta(seconds=seconds),
        )
    )
    return session_id


def record_history(define: Define) -> History:
    """The whole history; the process must point at a fresh store."""
    now = utcnow()
    history = History(now=now)
    record_patients()
    define(GRAPH)
    history.graph = trigger("graph", "study", "1.2.7").session_id
    with transaction() as db:
        graph = db.get(SchedulingSession, history.graph)
        assert graph is not None
        graph.status = "partial"
        graph.finished_at = now
        for job in db.scalars(select(Job).where(Job.session_id == history.graph)):
            job.status = GRAPH_STATUSES[job.job_name]
            job.attempts = 1
            job.started_at = now - timedelta(seconds=30)
            job.finished_at = now - timedelta(seconds=20)
            if job.status == "failed":
                job.error = "ValueError: no lungs found\nTraceback (most recent call last): …"
        sessions = history.sessions
        sessions["series"] = add_session(
            db, "series", "1.2.7.1", "series.stable", "succeeded", now - timedelta(hours=2)
        )
        sessions["patient"] = add_session(
            db, "patient", "PAT-8", "patient.stable", "running", now - timedelta(hours=1)
        )
        sessions["mr"] = add_session(
            db, "study", "1.2.8", "study.stable", "failed", now - timedelta(hours=3)
        )
        sessions["old"] = add_session(
            db, "study", "1.2.8", "reprocess", "succeeded", now - timedelta(days=40)
        )
        for n, (seconds, status) in enumerate(SEGMENT_RECENT):
            run = add_run(
                db,
                "segment",
                "seg",
                status,
                now - timedelta(hours=5 - n),
                seconds,
                error="RuntimeError: out of memory\nTraceback …" if status == "failed" else None,
            )
            if status == "failed":
                sessions["failed-run"] = run
        slowest = now - timedelta(minutes=30)
        add_run(db, "segment", "seg", "succeeded", slowest, SEGMENT_SLOWEST, version="1.1")
        add_run(db, "segment", "seg", "failed", now - timedelta(days=40), SEGMENT_OLD)
        add_run(db, "segment", "seg", "upstream_failed", now, 0.0)
    return history
