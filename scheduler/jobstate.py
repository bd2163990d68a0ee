"""Every transition of a job and of its session, in one place.

A job is ``queued`` until a worker claims it (``running``), and each attempt
ends as ``succeeded``, as a retry (``queued`` again after a back-off), or
for good as ``failed``; jobs that needed it to succeed become
``upstream_failed``; an operator can ``cancel`` what has not ended and
``requeue`` what failed. Each ended attempt leaves an entry in the job's
``attempt_log``.

All transitions of a session's jobs happen with the session row locked
(PostgreSQL ``SELECT … FOR UPDATE``; SQLite takes its write lock at
``BEGIN``), so concurrent endings in one session are serialised while
sessions stay independent. That makes ``pending_deps`` an exact chord
counter: the job whose ending brings a dependent to zero is the one that
sends it, after the ending is committed (docs/architecture.md, "Where each
guarantee is kept"). When a session's last job ends, the session gets
``succeeded``, ``failed`` (nothing succeeded) or ``partial``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from scheduler import messages, notifications
from scheduler.clock import iso, utcnow
from scheduler.messages import NORMAL, ReadyJob, SessionFlags
from scheduler.store.db import Executor, bound, on_psycopg, rowcount, statements
from scheduler.store.models import Job, JobDependency, PausedChannel, SchedulingSession
from scheduler.vocabulary import (
    JOB_FINAL_STATUSES,
    AttemptStatus,
    JobStatus,
    Phase,
    SessionStatus,
)

log = logging.getLogger(__name__)

# A job whose worker or process vanished (killed, out of memory, machine
# lost) is re-run this many times beyond its own retries before it fails:
# losing a worker is rarely the job's fault, but a job that kills every
# worker must stop.
LOST_WORKER_GRACE = 2
# Tolerated difference between the clocks of the machine that set a retry's
# run_after and the worker that receives the delayed message.
CLOCK_SKEW = timedelta(seconds=5)


def lock_session(db: Session, session_id: str) -> None:
    db.execute(
        select(SchedulingSession.id).where(SchedulingSession.id == session_id).with_for_update()
    )


def attempt_entry(
    attempt: int,
    status: AttemptStatus,
    worker: str | None,
    started_at: datetime | None,
    finished_at: datetime,
    error: str | None,
) -> dict[str, Any]:
    """One ``attempt_log`` entry: an error keeps its first line only."""
    return {
        "attempt": attempt,
        "status": str(status),
        "worker": worker,
        "started_at": iso(started_at),
        "finished_at": iso(finished_at),
        "error": error.splitlines()[0][:500] if error else error,
    }


# The doubling of retry delays stops here (or at ``retryDelay`` when longer).
LONGEST_BACK_OFF_S = 7 * 86400.0


def retry_delay(retry_delay_s: float, attempt: int, max_attempts: int, retries: int) -> float:
    """Seconds before the next attempt: ``retryDelay``, doubling for each
    further retry of the current budget (a job re-queued by an operator
    starts again from ``retryDelay``), up to a week (README, "Writing a service")."""
    first_of_budget = max_attempts - retries
    doublings = min(max(attempt - first_of_budget, 0), 64)
    return min(retry_delay_s * 2.0**doublings, max(retry_delay_s, LONGEST_BACK_OFF_S))


# --------------------------------------------------------------------------
# Claim and heartbeat


class ClaimedBy(NamedTuple):
    """What a claim wrote: the job's session, the worker and the start."""

    session_id: str
    worker: str
    started_at: datetime


@dataclass
class Claimed:
    """A job just claimed, with what its worker call needs from the store."""

    job_id: str
    session_id: str
    job_name: str
    phase: str
    channel: str
    attempt: int
    worker_entry: str
    entry_root: str
    params: dict[str, Any]
    timeout_s: float
    python: str | None
    event: str
    level: str
    uid: str
    revision: int
    headers: dict[str, Any]
    added_params: dict[str, Any]
    worker: str  # the claim's hostname and time
    started_at: datetime
    # jobName -> result of each dependency
    results: dict[str, Any] = field(default_factory=dict)
    # For a post job: jobName -> status of every other job of the session.
    outcomes: dict[str, str] | None = None

    @property
    def by(self) -> ClaimedBy:
        return ClaimedBy(self.session_id, self.worker, self.started_at)


_CLAIM_RETURNS = (
    Job.session_id,
    Job.job_name,
    Job.phase,
    Job.channel,
    Job.attempts,
    Job.worker_entry,
    Job.entry_root,
    Job.params,
    Job.timeout_s,
    Job.python,
)
_SESSION_READS = (
    SchedulingSession.event,
    SchedulingSession.level,
    SchedulingSession.uid,
    SchedulingSession.revision,
    SchedulingSession.headers,
    SchedulingSession.added_params,
)


# The claim's statements, built once: each job runs them, and building a
# statement costs more than SQLAlchemy's cached compilation of it.
_TAKING = (
    update(Job)
    .where(
        Job.id == bindparam("job_id"),
        Job.status == JobStatus.QUEUED,
        # A duplicate message must not skip dependencies or back-off.
        Job.pending_deps == 0,
        or_(Job.run_after.is_(None), Job.run_after <= bound("due", Job.run_after)),
        # A message sent before its channel was paused runs after the resume.
        ~select(PausedChannel.channel).where(PausedChannel.channel == Job.channel).exists(),
    )
    .values(
        status=JobStatus.RUNNING,
        attempts=Job.attempts + 1,
        started_at=bound("now", Job.started_at),
        heartbeat_at=bound("now", Job.heartbeat_at),
        finished_at=None,
        worker=bindparam("hostname"),
        worker_pid=bindparam("pid"),
    )
)
_CLAIM = _TAKING.returning(*_CLAIM_RETURNS)
_SESSION_OF_CLAIM = select(*_SESSION_READS).where(SchedulingSession.id == bindparam("session_id"))
_DEPENDENCY_RESULTS = (
    select(Job.job_name, Job.result)
    .join(JobDependency, JobDependency.depends_on_id == Job.id)
    .where(JobDependency.job_id == bindparam("job_id"))
)


# A job refused because its channel is paused is owed a message again:
# ``resume`` (and the re-sender, after it) sends what is not dispatched.
_UNDISPATCH_IF_PAUSED = (
    update(Job)
    .where(
        Job.id == bindparam("job_id"),
        Job.status == JobStatus.QUEUED,
        select(PausedChannel.channel).where(PausedChannel.channel == Job.channel).exists(),
    )
    .values(dispatched_at=None)
)


def _left_for_resume(db: Executor, job_id: str) -> None:
    """A claim refused: if the job's channel is paused, it is owed a message."""
    if rowcount(db.execute(_UNDISPATCH_IF_PAUSED, {"job_id": job_id})):
        log.info("job %s: its channel is paused; left queued until it is resumed", job_id)


def claim(db: Executor, job_id: str, hostname: str, now: datetime) -> Claimed | None:
    """``queued`` → ``running`` for this worker, if the job is ready; None for
    a duplicate delivery, a job not ready yet, one that ended, or one of a
    paused channel (left queued, not dispatched)."""
    if on_psycopg(db):
        from scheduler.store import jobs_pg

        found = jobs_pg.claim(db, job_id, hostname, os.getpid(), now, now + CLOCK_SKEW)
        if found is None:
            _left_for_resume(db, job_id)
            return None
    else:
        values = {
            "job_id": job_id,
            "due": now + CLOCK_SKEW,
            "now": now,
            "hostname": hostname,
            "pid": os.getpid(),
        }
        taken = db.execute(_CLAIM, values).one_or_none()
        if taken is None:
            _left_for_resume(db, job_id)
            return None
        found = dict(taken._mapping)
        found |= db.execute(_SESSION_OF_CLAIM, {"session_id": found["session_id"]}).one()._mapping
        found["results"] = dict(db.execute(_DEPENDENCY_RESULTS, {"job_id": job_id}).all())
        if found["phase"] == Phase.POST:
            found["outcomes"] = outcomes(db, found["session_id"], job_id)
    job = Claimed(
        job_id=job_id,
        session_id=found["session_id"],
        job_name=found["job_name"],
        phase=found["phase"],
        channel=found["channel"],
        attempt=found["attempts"],
        worker_entry=found["worker_entry"],
        entry_root=found["entry_root"],
        params=found["params"],
        timeout_s=found["timeout_s"],
        python=found["python"],
        event=found["event"],
        level=found["level"],
        uid=found["uid"],
        revision=found["revision"],
        headers=found["headers"] or {},
        added_params=found["added_params"],
        worker=hostname,
        started_at=now,
        results=found["results"],
        outcomes=found.get("outcomes"),
    )
    return job


def outcomes(db: Executor, session_id: str, job_id: str) -> dict[str, str]:
    """Every other job of the session and its status: what a post job is
    called with, read with its claim."""
    return dict(
        db.execute(
            select(Job.job_name, Job.status).where(Job.session_id == session_id, Job.id != job_id)
        ).all()
    )


def beat(db: Executor, job_id: str, attempt: int) -> bool:
    """Record that ``attempt`` is alive; False when the job is no longer this
    attempt's (cancelled, or re-queued as lost)."""
    alive = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
        .values(heartbeat_at=utcnow())
    )
    return rowcount(alive) == 1


@dataclass(frozen=True)
class RunningAttempt:
    attempt: int
    worker: str | None
    worker_pid: int | None


def running_attempt(db: Session, job_id: str) -> RunningAttempt | None:
    """Who runs the job now, if it is running."""
    row = db.execute(
        select(Job.status, Job.worker, Job.worker_pid, Job.attempts).where(Job.id == job_id)
    ).one_or_none()
    if row is None or row.status != JobStatus.RUNNING:
        return None
    return RunningAttempt(row.attempts, row.worker, row.worker_pid)


# --------------------------------------------------------------------------
# Endings and release


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
    # For an attempt ended by the worker that claimed it: what its claim
    # wrote, so that a success is recorded without reading the job first.
    claimed_by: ClaimedBy | None = None
    # Where the attempt ran, kept in its attempt-log entry: the interpreter
    # ("python": "<version> <executable>") and its output folder ("output_dir").
    ran_in: dict[str, str] | None = None

    @property
    def status(self) -> AttemptStatus:
        if self.ok:
            return AttemptStatus.SUCCEEDED
        if self.lost:
            return AttemptStatus.LOST
        return AttemptStatus.TIMEOUT if self.timed_out else AttemptStatus.FAILED


@dataclass
class Released:
    """What to send after the transaction commits."""

    ready: list[ReadyJob]
    retry: tuple[str, float] | None = None
    recorded: bool = True
    # The session ended: its webhooks may be owed (scheduler.notifications).
    finished: bool = False


_LOCK_SESSION_OF_JOB = (
    select(SchedulingSession.id, SchedulingSession.urgent, SchedulingSession.cohort.is_not(None))
    .where(
        SchedulingSession.id
        == select(Job.session_id).where(Job.id == bindparam("job_id")).scalar_subquery()
    )
    .with_for_update()
)
_ENDING_READS = select(
    Job.status,
    Job.attempts,
    Job.heartbeat_at,
    Job.worker,
    Job.started_at,
    Job.attempt_log,
    Job.max_attempts,
    Job.retries,
    Job.retry_delay_s,
).where(Job.id == bindparam("job_id"))


def record_ending(
    db: Executor,
    job_id: str,
    attempt: int,
    ending: Ending,
    now: datetime | None = None,
    *,
    alone: bool = False,
) -> Released:
    """Store the ending of ``attempt`` of ``job_id``: success and release of
    its dependents, a retry after its back-off, or a final failure. An
    ending for an attempt that is no longer the running one (the job was
    re-queued as lost, or cancelled meanwhile) is ignored. ``alone``: the
    transaction holds nothing else, and may be committed here."""
    now = now or utcnow()
    if ending.ok and ending.claimed_by is not None and on_psycopg(db):
        return _succeed(db, job_id, attempt, ending, now, alone)
    # Lock the job's session row first (one statement): see the module docstring.
    job: Any
    if on_psycopg(db):
        from scheduler.store import jobs_pg

        locked = jobs_pg.lock_and_read(db, job_id)
        if locked is None:
            return Released([], recorded=False)
        (session_id, urgent, cohort), job = locked
    else:
        found = db.execute(_LOCK_SESSION_OF_JOB, {"job_id": job_id}).one_or_none()
        if found is None:
            return Released([], recorded=False)
        session_id, urgent, cohort = str(found[0]), bool(found[1]), bool(found[2])
        job = db.execute(_ENDING_READS, {"job_id": job_id}).one()
    flags = SessionFlags(urgent, cohort)
    if job.status != JobStatus.RUNNING or job.attempts != attempt:
        return Released([], recorded=False)
    if (
        ending.lost
        and ending.last_heartbeat is not None
        and job.heartbeat_at is not None
        and job.heartbeat_at > ending.last_heartbeat
    ):
        return Released([], recorded=False)

    entry = attempt_entry(
        attempt, ending.status, job.worker, job.started_at, now, None if ending.ok else ending.error
    ) | (ending.ran_in or {})
    changes: dict[str, Any] = {"attempt_log": [*job.attempt_log, entry]}

    if ending.ok:
        if on_psycopg(db):
            from scheduler.store import jobs_pg

            rows, final = jobs_pg.succeed_and_release(
                db, job_id, session_id, ending.result, changes["attempt_log"], now
            )
            ready = _ready((ReadyRow(*row) for row in rows), flags)
            if final is not None:
                notifications.queue_session_event(db, session_id, final, now)
            return Released(ready, finished=final is not None)
        else:
            changes |= {"status": JobStatus.SUCCEEDED, "result": ending.result, "error": None}
            _update_job(db, job_id, changes | {"finished_at": now})
            ready = release_dependents(db, job_id, succeeded=True, now=now, session=flags)
        if ready:  # a job it made ready has not ended: nor has the session
            return Released(ready)
        return Released(ready, finished=finish_session_if_done(db, session_id, now) is not None)

    changes["error"] = ending.error
    budget = job.max_attempts + (LOST_WORKER_GRACE if ending.lost else 0)
    if attempt < budget:
        delay = (
            0.0
            if ending.lost
            else retry_delay(job.retry_delay_s, attempt, job.max_attempts, job.retries)
        )
        # Not dispatched until the message is out: if the broker refuses it,
        # the re-sender sends it once run_after has passed.
        changes |= {
            "status": JobStatus.QUEUED,
            "run_after": now + timedelta(seconds=delay),
            "dispatched_at": None,
            "heartbeat_at": None,
        }
        _update_job(db, job_id, changes)
        return Released([], retry=(job_id, delay))

    _update_job(db, job_id, changes | {"status": JobStatus.FAILED, "finished_at": now})
    ready = release_dependents(db, job_id, succeeded=False, now=now, session=flags)
    return Released(ready, finished=finish_session_if_done(db, session_id, now) is not None)


def _succeed(
    db: Connection, job_id: str, attempt: int, ending: Ending, now: datetime, alone: bool
) -> Released:
    """A success reported by the worker that claimed the job, on PostgreSQL:
    one round trip (:func:`scheduler.store.jobs_pg.succeed`)."""
    from scheduler.store import jobs_pg

    claimed = ending.claimed_by
    assert claimed is not None
    entry = attempt_entry(attempt, ending.status, claimed.worker, claimed.started_at, now, None) | (
        ending.ran_in or {}
    )
    # Webhooks a session's end owes are queued before the commit; a success
    # ends its session succeeded or partial.
    commit = alone and not notifications.wanted((SessionStatus.SUCCEEDED, SessionStatus.PARTIAL))
    done = jobs_pg.succeed(
        db, job_id, claimed.session_id, attempt, ending.result, entry, now, commit=commit
    )
    if done is None:
        return Released([], recorded=False)
    if done.final is not None and not commit:
        notifications.queue_session_event(db, claimed.session_id, done.final, now)
    ready = _ready(
        (ReadyRow(*row) for row in done.released), SessionFlags(done.urgent, done.cohort)
    )
    return Released(ready, recorded=done.recorded, finished=done.final is not None)


def end_attempt(job_id: str, attempt: int, ending: Ending) -> Released:
    """Record an ending in its own transaction, then send what it made ready
    (or the retry, with its back-off as countdown)."""
    released = record(job_id, attempt, ending)
    send(released)
    return released


def record(job_id: str, attempt: int, ending: Ending) -> Released:
    """:func:`record_ending` in a transaction of its own."""
    with statements() as db:
        return record_ending(db, job_id, attempt, ending, alone=True)


def send(released: Released) -> None:
    """Send what an ending released, once its transaction is committed."""
    if released.retry:
        retry_id, delay = released.retry
        messages.send_job_ids([retry_id], countdown=delay)
    messages.send_jobs(released.ready, marked=True)
    if released.finished:
        notifications.announce()


def _update_job(db: Executor, job_id: str, changes: dict[str, Any]) -> None:
    db.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )


_SENDING = (Job.id, Job.job_name, Job.channel, Job.priority, Job.sort_position)


def release_dependents(
    db: Executor,
    job_id: str,
    *,
    succeeded: bool,
    now: datetime,
    session: SessionFlags = NORMAL,
) -> list[ReadyJob]:
    """Propagate the end of ``job_id``: on success every dependent is
    decremented; on a final failure (or a cancellation) every job that needs
    it to succeed, directly or transitively, becomes ``upstream_failed``, and
    post jobs, which only wait for an end, are decremented instead, so they
    still run. Returns the dependents that became ready, with what sending
    them needs, so the caller sends without reading back; they are marked
    dispatched in the same statement (a send that fails unmarks them, and
    the re-sender sends what stays marked but unstarted)."""
    ready: list[ReadyJob] = []
    ended: list[tuple[str, bool]] = [(job_id, succeeded)]
    while ended:
        current, ok = ended.pop()
        if ok:
            # Every dependent waits for this one: one decrement for them all.
            decremented = db.execute(_DECREMENT_DEPENDENTS, {"job_id": current, "now": now})
            ready.extend(_ready(decremented, session))
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
                    .where(Job.id == dependent, Job.status == JobStatus.QUEUED)
                    .values(
                        status=JobStatus.UPSTREAM_FAILED,
                        finished_at=now,
                        error=f"upstream_failed: dependency {name!r} did not succeed",
                    )
                    .execution_options(synchronize_session=False)
                )
                if rowcount(marked):
                    ended.append((dependent, False))
            else:
                decremented = db.execute(_decrement(Job.id == dependent), {"now": now})
                ready.extend(_ready(decremented, session))
    return ready


def _decrement(which: Any) -> Any:
    """One dependency of the jobs ``which`` ended (at ``:now``): those left
    waiting for none are ready, and marked dispatched."""
    becomes_ready = and_(Job.pending_deps == 1, Job.status == JobStatus.QUEUED)
    return (
        update(Job)
        .where(which)
        .values(
            pending_deps=Job.pending_deps - 1,
            dispatched_at=case(
                (becomes_ready, bound("now", Job.dispatched_at)),
                else_=Job.dispatched_at,
            ),
        )
        .returning(Job.pending_deps, Job.status, *_SENDING, Job.window)
    )


_DECREMENT_DEPENDENTS = _decrement(
    Job.id.in_(
        select(JobDependency.job_id).where(JobDependency.depends_on_id == bindparam("job_id"))
    )
)


class ReadyRow(NamedTuple):
    """A decremented dependent, as :func:`_decrement` returns it."""

    pending_deps: int
    status: str
    id: str
    job_name: str
    channel: str
    priority: int
    sort_position: float
    window: str | None


def _ready(rows: Any, session: SessionFlags) -> list[ReadyJob]:
    return [
        ReadyJob(
            row.id,
            row.job_name,
            row.channel,
            row.priority,
            row.sort_position,
            session.urgent,
            session.cohort,
            row.window,
        )
        for row in rows
        if row.pending_deps == 0 and row.status == JobStatus.QUEUED
    ]


def finish_session_if_done(db: Executor, session_id: str, now: datetime) -> str | None:
    """Give the session its final status once none of its jobs can still run,
    with its webhook notifications queued in the same transaction; returns
    that status, or None if the session has not ended now."""
    if on_psycopg(db):
        from scheduler.store import jobs_pg

        final = jobs_pg.finish_session(db, session_id, now)
        if final is None:
            return None
        notifications.queue_session_event(db, session_id, final, now)
        return final
    counts: dict[str, int] = dict(
        db.execute(
            select(Job.status, func.count())
            .where(Job.session_id == session_id)
            .group_by(Job.status)
        ).all()
    )
    if not counts or any(s not in JOB_FINAL_STATUSES for s in counts):
        return None
    if set(counts) == {JobStatus.SUCCEEDED}:
        final = SessionStatus.SUCCEEDED
    elif JobStatus.SUCCEEDED not in counts:
        final = SessionStatus.FAILED
    else:
        final = SessionStatus.PARTIAL
    done = db.execute(
        update(SchedulingSession)
        .where(
            SchedulingSession.id == session_id, SchedulingSession.status == SessionStatus.RUNNING
        )
        .values(status=final, finished_at=now)
    )
    if not rowcount(done):
        return None
    notifications.queue_session_event(db, session_id, final, now)
    return str(final)


# --------------------------------------------------------------------------
# An operator's retry and cancel


RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.UPSTREAM_FAILED)


def failed_ancestors(db: Session, job_id: str) -> list[str]:
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
            if status in (JobStatus.FAILED, JobStatus.CANCELLED):
                found.append(parent)
            elif status == JobStatus.UPSTREAM_FAILED:
                frontier.append(parent)
    return found


def downstream(db: Session, seeds: Sequence[str]) -> set[str]:
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


def requeue(db: Session, session_id: str, reset: set[str]) -> list[str]:
    """Queue the ``reset`` jobs again (the session locked by the caller) with
    dependency counters computed afresh and a fresh budget of attempts; the
    session runs again. Returns the ids of those ready at once."""
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
            upstream.status == JobStatus.SUCCEEDED
            or (not requires_success and upstream.status in JOB_FINAL_STATUSES)
        )
        if not satisfied:
            pending[job_id] += 1
    for job_id in reset:
        job = jobs[job_id]
        if job.status == JobStatus.RUNNING:
            continue  # it ends on its own; what follows it was counted above
        # Queued ones too: a post job waiting for a retried job must wait
        # for its new run, with a counter recomputed from scratch.
        job.status = JobStatus.QUEUED
        job.pending_deps = pending[job_id]
        # A fresh budget of attempts; the log keeps the earlier ones.
        job.max_attempts = job.attempts + job.retries + 1
        job.error = None
        job.result = None
        job.started_at = job.finished_at = job.heartbeat_at = None
        job.run_after = None
        job.dispatched_at = None
    db.execute(
        update(SchedulingSession)
        .where(SchedulingSession.id == session_id)
        .values(status=SessionStatus.RUNNING, finished_at=None)
    )
    return [j for j in reset if jobs[j].status == JobStatus.QUEUED and pending[j] == 0]


@dataclass
class Cancelled:
    cancelled: list[str] = field(default_factory=list)  # job names not started
    stopped: list[str] = field(default_factory=list)  # job names that were running


class SessionEndedError(ValueError):
    """The session has already ended: there is nothing to cancel."""


def cancel(db: Session, session_id: str, now: datetime | None = None) -> Cancelled:
    """Cancel every job of the session that has not ended, and the session.
    A running attempt sees its job cancelled at its next heartbeat and is
    killed; a queued message finds its job cancelled and is dropped."""
    now = now or utcnow()
    lock_session(db, session_id)
    row = db.get(SchedulingSession, session_id)
    assert row is not None
    open_jobs = list(
        db.scalars(
            select(Job).where(
                Job.session_id == session_id,
                Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
            )
        )
    )
    if row.status not in (SessionStatus.PLANNING, SessionStatus.RUNNING) and not open_jobs:
        raise SessionEndedError(f"session {session_id} has already ended ({row.status})")
    report = Cancelled()
    for job in open_jobs:
        if job.status == JobStatus.RUNNING:
            report.stopped.append(job.job_name)
            entry = attempt_entry(
                job.attempts,
                AttemptStatus.CANCELLED,
                job.worker,
                job.started_at,
                now,
                "cancelled by an operator while running",
            )
            job.attempt_log = [*job.attempt_log, entry]
        else:
            report.cancelled.append(job.job_name)
        job.status = JobStatus.CANCELLED
        job.finished_at = now
        job.error = "cancelled by an operator"
    row.status, row.finished_at = SessionStatus.CANCELLED, now
    notifications.queue_session_event(db, session_id, SessionStatus.CANCELLED, now)
    return report
