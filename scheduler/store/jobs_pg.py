"""The statements every job runs, on PostgreSQL, through psycopg itself.

A job's claim and the ending of a successful attempt are the two
transactions every job pays for. Through SQLAlchemy each statement costs
more in Python (cache keys, execution context, result processing) than on
the server; here they are plain SQL on the transaction's own psycopg
connection, prepared by the server after a few runs, and folded: the claim
returns the session's fields and the results of the job's dependencies
(for a post job, every other job's status too) with its ``UPDATE``; an
ending locks the session and reads the job as
:mod:`scheduler.jobstate` does, for a success the update of the job and
the release of its dependents are one statement, and a session whose jobs
have all ended gets its final status in one more. The success a worker
reports for the attempt it claimed reads nothing first: the lock, the
success (applied only if that attempt still runs), the release, the
session's end and the commit go to the server together (:func:`succeed`).
:mod:`scheduler.jobstate` decides when they apply (what they do is what
its SQLAlchemy statements do on SQLite) and keeps every other transition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from scheduler.store import pipelines
from scheduler.vocabulary import OPEN_JOB_STATUSES, JobStatus, Phase, SessionStatus

# The job is found by its id alone: a condition on ``status`` the planner
# could match to the index of ready jobs (status, pending_deps) lets it walk
# every queued job of a backlog when its statistics say few are queued; as
# ``(…) IS TRUE`` it is only checked on the row found.
_CLAIM = f"""
UPDATE jobs SET status = '{JobStatus.RUNNING}', attempts = jobs.attempts + 1,
    started_at = %(now)s, heartbeat_at = %(now)s, finished_at = NULL,
    worker = %(hostname)s, worker_pid = %(pid)s
FROM sessions
WHERE jobs.id = %(job_id)s
    AND (jobs.status = '{JobStatus.QUEUED}') IS TRUE AND jobs.pending_deps = 0
    AND (jobs.run_after IS NULL OR jobs.run_after <= %(due)s)
    AND NOT EXISTS (SELECT 1 FROM paused_channels paused WHERE paused.channel = jobs.channel)
    AND sessions.id = jobs.session_id
RETURNING jobs.session_id, jobs.job_name, jobs.phase, jobs.channel, jobs.attempts,
    jobs.worker_entry, jobs.entry_root, jobs.params, jobs.timeout_s, jobs.python,
    sessions.event, sessions.level, sessions.uid, sessions.revision, sessions.headers,
    sessions.added_params,
    (SELECT coalesce(jsonb_object_agg(done.job_name, done.result), '{{}}'::jsonb)
     FROM job_dependencies edge JOIN jobs done ON done.id = edge.depends_on_id
     WHERE edge.job_id = jobs.id) AS results,
    CASE WHEN jobs.phase = '{Phase.POST}' THEN
        (SELECT coalesce(jsonb_object_agg(other.job_name, other.status), '{{}}'::jsonb)
         FROM jobs other WHERE other.session_id = jobs.session_id AND other.id <> jobs.id)
    END AS outcomes
"""

# The session row first, as every transition of a session's jobs does
# (scheduler.jobstate); then the job, read after the lock is held.
_LOCK_SESSION = """
SELECT id, urgent, cohort IS NOT NULL FROM sessions
WHERE id = (SELECT session_id FROM jobs WHERE id = %(job_id)s)
FOR UPDATE
"""
_ENDING_READS = """
SELECT status, attempts, heartbeat_at, worker, started_at, attempt_log, max_attempts,
    retries, retry_delay_s
FROM jobs WHERE id = %(job_id)s
"""


class EndingRead(NamedTuple):
    """What ending an attempt reads of its job."""

    status: str
    attempts: int
    heartbeat_at: datetime | None
    worker: str | None
    started_at: datetime | None
    attempt_log: list[Any]
    max_attempts: int
    retries: int
    retry_delay_s: float


_SUCCEED_AND_RELEASE = f"""
WITH ended AS (
    UPDATE jobs SET status = '{JobStatus.SUCCEEDED}', result = %(result)s, error = NULL,
        attempt_log = %(attempt_log)s, finished_at = %(now)s
    WHERE id = %(job_id)s
)
UPDATE jobs SET pending_deps = jobs.pending_deps - 1,
    dispatched_at = CASE WHEN jobs.pending_deps = 1 AND jobs.status = '{JobStatus.QUEUED}'
        THEN %(now)s ELSE jobs.dispatched_at END
WHERE jobs.id IN (SELECT job_id FROM job_dependencies WHERE depends_on_id = %(job_id)s)
RETURNING jobs.pending_deps, jobs.status, jobs.id, jobs.job_name, jobs.channel,
    jobs.priority, jobs.sort_position, jobs."window"
"""


# A success of the attempt the claim started (its number still the job's and
# the job still running), with the release of its dependents: the
# ``attempt_log`` entry is appended on the server, so nothing of the job is
# read first. The first column says whether the ending applied; a row with
# no dependent columns when it released none.
_SUCCEEDED = f"""
WITH ended AS (
    UPDATE jobs SET status = '{JobStatus.SUCCEEDED}', result = %(result)s, error = NULL,
        attempt_log = jobs.attempt_log || %(entry)s, finished_at = %(now)s
    WHERE id = %(job_id)s AND (status = '{JobStatus.RUNNING}') IS TRUE
        AND attempts = %(attempt)s
    RETURNING id
), released AS (
    UPDATE jobs SET pending_deps = jobs.pending_deps - 1,
        dispatched_at = CASE WHEN jobs.pending_deps = 1 AND jobs.status = '{JobStatus.QUEUED}'
            THEN %(now)s ELSE jobs.dispatched_at END
    WHERE jobs.id IN (
        SELECT job_id FROM job_dependencies WHERE depends_on_id IN (SELECT id FROM ended))
    RETURNING jobs.pending_deps, jobs.status, jobs.id, jobs.job_name, jobs.channel,
        jobs.priority, jobs.sort_position, jobs."window"
)
SELECT (SELECT count(*) FROM ended) AS ended, released.*
FROM (VALUES (1)) AS one LEFT JOIN released ON TRUE
"""

_OPEN = ", ".join(f"'{status}'" for status in sorted(OPEN_JOB_STATUSES))
# One pass over the session's jobs (their session index alone: no condition
# on their status, which the planner could match to the index of ready jobs),
# and the session found by its key, not among the running ones (ix_sessions_status).
_FINISH_SESSION = f"""
WITH counted AS (
    SELECT count(*) AS jobs,
        count(*) FILTER (WHERE status IN ({_OPEN})) AS open,
        count(*) FILTER (WHERE status = '{JobStatus.SUCCEEDED}') AS succeeded
    FROM jobs WHERE session_id = %(session_id)s
)
UPDATE sessions SET finished_at = %(now)s, status = CASE
        WHEN counted.succeeded = counted.jobs THEN '{SessionStatus.SUCCEEDED}'
        WHEN counted.succeeded = 0 THEN '{SessionStatus.FAILED}'
        ELSE '{SessionStatus.PARTIAL}' END
FROM counted
WHERE sessions.id = %(session_id)s AND (sessions.status = '{SessionStatus.RUNNING}') IS TRUE
    AND counted.jobs > 0 AND counted.open = 0
RETURNING sessions.status
"""


def _cursor(db: Connection, **options: Any) -> Any:
    return pipelines.driver(db).cursor(**options)


@contextlib.contextmanager
def _together(db: Connection, *, whole: bool = False) -> Iterator[None]:
    """The block's statements sent in one round trip, their results read at
    its end, and planned once per connection (:mod:`.pipelines`).

    ``whole``: the block is a transaction of its own, its ``BEGIN`` and
    ``COMMIT`` sent with it (psycopg, left to begin a transaction itself,
    sends ``BEGIN`` alone and waits for its answer); the connection is idle
    after it, committed or, on an error, rolled back."""
    driver = pipelines.driver(db)
    if not pipelines.supported():
        yield
        if whole:
            driver.commit()
        return
    if whole:
        driver.autocommit = True  # the block sends its own BEGIN
    try:
        with pipelines.pipeline(db), driver.cursor() as mode:
            if whole:
                mode.execute("BEGIN")
            with pipelines.planned_once(db, mode):
                yield
            if whole:
                mode.execute("COMMIT")
    except BaseException:
        if whole and driver.info.transaction_status != TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):  # a lost connection: its error is the one
                driver.rollback()
        raise
    finally:
        if whole:
            with contextlib.suppress(psycopg.Error):
                driver.autocommit = False


def claim(
    db: Connection, job_id: str, hostname: str, pid: int, now: datetime, due: datetime
) -> dict[str, Any] | None:
    """The claim's update (see :func:`scheduler.jobstate.claim`); its row
    (column name → value), or None."""
    with _cursor(db, row_factory=dict_row) as cursor:
        with _together(db):
            cursor.execute(
                _CLAIM,
                {"job_id": job_id, "hostname": hostname, "pid": pid, "now": now, "due": due},
                prepare=True,
            )
        row: dict[str, Any] | None = cursor.fetchone()
    return row


def lock_and_read(db: Connection, job_id: str) -> tuple[tuple[str, bool, bool], EndingRead] | None:
    """Lock the job's session row and read the job; the session's id and
    whether it is urgent and of a cohort, and the job; None if there is no
    such job."""
    # The lock and the read in one round trip (after psycopg's BEGIN, which it
    # sends alone): the server still runs the read after the lock is held, on
    # a snapshot of its own.
    with _cursor(db) as lock, _cursor(db) as read:
        with _together(db):
            lock.execute(_LOCK_SESSION, {"job_id": job_id}, prepare=True)
            read.execute(_ENDING_READS, {"job_id": job_id}, prepare=True)
        locked, job = lock.fetchone(), read.fetchone()
    if locked is None or job is None:
        return None
    return (str(locked[0]), bool(locked[1]), bool(locked[2])), EndingRead(*job)


def succeed_and_release(
    db: Connection, job_id: str, session_id: str, result: Any, attempt_log: list[Any], now: datetime
) -> tuple[list[tuple[Any, ...]], str | None]:
    """Mark the job succeeded and decrement its dependents; their rows
    (pending_deps, status, id, job_name, channel, priority, sort_position,
    window), and the session's final status if that ended it
    (:func:`finish_session`, asked in the same round trip: while a job it
    released is queued, the session has not ended)."""
    values = {"job_id": job_id, "result": Jsonb(result), "attempt_log": Jsonb(attempt_log)}
    with _cursor(db) as released, _cursor(db) as finished:
        with _together(db):
            released.execute(_SUCCEED_AND_RELEASE, values | {"now": now}, prepare=True)
            finished.execute(_FINISH_SESSION, {"session_id": session_id, "now": now}, prepare=True)
        return list(released.fetchall()), _final(finished.fetchone())


class Succeeded(NamedTuple):
    """What :func:`succeed` did."""

    recorded: bool  # False: the attempt was no longer the job's running one
    urgent: bool
    cohort: bool
    released: list[tuple[Any, ...]]  # as succeed_and_release returns them
    final: str | None  # the session's final status, if this ended it


def succeed(
    db: Connection,
    job_id: str,
    session_id: str,
    attempt: int,
    result: Any,
    entry: dict[str, Any],
    now: datetime,
    *,
    commit: bool,
) -> Succeeded | None:
    """A successful attempt's ending in one round trip: ``BEGIN``, the
    session's lock, the job's success and its dependents' release, the
    question whether it ended the session and, with ``commit``, ``COMMIT``
    (for a caller with nothing more to write: a session that ended may owe
    webhooks, queued in the same transaction, so their caller commits
    itself). None if there is no such session."""
    values = {
        "job_id": job_id,
        "attempt": attempt,
        "result": Jsonb(result),
        "entry": Jsonb(entry),
        "now": now,
    }
    with _cursor(db) as lock, _cursor(db) as ended, _cursor(db) as finished:
        with _together(db, whole=commit):
            lock.execute(_LOCK_SESSION, {"job_id": job_id}, prepare=True)
            ended.execute(_SUCCEEDED, values, prepare=True)
            finished.execute(_FINISH_SESSION, {"session_id": session_id, "now": now}, prepare=True)
        locked, rows, final = lock.fetchone(), ended.fetchall(), _final(finished.fetchone())
    if locked is None:
        return None
    released = [row[1:] for row in rows if row[3] is not None]
    return Succeeded(bool(rows[0][0]), bool(locked[1]), bool(locked[2]), released, final)


def finish_session(db: Connection, session_id: str, now: datetime) -> str | None:
    """The session's final status, set if none of its jobs can still run (see
    :func:`scheduler.jobstate.finish_session_if_done`); None otherwise."""
    with _cursor(db) as cursor:
        with _together(db):
            cursor.execute(_FINISH_SESSION, {"session_id": session_id, "now": now}, prepare=True)
        return _final(cursor.fetchone())


def _final(row: tuple[Any, ...] | None) -> str | None:
    """The status :data:`_FINISH_SESSION` set, if it ended the session."""
    return None if row is None else str(row[0])
