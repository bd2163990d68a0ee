"""Recording how an attempt ended and releasing what waits for it (SPEC §9, §10).

All transitions of a session's jobs happen with the session row locked, so
concurrent endings in one session are serialised (PostgreSQL ``SELECT … FOR
UPDATE``; SQLite takes its write lock at ``BEGIN``) while sessions stay
independent. That makes the ``pending_deps`` counter an exact chord counter:
the job whose ending brings a dependent to zero is the one that sends it.

On success every dependent is decremented. On a final failure (or a
cancellation) every job that needs it to succeed, directly or transitively,
becomes ``upstream_failed``; post jobs, which only wait for an end, are
decremented instead, so they still run. When a session's last job ends the
session gets ``succeeded``, ``failed`` (nothing succeeded) or ``partial``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from scheduler.emission import ReadyJob
from scheduler.store.db import rowcount
from scheduler.store.models import (
    JOB_FINAL_STATUSES,
    Job,
    JobDependency,
    SchedulingSession,
    iso,
    utcnow,
)

# A job whose worker vanished (killed, machine lost) is re-run this many
# times beyond its own retries before it is failed: losing a worker is
# rarely the job's fault, but a job that kills every worker must stop.
LOST_WORKER_GRACE = 2


@dataclass
class Ending:
    """How one attempt ended."""

    ok: bool
    result: Any = None
    error: str | None = None
    lost: bool = False
    timed_out: bool = False
    # For a lost attempt: the heartbeat the re-sender saw. A newer one means
    # the attempt is alive after all, and the ending is ignored.
    last_heartbeat: datetime | None = None


@dataclass
class Released:
    """What to send after the transaction commits."""

    ready: list[ReadyJob]
    retry: tuple[str, float] | None = None
    recorded: bool = True


def lock_session(db: Session, session_id: str) -> None:
    db.execute(
        select(SchedulingSession.id).where(SchedulingSession.id == session_id).with_for_update()
    )


def record_ending(
    db: Session, job_id: str, attempt: int, ending: Ending, now: datetime | None = None
) -> Released:
    """Store the ending of ``attempt`` of ``job_id``; see the module docstring.

    An ending for an attempt that is no longer the running one (the job was
    re-queued as lost, or cancelled meanwhile) is ignored.
    """
    now = now or utcnow()
    # Lock the job's session row first (one statement): see the module docstring.
    session_id = db.scalar(
        select(SchedulingSession.id)
        .where(
            SchedulingSession.id == select(Job.session_id).where(Job.id == job_id).scalar_subquery()
        )
        .with_for_update()
    )
    if session_id is None:
        return Released([], recorded=False)
    job = db.execute(
        select(
            Job.status,
            Job.attempts,
            Job.heartbeat_at,
            Job.worker,
            Job.started_at,
            Job.attempt_log,
            Job.max_attempts,
            Job.retries,
            Job.retry_delay_s,
        ).where(Job.id == job_id)
    ).one()
    if job.status != "running" or job.attempts != attempt:
        return Released([], recorded=False)
    if (
        ending.lost
        and ending.last_heartbeat is not None
        and job.heartbeat_at is not None
        and job.heartbeat_at > ending.last_heartbeat
    ):
        return Released([], recorded=False)

    entry = {
        "attempt": attempt,
        "status": _attempt_status(ending),
        "worker": job.worker,
        "started_at": iso(job.started_at),
        "finished_at": iso(now),
        "error": None if ending.ok else _first_line(ending.error),
    }
    changes: dict[str, Any] = {"attempt_log": [*job.attempt_log, entry]}

    if ending.ok:
        changes |= {"status": "succeeded", "result": ending.result, "error": None}
        _update_job(db, job_id, changes | {"finished_at": now})
        ready = release_dependents(db, job_id, succeeded=True, now=now)
        finish_session_if_done(db, session_id, now)
        return Released(ready)

    changes["error"] = ending.error
    budget = job.max_attempts + (LOST_WORKER_GRACE if ending.lost else 0)
    if attempt < budget:
        # Back-off counts the attempts of the current budget: a job retried by
        # an operator starts again from retryDelay.
        first_of_budget = job.max_attempts - job.retries
        delay = 0.0 if ending.lost else job.retry_delay_s * 2 ** max(attempt - first_of_budget, 0)
        # Not dispatched until the message is out: if the broker refuses it,
        # the re-sender sends it once run_after has passed.
        changes |= {
            "status": "queued",
            "run_after": now + timedelta(seconds=delay),
            "dispatched_at": None,
            "heartbeat_at": None,
        }
        _update_job(db, job_id, changes)
        return Released([], retry=(job_id, delay))

    _update_job(db, job_id, changes | {"status": "failed", "finished_at": now})
    ready = release_dependents(db, job_id, succeeded=False, now=now)
    finish_session_if_done(db, session_id, now)
    return Released(ready)


def _update_job(db: Session, job_id: str, changes: dict[str, Any]) -> None:
    db.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )


def _attempt_status(ending: Ending) -> str:
    if ending.ok:
        return "succeeded"
    if ending.lost:
        return "lost"
    return "timeout" if ending.timed_out else "failed"


def _first_line(text: str | None) -> str | None:
    return text.splitlines()[0][:500] if text else text


_SENDING = (Job.id, Job.job_name, Job.channel, Job.priority, Job.sort_position)


def release_dependents(
    db: Session, job_id: str, *, succeeded: bool, now: datetime
) -> list[ReadyJob]:
    """Propagate the end of ``job_id``; returns dependents that became ready,
    with what sending them needs, so the caller sends without reading back."""
    ready: list[ReadyJob] = []
    ended: list[tuple[str, bool]] = [(job_id, succeeded)]
    while ended:
        current, ok = ended.pop()
        if ok:
            # Every dependent waits for this one: one decrement for them all.
            waiting = select(JobDependency.job_id).where(JobDependency.depends_on_id == current)
            ready.extend(_decrement(db, Job.id.in_(waiting)))
            continue
        edges = db.execute(
            select(JobDependency.job_id, JobDependency.requires_success).where(
                JobDependency.depends_on_id == current
            )
        ).all()
        name = ""
        for dependent, requires_success in edges:
            if requires_success:
                name = name or db.scalar(select(Job.job_name).where(Job.id == current)) or ""
                marked = db.execute(
                    update(Job)
                    .where(Job.id == dependent, Job.status == "queued")
                    .values(
                        status="upstream_failed",
                        finished_at=now,
                        error=f"upstream_failed: dependency {name!r} did not succeed",
                    )
                    .execution_options(synchronize_session=False)
                )
                if rowcount(marked):
                    ended.append((dependent, False))
            else:
                ready.extend(_decrement(db, Job.id == dependent))
    return ready


def _decrement(db: Session, which: Any) -> list[ReadyJob]:
    """One dependency of the jobs ``which`` ended; those left waiting for none are ready."""
    rows = db.execute(
        update(Job)
        .where(which)
        .values(pending_deps=Job.pending_deps - 1)
        .returning(Job.pending_deps, Job.status, *_SENDING)
        .execution_options(synchronize_session=False)
    ).all()
    return [
        ReadyJob(row.id, row.job_name, row.channel, row.priority, row.sort_position)
        for row in rows
        if row.pending_deps == 0 and row.status == "queued"
    ]


def finish_session_if_done(db: Session, session_id: str, now: datetime) -> str | None:
    """Give the session its final status once none of its jobs can still run."""
    counts: dict[str, int] = dict(
        db.execute(
            select(Job.status, func.count())
            .where(Job.session_id == session_id)
            .group_by(Job.status)
        ).all()
    )
    if not counts or any(s not in JOB_FINAL_STATUSES for s in counts):
        return None
    if set(counts) == {"succeeded"}:
        final = "succeeded"
    elif "succeeded" not in counts:
        final = "failed"
    else:
        final = "partial"
    done = db.execute(
        update(SchedulingSession)
        .where(SchedulingSession.id == session_id, SchedulingSession.status == "running")
        .values(status=final, finished_at=now)
    )
    return final if rowcount(done) else None
