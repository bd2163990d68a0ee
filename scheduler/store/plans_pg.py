"""The statements every plan runs, on PostgreSQL, through psycopg itself.

A planner reads a session's inputs and writes its plan for every session.
Through SQLAlchemy each statement was a round trip of its own, and each
transaction two more (``BEGIN``, ``COMMIT``): fourteen per session, for
statements that take the server microseconds. Here they are plain SQL sent
in psycopg's pipeline mode on a connection in autocommit, so a round trip
carries several: the lease, the session and the live channels are read in
one (an implicit transaction, committed at its end); the plan is written by
one statement, its own transaction: the session's ``UPDATE``, which finds it
still to plan, and with it the jobs and edges, each table's rows inserted
together from one JSON document. What they do is what
:mod:`scheduler.sessions` and :mod:`scheduler.emission` do through
SQLAlchemy on SQLite.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from psycopg.types.string import TextLoader
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
_EDGE_COLUMNS = ("job_id", "depends_on_id", "requires_success")


def _names(columns: Sequence[str]) -> str:
    return ", ".join(f'"{column}"' for column in columns)


# A plan's rows go to the server as JSON arrays, in parts well below the
# 256 MB PostgreSQL allows a jsonb array.
PART_CHARACTERS = 64 * 2**20


@functools.cache
def _write_plan(job_parts: int, edge_parts: int) -> str:
    """The statement that writes a plan whose jobs and edges come in that
    many parts (``jobs_0``, …, ``edges_0``, …): the session marked planned
    if it is still to plan, and only then its jobs and edges, each table's
    rows typed as its columns by jsonb_populate_recordset (one insert per
    part, not one per row: a row's own statement cost the server more than
    inserting it). The edges' foreign keys are checked at the statement's
    end, when the jobs are there. The lease goes either way."""

    def insert(table: str, columns: Sequence[str], parameter: str) -> str:
        return f"""{parameter} AS (
    INSERT INTO {table} ({_names(columns)})
    SELECT {_names(columns)} FROM jsonb_populate_recordset(NULL::{table}, %({parameter})s)
    WHERE EXISTS (SELECT FROM planned)
)"""

    inserts = [insert("jobs", JOB_COLUMNS, f"jobs_{n}") for n in range(job_parts)] + [
        insert("job_dependencies", _EDGE_COLUMNS, f"edges_{n}") for n in range(edge_parts)
    ]
    return f"""
WITH planned AS (
    UPDATE sessions SET status = %(status)s, headers = %(headers)s,
        added_params = %(added_params)s, trace = %(trace)s, urgent = %(urgent)s,
        planned_at = %(planned_at)s, finished_at = %(finished_at)s
    WHERE id = %(session_id)s AND (status = '{SessionStatus.PLANNING}') IS TRUE
    RETURNING id
), {", ".join(inserts)}, dropped AS (
    DELETE FROM leases WHERE name = %(name)s AND holder = %(holder)s
)
SELECT count(*) FROM planned
"""


def _parts(rows: Sequence[dict[str, Any]]) -> list[Jsonb]:
    """``rows`` as JSON arrays of at most :data:`PART_CHARACTERS` each (a
    larger row alone), at least one (``[]`` for none)."""
    parts: list[list[str]] = [[]]
    size = 0
    for row in rows:
        text = _dumps(row)  # ASCII: one byte per character
        if parts[-1] and size + len(text) > PART_CHARACTERS:
            parts.append([])
            size = 0
        parts[-1].append(text)
        size += len(text) + 1
    return [Jsonb(f"[{','.join(part)}]", dumps=_verbatim) for part in parts]


def _verbatim(text: str) -> str:
    return text


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
    it is planned at each execution for them as they are. The rows' tags
    come back as JSON text: each row repeats its series', study's and
    patient's, which :func:`scheduler.headers.build_headers` decodes once."""
    driver = pipelines.driver(db)
    statement, parameters = headers
    with (
        driver.cursor() as mode,
        driver.cursor() as take,
        driver.cursor() as read,
        driver.cursor() as live,
        driver.cursor() as rows,
    ):
        rows.adapters.register_loader("jsonb", TextLoader)
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
    drop the lease, in one statement and one round trip; False, with only
    the lease dropped, when the session was no longer to plan. ``db`` is in
    autocommit: the statement is its own transaction."""
    job_parts, edge_parts = _parts(jobs), _parts(edges)
    values = session | {
        "headers": Jsonb(session["headers"]),
        "added_params": Jsonb(session["added_params"]),
        "trace": Jsonb(session["trace"]),
        "name": lease["name"],
        "holder": lease["holder"],
    }
    values |= {f"jobs_{n}": part for n, part in enumerate(job_parts)}
    values |= {f"edges_{n}": part for n, part in enumerate(edge_parts)}
    statement = _write_plan(len(job_parts), len(edge_parts))
    driver = pipelines.driver(db)
    with driver.cursor() as mode, driver.cursor() as write:
        with pipelines.pipeline(db), pipelines.planned_once(db, mode):
            write.execute(statement, values, prepare=True)
        (planned,) = write.fetchone()
    return bool(planned)


def _dumps(value: Any) -> str:
    """JSON for jsonb_populate_recordset: times as ISO 8601 text, which
    PostgreSQL reads back as the column's ``timestamptz``."""
    return json.dumps(value, default=_iso)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
