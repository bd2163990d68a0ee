"""One job, from message to recorded outcome.

:func:`run_job` claims the job (:func:`scheduler.jobstate.claim`: ``queued``
→ ``running``, so a duplicate delivery of a running or finished job does
nothing), builds the worker call from what the claim read (headers, the
session's ``added_params``, the results of its dependencies, and for post
jobs every job's outcome), runs the attempt in a process of its own
(:mod:`workers_bridge.process`) while heart-beating the job, and ends the
attempt (:func:`scheduler.jobstate.end_attempt`), which sends what became
ready.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from scheduler import jobstate
from scheduler.config import get_settings
from scheduler.emission import session_dir
from scheduler.jobstate import Claimed, ClaimedBy, Ending
from scheduler.jsonsafe import escaped
from scheduler.presence import record_presence
from scheduler.store.db import retrying, statements, transaction
from scheduler.store.models import Worker, utcnow
from workers_bridge.process import AttemptOutcome, alive, execute

log = logging.getLogger(__name__)

TOUCH_EVERY = 5.0


@dataclass
class Attempt:
    """A claimed job and the call its worker gets (:mod:`workers_bridge.child`)."""

    job_id: str
    number: int
    timeout: float
    python: str | None
    request: dict[str, Any]
    claimed_by: ClaimedBy


def worker_call(claimed: Claimed) -> Attempt:
    folder = session_dir(get_settings().output_dir, claimed.session_id)
    kwargs: dict[str, Any] = {
        "job_id": claimed.job_id,
        "session_id": claimed.session_id,
        "event": claimed.event,
        "level": claimed.level,
        "uid": claimed.uid,
        "revision": claimed.revision,
        "attempt": claimed.attempt,
        "results": claimed.results,
        "session_dir": str(folder),
        "output_dir": str(folder / claimed.job_name),
    }
    if claimed.outcomes is not None:
        kwargs["outcomes"] = claimed.outcomes
    request = {
        "entry": claimed.worker_entry,
        "roots": [r for r in claimed.entry_root.split(os.pathsep) if r],
        "job_name": claimed.job_name,
        "headers": claimed.headers,
        "params": claimed.params,
        "added_params": claimed.added_params,
        "kwargs": kwargs,
    }
    return Attempt(
        claimed.job_id,
        claimed.attempt,
        claimed.timeout_s,
        claimed.python,
        request,
        claimed.by,
    )


def claim(job_id: str, hostname: str, now: datetime | None = None) -> Attempt | None:
    """Take the job if it is ``queued``; build the worker call.

    Only the claim itself is retried while the store is away: once it is
    committed, running it again would find the job taken — by this very
    attempt — and leave it running with nothing running it. This worker's
    presence is recorded after it, on its own."""
    now = now or utcnow()

    def take() -> Claimed | None:
        # One statement on PostgreSQL, a transaction of its own.
        with statements(each_alone=True) as db:
            return jobstate.claim(db, job_id, hostname, now)

    claimed = retrying(take, what=f"claiming job {job_id}", patience=60)
    if claimed is None:
        return None
    _mine.add(job_id)
    _touch_worker(hostname, claimed.channel, now)
    return worker_call(claimed)


class Heartbeat:
    """Tells the re-sender an attempt is alive; says stop when the job is no
    longer this attempt's (cancelled, re-queued as lost), or when the store
    has been unreachable so long that the re-sender will have re-queued it."""

    def __init__(self, job_id: str, attempt: int, interval: float) -> None:
        self.job_id, self.attempt, self.interval = job_id, attempt, interval
        self.last_ok = time.monotonic()

    def __call__(self) -> bool:
        try:
            with statements() as db:
                mine = jobstate.beat(db, self.job_id, self.attempt)
        except Exception as exc:  # noqa: BLE001 - the store may be briefly away
            silent = time.monotonic() - self.last_ok
            log.warning("heartbeat of job %s failed for %.0fs: %s", self.job_id, silent, exc)
            # Past 3 missed beats the job counts as lost and runs elsewhere.
            return silent < 3 * self.interval
        self.last_ok = time.monotonic()
        return mine


_touched: dict[tuple[str, str], float] = {}
# The jobs this process has claimed and not yet ended (several with a thread pool).
_mine: set[str] = set()


def _touch_worker(hostname: str, channel: str, now: datetime) -> None:
    """Record that ``hostname`` consumes ``channel`` and is alive (at most every
    few seconds per worker and channel: the heartbeat bootstep beats too).
    Bookkeeping: a store error here is logged, never the attempt's."""
    key = (hostname, channel)
    if time.monotonic() - _touched.get(key, -1e9) < TOUCH_EVERY:
        return
    try:
        with statements() as db:
            record_presence(db, hostname, None, now)
            channels = db.scalar(select(Worker.channels).where(Worker.hostname == hostname))
            if channels is not None and channel not in channels:
                db.execute(
                    update(Worker)
                    .where(Worker.hostname == hostname)
                    .values(channels={**channels, channel: True})
                )
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record worker %s on channel %s: %s", hostname, channel, exc)
        return
    _touched[key] = time.monotonic()


def dead_local_attempt(job_id: str, hostname: str) -> tuple[int, str] | None:
    """(attempt, reason) when the job runs "on this worker" in a process that
    no longer exists: the pool process was killed and Celery re-delivered
    the message (``reject_on_worker_lost``). Then there is no need to wait
    for the re-sender to notice the missing heartbeats."""
    with transaction() as db:
        running = jobstate.running_attempt(db, job_id)
    if running is None or running.worker != hostname or not running.worker_pid:
        return None
    if running.worker_pid == os.getpid():
        if job_id in _mine:  # another thread of this process runs it
            return None
        # Claimed by this process, which runs no attempt of it: the claim
        # was committed but its answer lost with the connection.
        return (
            running.attempt,
            f"worker lost: the store's connection dropped as {hostname} claimed the job",
        )
    if alive(running.worker_pid):
        return None
    return (
        running.attempt,
        f"worker lost: process {running.worker_pid} on {hostname} died during the attempt",
    )


def attempt_safely(taken: Attempt, heartbeat_interval: float) -> AttemptOutcome:
    """Run the attempt; a failure to even start it (a missing interpreter, no
    process slot, a full temp folder) is the attempt's error, not a crash
    that would leave the job running until the re-sender calls it lost."""
    try:
        return execute(
            taken.request,
            timeout=taken.timeout,
            python=taken.python,
            heartbeat=Heartbeat(taken.job_id, taken.number, heartbeat_interval),
            # Cancellation is noticed at a heartbeat: beat at least every 5 s.
            heartbeat_interval=min(heartbeat_interval, 5.0),
        )
    except Exception as exc:  # noqa: BLE001
        where = f" ({taken.python})" if taken.python else ""
        return AttemptOutcome(
            False, error=f"the attempt could not be started{where}: {type(exc).__name__}: {exc}"
        )


def ran_in(taken: Attempt, outcome: AttemptOutcome) -> dict[str, str]:
    """The attempt's provenance beside the service version and hash of its
    job: the interpreter that ran it and the folder it wrote to."""
    where = {"output_dir": str(taken.request["kwargs"]["output_dir"])}
    if outcome.interpreter:
        where["python"] = outcome.interpreter
    return where


@dataclass
class Split:
    """Where one job's time went, in seconds (``bench/overhead.py`` reports it)."""

    claim: float = 0.0
    start: float = 0.0  # from the claim to the attempt's process running
    run: float = 0.0  # the attempt's process, fork to exit
    ending: float = 0.0  # the ending's transaction
    publish: float = 0.0  # sending what it released


def run_job(job_id: str, hostname: str | None = None, split: Split | None = None) -> str | None:
    """Run one job if it can be claimed; returns its attempt's status or None."""
    hostname = hostname or socket.gethostname()
    split = split or Split()
    began = time.perf_counter()
    taken = claim(job_id, hostname)
    claimed = time.perf_counter()
    split.claim = claimed - began
    if taken is None:
        lost = dead_local_attempt(job_id, hostname)
        if lost is not None:
            attempt, reason = lost
            log.warning("job %s: %s; re-queueing", job_id, reason)
            jobstate.end_attempt(job_id, attempt, Ending(ok=False, lost=True, error=reason))
        else:
            log.info("job %s is not queued any more; duplicate delivery ignored", job_id)
        return None
    try:
        return _run(taken, split, claimed)
    finally:
        _mine.discard(job_id)


def _run(taken: Attempt, split: Split, claimed: float) -> str:
    """The claimed attempt, from its process to its recorded ending."""
    job_id = taken.job_id
    try:
        Path(taken.request["kwargs"]["output_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        outcome = AttemptOutcome(False, error=f"cannot create the job's output folder: {exc}")
    else:
        outcome = attempt_safely(taken, get_settings().heartbeat_interval)
    attempted = time.perf_counter()
    forked = outcome.forked_at or attempted
    split.start, split.run = forked - claimed, attempted - forked
    ending = Ending(
        ok=outcome.ok,
        result=outcome.result,
        error=None if outcome.error is None else escaped(outcome.error),
        timed_out=outcome.timed_out,
        lost=outcome.killed,
        ran_in=ran_in(taken, outcome),
        claimed_by=taken.claimed_by,
    )
    # The attempt ran: its outcome must not be lost to a brief store outage.
    released = retrying(
        lambda: jobstate.record(job_id, taken.number, ending),
        what=f"recording job {job_id}",
        patience=600,
    )
    recorded = time.perf_counter()
    split.ending = recorded - attempted
    jobstate.send(released)
    split.publish = time.perf_counter() - recorded
    return "succeeded" if outcome.ok else "failed"
