"""The re-sender: makes a lost message a delay, never a lost job.

Run by beat. It sends again:
- ``scheduler.plan`` for sessions left in ``planning`` (plan message lost);
- jobs that are ``queued`` with no pending dependency but were never
  dispatched (broker down after commit) or not started long after dispatch;
and it ends the attempt of ``running`` jobs whose heartbeat stopped (worker
killed, machine lost) as "lost", which re-queues them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select

from scheduler import jobstate
from scheduler.clock import iso, utcnow
from scheduler.config import Settings, get_settings
from scheduler.jobstate import Ending
from scheduler.messages import send_job_ids, send_plans
from scheduler.store.db import transaction
from scheduler.store.models import Job, Lease, SchedulingSession
from scheduler.vocabulary import JobStatus, SessionStatus

log = logging.getLogger(__name__)

# A message just committed may still be on its way: give it this long.
DISPATCH_GRACE = timedelta(seconds=10)
# A session still planning after this long (or DCM_RESEND_AFTER, if shorter)
# lost its plan message; a duplicate one is harmless (the plan lease).
PLANNING_GRACE = timedelta(seconds=60)


@dataclass
class ResendReport:
    plans: int = 0
    jobs: int = 0
    lost: int = 0


def resend(settings: Settings | None = None, now: datetime | None = None) -> ResendReport:
    settings = settings or get_settings()
    now = now or utcnow()
    report = ResendReport()
    stale_dispatch = now - timedelta(seconds=settings.resend_after)
    silent = now - timedelta(seconds=3 * settings.heartbeat_interval)
    with transaction() as db:
        being_planned = {
            name.removeprefix("plan:")
            for name in db.scalars(
                select(Lease.name).where(Lease.name.startswith("plan:"), Lease.expires_at > now)
            )
        }
        planning = [
            (session_id, cohort)
            for session_id, cohort in db.execute(
                select(SchedulingSession.id, SchedulingSession.cohort).where(
                    SchedulingSession.status == SessionStatus.PLANNING,
                    SchedulingSession.created_at
                    < now - min(PLANNING_GRACE, timedelta(seconds=settings.resend_after)),
                )
            )
            if session_id not in being_planned
        ]
        ready = list(
            db.scalars(
                select(Job.id).where(
                    Job.status == JobStatus.QUEUED,
                    Job.pending_deps == 0,
                    or_(Job.run_after.is_(None), Job.run_after <= now),
                    or_(
                        and_(Job.dispatched_at.is_(None), Job.created_at < now - DISPATCH_GRACE),
                        Job.dispatched_at < stale_dispatch,
                    ),
                )
            )
        )
        lost = db.execute(
            select(Job.id, Job.attempts, Job.worker, Job.heartbeat_at).where(
                Job.status == JobStatus.RUNNING, Job.heartbeat_at < silent
            )
        ).all()
    report.plans = send_plans([s for s, cohort in planning if cohort is None])
    report.plans += send_plans([s for s, cohort in planning if cohort is not None], cohort=True)
    # Jobs of a paused channel or a closed window stay queued (send_jobs).
    report.jobs = send_job_ids(ready, now=now)
    for job_id, attempt, worker, beat in lost:
        log.warning(
            "job %s: its attempt on %s stopped heart-beating (last heartbeat %s); re-queueing",
            job_id,
            worker,
            beat,
        )
        jobstate.end_attempt(
            job_id,
            attempt,
            Ending(
                ok=False,
                lost=True,
                last_heartbeat=beat,
                error=f"worker lost: {worker} stopped heart-beating this attempt "
                f"(last heartbeat {iso(beat) or 'never'})",
            ),
        )
        report.lost += 1
    return report
