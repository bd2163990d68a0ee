"""Celery tasks of the scheduler side; thin shells over the library.

All run on the ``dcm.planning`` queue: ``scheduler.detect`` and
``scheduler.resend`` from beat, ``scheduler.plan`` once per new session,
``scheduler.deliver_webhooks`` after a session ended and from beat,
``scheduler.prune`` hourly from beat when ``DCM_RETENTION`` is set,
``scheduler.open_cohorts`` from beat (the sessions of cohort runs).
"""

from __future__ import annotations

from typing import Any

from scheduler import (
    cohorts,
    detection,
    messages,
    notifications,
    orthanc,
    resender,
    retention,
    sessions,
    webhooks,
)
from scheduler.celery_app import app
from scheduler.config import get_settings
from scheduler.store.db import DRIVER_TRANSIENT, TRANSIENT


@app.task(name="scheduler.detect", ignore_result=True)
def detect() -> dict[str, Any]:
    run = detection.detect()
    messages.send_plans(run.sessions)
    return {"claimed": len(run.claimed), "sessions": run.sessions, "skipped": run.skipped}


@app.task(
    name="scheduler.plan",
    ignore_result=True,
    acks_late=True,
    # Planning is idempotent: while the store is briefly away, try again
    # (on PostgreSQL its statements run on psycopg itself: its errors too).
    autoretry_for=TRANSIENT + DRIVER_TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=20,
)
def plan(session_id: str) -> str | None:
    planned = sessions.plan_session(session_id)
    return planned.status if planned else None


@app.task(name="scheduler.resend", ignore_result=True)
def resend() -> dict[str, int]:
    report = resender.resend()
    return {"plans": report.plans, "jobs": report.jobs, "lost": report.lost}


@app.task(name=notifications.DELIVER, ignore_result=True)
def deliver_webhooks() -> dict[str, int]:
    report = webhooks.deliver_due()
    return {
        "delivered": report.delivered,
        "failed": report.failed,
        "given_up": report.given_up,
    }


@app.task(name="scheduler.open_cohorts", ignore_result=True)
def open_cohorts() -> dict[str, Any]:
    """The next sessions of each cohort run, at its rate (README, "Cohort runs")."""
    tick = cohorts.open_due()
    return {
        "opened": {name: len(ids) for name, ids in tick.opened.items()},
        "finished": tick.finished,
        "skipped": tick.skipped,
    }


@app.task(name="scheduler.follow_orthanc", ignore_result=True)
def follow_orthanc() -> dict[str, object]:
    report = orthanc.follow_changes()
    return {"recorded": report.recorded, "seq": report.seq, "error": report.error}


@app.task(name="scheduler.prune", ignore_result=True)
def prune() -> dict[str, Any]:
    """Retention on beat (README, "Retention"): rows and output folders of
    sessions that ended longer than ``DCM_RETENTION`` ago."""
    age = get_settings().retention
    if age is None:
        return {"skipped": "DCM_RETENTION is not set"}
    try:
        report = retention.prune(age, outputs=True)
    except retention.PruneBusyError:
        return {"skipped": "another prune is running"}
    return report.as_dict()
