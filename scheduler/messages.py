"""The outbox: every message the scheduler sends, and what happens when it cannot.

Two kinds leave for the broker, both addressed by task name, so nothing here
imports the modules that define the tasks: the jobs that became ready
(``workers_bridge.run_job``: task id = job id, queue = channel, the job's
priority, Flower name ``dcm:<jobName>``), sent as one Celery group and
marked dispatched; and the plans of new sessions (``scheduler.plan``).

Messages always follow committed rows. One broker retry policy serves both;
when the broker stays away the rows keep saying what is owed (jobs not
dispatched, sessions still ``planning``) and the re-sender sends them when it
is back (README, "Failure modes"): a failure to send is logged, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import group
from sqlalchemy import select, update

from scheduler.store.db import statements, transaction
from scheduler.store.models import Job, utcnow
from scheduler.vocabulary import JobStatus

log = logging.getLogger(__name__)

RUN_JOB = "workers_bridge.run_job"
PLAN = "scheduler.plan"
# A short retry inside one send: longer outages are the re-sender's.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2}


def app() -> Any:
    from scheduler.celery_app import app as celery_app

    if celery_app.conf.task_always_eager:
        # Eager mode runs tasks here, by name: their modules must be loaded.
        celery_app.loader.import_default_modules()
    return celery_app


@dataclass(frozen=True)
class ReadyJob:
    """What sending a job needs, without loading its row."""

    id: str
    job_name: str
    channel: str
    priority: int
    sort_position: float

    @classmethod
    def of(cls, job_id: str, definition: Any) -> ReadyJob:
        return cls(
            job_id,
            definition.job_name,
            definition.channel,
            definition.priority,
            definition.sort_position,
        )


def broker_priority(priority: int) -> int:
    """Our priority (0-9, higher first) in the broker's terms: Redis runs
    the lowest number first, AMQP the highest."""
    url = str(app().conf.broker_url or "")
    return 9 - priority if url.startswith(("redis", "rediss")) else priority


def job_signature(job: ReadyJob, countdown: float | None = None) -> Any:
    options: dict[str, Any] = {
        "task_id": job.id,
        "queue": job.channel,
        "priority": broker_priority(job.priority),
        "shadow": f"dcm:{job.job_name}",
    }
    if countdown:
        options["countdown"] = countdown
    return app().signature(RUN_JOB, args=(job.id,), **options)


def _left_for_resender(what: str, count: int, error: Exception) -> None:
    log.warning("broker unavailable, %d %s left for the re-sender: %s", count, what, error)


def send_jobs(
    jobs: Sequence[ReadyJob], countdown: float | None = None, *, marked: bool = False
) -> int:
    """Send jobs known to be queued and ready, then mark them dispatched
    (``marked``: the caller marked them already, in the transaction that
    made them ready; a failed send unmarks them); returns how many went out.
    Ordered by priority (higher first), then sortPosition."""
    if not jobs:
        return 0
    ordered = sorted(jobs, key=lambda j: (-j.priority, j.sort_position, j.job_name))
    ids = [j.id for j in jobs]
    try:
        group(job_signature(job, countdown) for job in ordered).apply_async(
            retry=True, retry_policy=RETRY_POLICY
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure: the rows say what is owed
        _left_for_resender("job(s)", len(jobs), exc)
        if marked:
            _mark_dispatched(ids, None)
        return 0
    if not marked:
        _mark_dispatched(ids, utcnow())
    return len(jobs)


def _mark_dispatched(job_ids: list[str], when: datetime | None) -> None:
    try:
        with statements() as db:
            db.execute(update(Job).where(Job.id.in_(job_ids)).values(dispatched_at=when))
    except Exception as exc:  # noqa: BLE001 - left marked, the re-sender still sends them late
        log.warning("could not record the dispatch of %d job(s): %s", len(job_ids), exc)


def send_job_ids(job_ids: Sequence[str], countdown: float | None = None) -> int:
    """:func:`send_jobs` for jobs known by id only (read from the store; those
    no longer queued are left out)."""
    if not job_ids:
        return 0
    with transaction() as db:
        jobs = [
            ReadyJob(*row)
            for row in db.execute(
                select(Job.id, Job.job_name, Job.channel, Job.priority, Job.sort_position).where(
                    Job.id.in_(list(job_ids)), Job.status == JobStatus.QUEUED
                )
            )
        ]
    return send_jobs(jobs, countdown)


def send_plans(session_ids: Sequence[str]) -> int:
    """Send one ``scheduler.plan`` task per session; returns how many went out."""
    if not session_ids:
        return 0
    sent = 0
    celery_app = app()
    try:
        with celery_app.producer_or_acquire() as producer:
            for session_id in session_ids:
                # A signature, not send_task: where the task is known (a
                # worker, eager mode) its own options and routing apply.
                celery_app.signature(PLAN, kwargs={"session_id": session_id}).apply_async(
                    producer=producer, retry=True, retry_policy=RETRY_POLICY
                )
                sent += 1
    except Exception as exc:  # noqa: BLE001 - sessions left in planning are re-planned
        _left_for_resender("plan(s)", len(session_ids) - sent, exc)
    return sent
