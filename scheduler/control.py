"""Manual control of sessions: trigger, retry, cancel (SPEC §11).

- :func:`trigger` plans a new session for a resource with a custom event
  (``reprocess`` …); every trigger is a new session, even for the same data.
- :func:`retry_jobs` re-runs failed jobs in their session, with everything
  downstream of them (their ``upstream_failed`` descendants and the post jobs
  that waited for them), keeping each job's earlier attempts in its log.
- :func:`cancel_session` cancels what has not started and stops what runs:
  a running attempt sees its job cancelled at its next heartbeat and is
  killed; a queued message finds its job cancelled and is dropped. (No
  Celery revoke: task ids are job ids, and a revoked id would make workers
  drop the job's messages for hours, retries included.)

The CLI and the HTTP API both call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scheduler.emission import dispatch
from scheduler.queries import NotFoundError, resolve_session_id
from scheduler.scheduling import Planned, open_session, plan_session
from scheduler.store.db import transaction
from scheduler.store.models import (
    JOB_FINAL_STATUSES,
    Job,
    JobDependency,
    SchedulingSession,
    iso,
    utcnow,
)
from workers_bridge.release import lock_session


class NothingToDoError(ValueError):
    """The request is valid but there is nothing to retry or cancel."""


def trigger(event: str, level: str, uid: str) -> Planned:
    """A new session for ``level``/``uid`` with ``event``, planned now."""
    session_id = open_session(level, uid, event, manual=True)
    assert session_id is not None  # a fresh trigger id never collides
    planned = plan_session(session_id)
    if planned is None:  # pragma: no cover - only if someone else planned it meanwhile
        raise NothingToDoError(f"session {session_id} was planned elsewhere")
    return planned


@dataclass
class RetryReport:
    session_id: str
    requeued: list[str] = field(default_factory=list)  # job names
    dispatched: int = 0


def retry_jobs(*, job_id: str | None = None, session_id: str | None = None) -> RetryReport:
    """Re-run one failed job (``job_id``) or every failed job of a session."""
    with transaction() as db:
        if job_id is not None:
            job = db.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            session_id = job.session_id
            lock_session(db, session_id)
            db.refresh(job)
            if job.status not in ("failed", "cancelled", "upstream_failed"):
                raise NothingToDoError(
                    f"job {job.job_name} is {job.status}; only failed, upstream_failed "
                    "or cancelled jobs are retried"
                )
            # An upstream_failed job can only run again with what made it fail.
            seeds = [job.id] if job.status != "upstream_failed" else _failed_ancestors(db, job.id)
            if not seeds:
                raise NothingToDoError(f"job {job.job_name} has no failed job upstream to retry")
        else:
            assert session_id is not None
            session_id = resolve_session_id(db, session_id)
            lock_session(db, session_id)
            seeds = list(
                db.scalars(
                    select(Job.id).where(
                        Job.session_id == session_id, Job.status.in_(("failed", "cancelled"))
                    )
                )
            )
            if not seeds:
                raise NothingToDoError(f"session {session_id} has no failed job to retry")
        report = RetryReport(session_id)
        reset = _downstream(db, seeds)
        ready = _requeue(db, session_id, reset)
        report.requeued = list(
            db.scalars(select(Job.job_name).where(Job.id.in_(reset)).order_by(Job.created_seq))
        )
        db.execute(
            update(SchedulingSession)
            .where(SchedulingSession.id == session_id)
            .values(status="running", finished_at=None)
        )
    report.dispatched = dispatch(ready)
    return report


def _failed_ancestors(db: Session, job_id: str) -> list[str]:
    """The failed or cancelled jobs an ``upstream_failed`` job depends on, at any depth."""
    found: list[str] = []
    seen = {job_id}
    frontier = [job_id]
    while frontier:
        parents = db.execute(
            select(Job.id, Job.status)
            .join(JobDependency, JobDependency.depends_on_id == Job.id)
            .where(JobDependency.job_id.in_(frontier))
        ).all()
        frontier = []
        for parent, status in parents:
            if parent in seen:
                continue
            seen.add(parent)
            if status in ("failed", "cancelled"):
                found.append(parent)
            elif status == "upstream_failed":
                frontier.append(parent)
    return found


def _downstream(db: Session, seeds: Sequence[str]) -> set[str]:
    """The seeds and every job that depends on them, directly or not."""
    found = set(seeds)
    frontier = list(seeds)
    while frontier:
        children = db.scalars(
            select(JobDependency.job_id).where(JobDependency.depends_on_id.in_(frontier))
        ).all()
        frontier = [c for c in children if c not in found]
        found.update(frontier)
    return found


def _requeue(db: Session, session_id: str, reset: set[str]) -> list[str]:
    """Queue the ``reset`` jobs again with recomputed dependency counters."""
    jobs = {j.id: j for j in db.scalars(select(Job).where(Job.session_id == session_id))}
    edges = db.execute(
        select(JobDependency.job_id, JobDependency.depends_on_id, JobDependency.requires_success)
        .join(Job, Job.id == JobDependency.job_id)
        .where(Job.session_id == session_id)
    ).all()
    pending = dict.fromkeys(reset, 0)
    for job_id, depends_on, requires_success in edges:
        if job_id not in reset:
            continue
        upstream = jobs[depends_on]
        satisfied = depends_on not in reset and (
            upstream.status == "succeeded"
            or (not requires_success and upstream.status in JOB_FINAL_STATUSES)
        )
        if not satisfied:
            pending[job_id] += 1
    for job_id in reset:
        job = jobs[job_id]
        if job.status == "running":
            continue  # it ends on its own; what follows it was counted above
        # Queued ones too: a post job waiting for a retried job must wait
        # for its new run, with a counter recomputed from scratch.
        job.status = "queued"
        job.pending_deps = pending[job_id]
        # A fresh budget of attempts; the log keeps the earlier ones.
        job.max_attempts = job.attempts + job.retries + 1
        job.error = None
        job.result = None
        job.started_at = job.finished_at = job.heartbeat_at = None
        job.run_after = None
        job.dispatched_at = None
    return [j for j in reset if jobs[j].status == "queued" and pending[j] == 0]


@dataclass
class CancelReport:
    session_id: str
    cancelled: list[str] = field(default_factory=list)  # job names not started
    stopped: list[str] = field(default_factory=list)  # job names that were running


def cancel_session(session_id: str) -> CancelReport:
    """Cancel every job of the session that has not ended; stop the running ones."""
    now = utcnow()
    with transaction() as db:
        session_id = resolve_session_id(db, session_id)
        lock_session(db, session_id)
        row = db.get(SchedulingSession, session_id)
        assert row is not None
        open_jobs = list(
            db.scalars(
                select(Job).where(
                    Job.session_id == session_id, Job.status.in_(("queued", "running"))
                )
            )
        )
        if row.status not in ("planning", "running") and not open_jobs:
            raise NothingToDoError(f"session {session_id} has already ended ({row.status})")
        report = CancelReport(session_id)
        for job in open_jobs:
            if job.status == "running":
                report.stopped.append(job.job_name)
                job.attempt_log = [
                    *job.attempt_log,
                    {
                        "attempt": job.attempts,
                        "status": "cancelled",
                        "worker": job.worker,
                        "started_at": iso(job.started_at),
                        "finished_at": iso(now),
                        "error": "cancelled by an operator while running",
                    },
                ]
            else:
                report.cancelled.append(job.job_name)
            job.status = "cancelled"
            job.finished_at = now
            job.error = "cancelled by an operator"
        row.status, row.finished_at = "cancelled", now
    return report
