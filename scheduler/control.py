"""An operator's hand on sessions: retry and cancel.

- :func:`retry_jobs` re-runs failed jobs in their session, with everything
  downstream of them (their ``upstream_failed`` descendants and the post jobs
  that waited for them), keeping each job's earlier attempts in its log.
- :func:`cancel_session` cancels what has not started and stops what runs:
  a running attempt sees its job cancelled at its next heartbeat and is
  killed; a queued message finds its job cancelled and is dropped. (No
  Celery revoke: task ids are job ids, and a revoked id would make workers
  drop the job's messages for hours, retries included.)

The transitions themselves are :mod:`scheduler.jobstate`'s; the CLI and the
HTTP API both call these functions and print the same reports (``as_dict``).
A new session for a resource (``trigger``) is :func:`scheduler.sessions.trigger`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler import jobstate, messages, notifications
from scheduler.queries import NotFoundError, resolve_session_id
from scheduler.registry import Registry, current_registry
from scheduler.store.db import transaction
from scheduler.store.models import Job
from scheduler.vocabulary import JobStatus


class NothingToDoError(ValueError):
    """The request is valid but there is nothing to retry or cancel."""


@dataclass
class RetryReport:
    session_id: str
    requeued: list[str] = field(default_factory=list)  # job names
    dispatched: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def retry_jobs(*, job_id: str | None = None, session_id: str | None = None) -> RetryReport:
    """Re-run one failed job (``job_id``) or every failed job of a session."""
    # Loaded before the session is locked: loading may import services.
    registry = current_registry()
    with transaction() as db:
        if job_id is not None:
            job = db.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            session_id = job.session_id
            jobstate.lock_session(db, session_id)
            db.refresh(job)
            if job.status not in jobstate.RETRYABLE:
                raise NothingToDoError(
                    f"job {job.job_name} is {job.status}; only failed, upstream_failed "
                    "or cancelled jobs are retried"
                )
            # An upstream_failed job can only run again with what made it fail.
            if job.status == JobStatus.UPSTREAM_FAILED:
                seeds = jobstate.failed_ancestors(db, job.id)
            else:
                seeds = [job.id]
            if not seeds:
                raise NothingToDoError(f"job {job.job_name} has no failed job upstream to retry")
        else:
            assert session_id is not None
            session_id = resolve_session_id(db, session_id)
            jobstate.lock_session(db, session_id)
            seeds = list(
                db.scalars(
                    select(Job.id).where(
                        Job.session_id == session_id,
                        Job.status.in_((JobStatus.FAILED, JobStatus.CANCELLED)),
                    )
                )
            )
            if not seeds:
                raise NothingToDoError(f"session {session_id} has no failed job to retry")
        report = RetryReport(session_id)
        reset = jobstate.downstream(db, seeds)
        ready = jobstate.requeue(db, session_id, reset)
        _take_current_code(db, reset, registry)
        report.requeued = list(
            db.scalars(select(Job.job_name).where(Job.id.in_(reset)).order_by(Job.created_seq))
        )
    report.dispatched = messages.send_job_ids(ready)
    return report


def _take_current_code(db: Session, job_ids: set[str], registry: Registry) -> None:
    """A retried job runs the service's code on disk now, which an operator
    may have fixed since the job was planned: its row takes the version and
    content hash of its service as loaded now (README, "Provenance")."""
    for job in db.scalars(select(Job).where(Job.id.in_(job_ids))):
        try:
            definition = registry.job(job.job_name)
        except KeyError:
            continue  # the service is gone or broken: its attempt will say so
        if definition.service == job.service:
            job.service_version = definition.service_version
            job.service_hash = definition.service_hash


@dataclass
class CancelReport:
    session_id: str
    cancelled: list[str] = field(default_factory=list)  # job names not started
    stopped: list[str] = field(default_factory=list)  # job names that were running

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cancel_session(session_id: str) -> CancelReport:
    """Cancel every job of the session that has not ended; stop the running ones."""
    with transaction() as db:
        session_id = resolve_session_id(db, session_id)
        try:
            done = jobstate.cancel(db, session_id)
        except jobstate.SessionEndedError as exc:
            raise NothingToDoError(str(exc)) from exc
    notifications.announce()
    return CancelReport(session_id, done.cancelled, done.stopped)
