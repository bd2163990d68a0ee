"""The statements every plan runs, on PostgreSQL, through psycopg itself.

A planner reads a session's inputs and writes its plan for every session.
Through SQLAlchemy each statement was a round trip of its own, and each
transaction two more (``BEGIN``, ``COMMIT``): fourteen per session, for
statements that take the server microseconds. Here they are plain SQL sent
in psycopg's pipeline mode on a connection in autocommit, so a round trip
carries several: the lease, the session and the live channels are read in
one (an implicit transaction, committed at its end); the plan is written in
one, ``BEGIN`` included, and committed in a second once the session's
``UPDATE`` shows it was still to plan. What they do is what
:mod:`scheduler.sessions` and :mod:`scheduler.emission` do through
SQLAlchemy on SQLite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from scheduler.store import pipelines
from scheduler.vocabulary import SessionStatus

# The lease is taken first: the session's status, read after it, is never
# one that a planner which just finished has already changed.
_TAKE = """
INSERT INTO leases (name, holder, expires_at) VALUES (%(name)s, %(holder)s, %(expires)s)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE leases.expires_at < %(now)s OR leases.holder = %(holder)s
RETURNING name
"""
_TO_PLAN = f"""
SELECT level, uid, event, revision, last_instance_id, cohort FROM sessions
WHERE id = %(session_id)s AND (status = '{SessionStatus.PLANNING}') IS TRUE
"""
_LIVE = "SELECT channels FROM workers WHERE last_heartbeat >= %(live_after)s"
_DROP = "DELETE FROM leases WHERE name = %(name)s AND holder = %(holder)s"

_CLAIM = f"""
UPDATE sessions SET status = %(status)s, headers = %(headers)s, added_params = %(added_params)s,
    trace = %(trace)s, urgent = %(urgent)s, planned_at = %(planned_at)s,
    finished_at = %(finished_at)s
WHERE id = %(session_id)s AND (status = '{SessionStatus.PLANNING}') IS TRUE
RETURNING id
"""
# The columns of a job row as emission.job_rows builds them.
JOB_COLUMNS = (
    "id",
    "session_id",
    "created_seq",
    "job_name",
    "service",
    "service_version",
    "service_hash",
    "phase",
    "worker_entry",
    "entry_root",
    "python",
    "channel",
    "params",
    "added_params",
    "sort_position",
    "priority",
    "window",
    "status",
    "attempts",
    "max_attempts",
    "retries",
    "timeout_s",
    "retry_delay_s",
    "attempt_log",
    "pending_deps",
    "created_at",
    "dispatched_at",
)
_JSON_COLUMNS = ("params", "added_params", "attempt_log")
_INSERT_JOB = "INSERT INTO jobs ({}) VALUES ({})".format(
    ", ".join(f'"{c}"' for c in JOB_COLUMNS), ", ".join(f"%({c})s" for c in JOB_COLUMNS)
)
_INSERT_EDGE = """
INSERT INTO job_dependencies (job_id, depends_on_id, requires_success)
VALUES (%(job_id)s, %(depends_on_id)s, %(requires_success)s)
"""


def take_and_read(
    db: Connection,
    session_id: str,
    lease: dict[str, Any],
    live_after: datetime,
    headers: tuple[str, dict[str, Any]],
) -> tuple[bool, tuple[Any, ...] | None, set[str], list[tuple[Any, ...]]]:
    """Take the planning lease (``name``, ``holder``, ``expires``, ``now``),
    read the session if it is still to plan (level, uid, event, revision,
    last_instance_id, cohort), the channels live workers consume and the
    rows of the session's headers (``headers``: the statement and its
    parameters but ``session_id``), in one round trip. ``db`` is in
    autocommit: they run as one implicit transaction, which has committed
    the lease on return. The headers' statement joins tables that grow, so
    it is planned at each execution for them as they are."""
    driver = pipelines.driver(db)
    statement, parameters = headers
    with (
        driver.cursor() as mode,
        driver.cursor() as take,
        driver.cursor() as read,
        driver.cursor() as live,
        driver.cursor() as rows,
    ):
        with pipelines.pipeline(db):
            with pipelines.planned_once(db, mode):
                take.execute(_TAKE, lease, prepare=True)
                read.execute(_TO_PLAN, {"session_id": session_id}, prepare=True)
                live.execute(_LIVE, {"live_after": live_after}, prepare=True)
            rows.execute(statement, parameters | {"session_id": session_id}, prepare=True)
        taken = take.fetchone() is not None
        row = read.fetchone()
        channels = {channel for (names,) in live.fetchall() for channel in names}
        return taken, row, channels, rows.fetchall()


def drop(db: Connection, lease: dict[str, Any]) -> None:
    """Delete the lease (``name``, ``holder``); ``db`` is in autocommit."""
    with pipelines.driver(db).cursor() as cursor:
        cursor.execute(_DROP, lease, prepare=True)


def write_plan(
    db: Connection,
    session: dict[str, Any],
    jobs: Sequence[dict[str, Any]],
    edges: Sequence[dict[str, Any]],
    lease: dict[str, Any],
) -> bool:
    """Mark the session planned (``session``: ``session_id``, ``status``,
    ``headers``, ``added_params``, ``trace``, ``urgent``, ``planned_at``,
    ``finished_at``), insert its jobs (:data:`JOB_COLUMNS`) and edges and
    drop the lease, in one transaction; False, with nothing written, when
    the session was no longer to plan. ``db`` is in autocommit: the
    transaction is this function's own."""
    driver = pipelines.driver(db)
    claim_values = session | {
        "headers": Jsonb(session["headers"]),
        "added_params": Jsonb(session["added_params"]),
        "trace": Jsonb(session["trace"]),
    }
    rows = [job | {c: Jsonb(job[c]) for c in _JSON_COLUMNS} for job in jobs]
    try:
        with driver.cursor() as claim, driver.cursor() as cursor:
            with pipelines.pipeline(db):
                # BEGIN sent with the statements: psycopg's own is a round trip.
                cursor.execute("BEGIN")
                with pipelines.planned_once(db, cursor):
                    claim.execute(_CLAIM, claim_values, prepare=True)
                    if rows:
                        cursor.executemany(_INSERT_JOB, rows)
                    if edges:
                        cursor.executemany(_INSERT_EDGE, edges)
                    cursor.execute(_DROP, lease, prepare=True)
            claimed = claim.fetchone() is not None
            cursor.execute("COMMIT" if claimed else "ROLLBACK")
    except BaseException:
        # Never leave the transaction open on the pooled connection.
        with contextlib.suppress(Exception):
            driver.rollback()
        raise
    return claimed
