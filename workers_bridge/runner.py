"""One job, from message to recorded outcome (SPEC §10).

:func:`run_job` claims the job atomically (``queued`` → ``running``, so a
duplicate delivery of a running or finished job does nothing), gathers the
call's arguments from the store (headers, the session's ``added_params``, the
results of its dependencies, and for post jobs every job's outcome), runs
the attempt in a child process (:mod:`workers_bridge.process`), records the
ending (:mod:`workers_bridge.release`) and sends what became ready.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from scheduler.config import get_settings
from scheduler.emission import dispatch, send_ready, session_dir
from scheduler.store.db import retrying, rowcount, transaction
from scheduler.store.models import Job, JobDependency, SchedulingSession, Worker, utcnow
from workers_bridge.presence import record_presence
from workers_bridge.process import AttemptOutcome, execute
from workers_bridge.release import Ending, record_ending

log = logging.getLogger(__name__)

TOUCH_EVERY = 5.0
# Tolerated difference between the clocks of the machine that set a retry's
# run_after and the worker that receives the delayed message.
CLOCK_SKEW = timedelta(seconds=5)


@dataclass
class Claim:
    job_id: str
    attempt: int
    timeout: float
    python: str | None
    request: dict[str, Any]


def claim(job_id: str, hostname: str, now: datetime | None = None) -> Claim | None:
    """Take the job if it is ``queued``; build the worker call."""
    now = now or utcnow()
    with transaction() as db:
        job = db.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == "queued",
                # A duplicate message must not skip dependencies or back-off.
                Job.pending_deps == 0,
                or_(Job.run_after.is_(None), Job.run_after <= now + CLOCK_SKEW),
            )
            .values(
                status="running",
                attempts=Job.attempts + 1,
                started_at=now,
                heartbeat_at=now,
                finished_at=None,
                worker=hostname,
                worker_pid=os.getpid(),
            )
            .returning(
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
            .execution_options(synchronize_session=False)
        ).one_or_none()
        if job is None:
            return None
        _touch_worker(db, hostname, job.channel, now)
        parent = db.execute(
            select(
                SchedulingSession.event,
                SchedulingSession.level,
                SchedulingSession.uid,
                SchedulingSession.revision,
                SchedulingSession.headers,
                SchedulingSession.added_params,
            ).where(SchedulingSession.id == job.session_id)
        ).one()
        results: dict[str, Any] = dict(
            db.execute(
                select(Job.job_name, Job.result)
                .join(JobDependency, JobDependency.depends_on_id == Job.id)
                .where(JobDependency.job_id == job_id)
            ).all()
        )
        folder = session_dir(get_settings().output_dir, job.session_id)
        output_dir = folder / job.job_name
        kwargs: dict[str, Any] = {
            "job_id": job_id,
            "session_id": job.session_id,
            "event": parent.event,
            "level": parent.level,
            "uid": parent.uid,
            "revision": parent.revision,
            "attempt": job.attempts,
            "results": results,
            "session_dir": str(folder),
            "output_dir": str(output_dir),
        }
        if job.phase == "post":
            kwargs["outcomes"] = dict(
                db.execute(
                    select(Job.job_name, Job.status).where(
                        Job.session_id == job.session_id, Job.id != job_id
                    )
                ).all()
            )
        request = {
            "entry": job.worker_entry,
            "roots": [r for r in job.entry_root.split(os.pathsep) if r],
            "job_name": job.job_name,
            "headers": parent.headers or {},
            "params": job.params,
            "added_params": parent.added_params,
            "kwargs": kwargs,
        }
        return Claim(job_id, job.attempts, job.timeout_s, job.python, request)


class Heartbeat:
    """Tells the re-sender an attempt is alive; says stop when the job is no
    longer this attempt's (cancelled, re-queued as lost), or when the store
    has been unreachable so long that the re-sender will have re-queued it."""

    def __init__(self, job_id: str, attempt: int, interval: float) -> None:
        self.job_id, self.attempt, self.interval = job_id, attempt, interval
        self.last_ok = time.monotonic()

    def __call__(self) -> bool:
        try:
            with transaction() as db:
                beat = db.execute(
                    update(Job)
                    .where(
                        Job.id == self.job_id, Job.status == "running", Job.attempts == self.attempt
                    )
                    .values(heartbeat_at=utcnow())
                )
                mine = rowcount(beat) == 1
        except Exception as exc:  # noqa: BLE001 - the store may be briefly away
            silent = time.monotonic() - self.last_ok
            log.warning("heartbeat of job %s failed for %.0fs: %s", self.job_id, silent, exc)
            # Past 3 missed beats the job counts as lost and runs elsewhere.
            return silent < 3 * self.interval
        self.last_ok = time.monotonic()
        return mine


_touched: dict[tuple[str, str], float] = {}


def _touch_worker(db: Session, hostname: str, channel: str, now: datetime) -> None:
    """Record that ``hostname`` consumes ``channel`` and is alive (at most every
    few seconds per worker and channel: the presence thread beats too)."""
    key = (hostname, channel)
    if time.monotonic() - _touched.get(key, -1e9) < TOUCH_EVERY:
        return
    record_presence(db, hostname, None, now)
    channels = db.scalar(select(Worker.channels).where(Worker.hostname == hostname))
    if channels is not None and channel not in channels:
        db.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(channels={**channels, channel: True})
        )
    _touched[key] = time.monotonic()


def finish(job_id: str, attempt: int, ending: Ending) -> None:
    """Record an ending and send what it made ready (or the retry)."""
    with transaction() as db:
        released = record_ending(db, job_id, attempt, ending)
    if released.retry:
        retry_id, delay = released.retry
        dispatch([retry_id], countdown=delay)
    send_ready(released.ready)


def dead_local_attempt(job_id: str, hostname: str) -> tuple[int, str] | None:
    """(attempt, reason) when the job runs "on this worker" in a process that
    no longer exists: the pool process was killed and Celery re-delivered
    the message (``reject_on_worker_lost``). Then there is no need to wait
    for the re-sender to notice the missing heartbeats."""
    with transaction() as db:
        row = db.execute(
            select(Job.status, Job.worker, Job.worker_pid, Job.attempts).where(Job.id == job_id)
        ).one_or_none()
    if row is None or row.status != "running" or row.worker != hostname or not row.worker_pid:
        return None
    if row.worker_pid == os.getpid() or _alive(row.worker_pid):
        return None
    return (
        row.attempts,
        f"worker lost: process {row.worker_pid} on {hostname} died during the attempt",
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def attempt_safely(taken: Claim, heartbeat_interval: float, job_id: str) -> AttemptOutcome:
    """Run the attempt; a failure to even start it (a missing interpreter, no
    process slot, a full temp folder) is the attempt's error, not a crash
    that would leave the job running until the re-sender calls it lost."""
    try:
        return execute(
            taken.request,
            timeout=taken.timeout,
            python=taken.python,
            heartbeat=Heartbeat(job_id, taken.attempt, heartbeat_interval),
            # Cancellation is noticed at a heartbeat: beat at least every 5 s.
            heartbeat_interval=min(heartbeat_interval, 5.0),
        )
    except Exception as exc:  # noqa: BLE001
        where = f" ({taken.python})" if taken.python else ""
        return AttemptOutcome(
            False, error=f"the attempt could not be started{where}: {type(exc).__name__}: {exc}"
        )


def run_job(job_id: str, hostname: str | None = None) -> str | None:
    """Run one job if it can be claimed; returns its attempt's status or None."""
    hostname = hostname or socket.gethostname()
    taken = retrying(lambda: claim(job_id, hostname), what=f"claiming job {job_id}", patience=60)
    if taken is None:
        lost = dead_local_attempt(job_id, hostname)
        if lost is not None:
            attempt, reason = lost
            log.warning("job %s: %s; re-queueing", job_id, reason)
            finish(job_id, attempt, Ending(ok=False, lost=True, error=reason))
        else:
            log.info("job %s is not queued any more; duplicate delivery ignored", job_id)
        return None
    settings = get_settings()
    try:
        Path(taken.request["kwargs"]["output_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        outcome = AttemptOutcome(False, error=f"cannot create the job's output folder: {exc}")
    else:
        outcome = attempt_safely(taken, settings.heartbeat_interval, job_id)
    ending = Ending(
        ok=outcome.ok,
        result=outcome.result,
        error=outcome.error,
        timed_out=outcome.timed_out,
        lost=outcome.killed,
    )
    # The attempt ran: its outcome must not be lost to a brief store outage.
    retrying(
        lambda: finish(job_id, taken.attempt, ending), what=f"recording job {job_id}", patience=600
    )
    return "succeeded" if outcome.ok else "failed"
