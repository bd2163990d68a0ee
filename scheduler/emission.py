r"""Emission: sessions and :class:`~scheduler.planning.Plan`\ s become rows.

A session is created ``planning`` under its idempotency key, so detecting
or planning the same data twice is a no-op. A plan is stored in one
transaction: the session's headers, trace and ``added_params``, its jobs and
their dependency edges, each job's ``pending_deps`` counting the edges it
waits for, guarded by the session's ``planning`` status. The jobs waiting
for none are returned: the caller sends them after the commit
(:mod:`scheduler.messages`); the others are sent by
:mod:`scheduler.jobstate` when their counter reaches zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert as insert_statement
from sqlalchemy import update
from sqlalchemy.orm import Session

from scheduler import notifications
from scheduler.leases import drop
from scheduler.planning import Plan
from scheduler.store.db import Executor, bound, get_engine, insert_for, rowcount, statements
from scheduler.store.models import Job, JobDependency, SchedulingSession, new_id, utcnow
from scheduler.vocabulary import JobStatus, SessionStatus

log = logging.getLogger(__name__)


def create_session(
    db: Session,
    *,
    event: str,
    level: str,
    uid: str,
    fingerprint: str,
    revision: int,
    trigger: str = "",
    last_instance_id: int | None = None,
    now: datetime | None = None,
) -> str | None:
    """Insert a ``planning`` session; ``None`` when its idempotency key exists."""
    candidate = {
        "event": event,
        "level": level,
        "uid": uid,
        "fingerprint": fingerprint,
        "revision": revision,
        "trigger": trigger,
        "last_instance_id": last_instance_id,
    }
    return create_sessions(db, [candidate], now).get(uid)


def create_sessions(
    db: Session, candidates: Sequence[dict[str, Any]], now: datetime | None = None
) -> dict[str, str]:
    """Insert the ``planning`` sessions of many candidates (dicts of ``event``,
    ``level``, ``uid``, ``fingerprint``, ``revision`` and optionally
    ``trigger`` and ``last_instance_id``) in one executemany; returns uid →
    session id for those whose idempotency key was new."""
    if not candidates:
        return {}
    insert = insert_for(db)
    now = now or utcnow()
    rows = [
        {
            "id": new_id(),
            "trigger": "",
            "last_instance_id": None,
            "status": SessionStatus.PLANNING,
            "added_params": {},
            "trace": {},
            "created_at": now,
            **candidate,
        }
        for candidate in candidates
    ]
    statement = (
        insert(SchedulingSession)
        .on_conflict_do_nothing()
        .returning(SchedulingSession.uid, SchedulingSession.id)
    )
    # SQLAlchemy sends an executemany with RETURNING as batched multi-row
    # INSERTs ("insertmanyvalues") with one cached compiled statement.
    return {uid: session_id for uid, session_id in db.execute(statement, rows)}


def session_dir(output_dir: Path, session_id: str) -> Path:
    return output_dir / session_id


# The session's columns a plan sets.
_PLANNED_COLUMNS = (
    "status",
    "headers",
    "added_params",
    "trace",
    "urgent",
    "planned_at",
    "finished_at",
)


# The session's side of store_plan, built once with its values bound at
# execution: a planner writes it for every session (see scheduler.leases).
_CLAIM = (
    update(SchedulingSession)
    .where(
        SchedulingSession.id == bound("session_id", SchedulingSession.id),
        SchedulingSession.status == SessionStatus.PLANNING,
    )
    .values(
        {
            column: bound(f"new_{column}", getattr(SchedulingSession, column))
            for column in _PLANNED_COLUMNS
        }
    )
)


def store_plan(
    db: Executor,
    session_id: str,
    plan: Plan,
    headers: dict[str, Any],
    *,
    now: datetime | None = None,
    job_ids: dict[str, str] | None = None,
    mark_ready: bool = False,
) -> list[str] | None:
    """Store the plan of a ``planning`` session; returns the ids of the jobs
    ready to run, or ``None`` if the session was planned already.
    ``job_ids`` (jobName → id) lets the caller choose the ids. ``mark_ready``
    records the ready jobs as dispatched now, for a caller that sends them
    right after the commit with ``send_jobs(..., marked=True)``."""
    now = now or utcnow()
    planned = _planned(plan, headers, now)
    # Bound as new_<column>: SQLAlchemy keeps the columns' names for itself.
    claimed = db.execute(
        _CLAIM, {"session_id": session_id} | {f"new_{k}": v for k, v in planned.items()}
    )
    if rowcount(claimed) != 1:
        return None
    if not plan.jobs:
        notifications.queue_session_event(db, session_id, SessionStatus.EMPTY, now)
    ids = job_ids or {job.definition.job_name: new_id() for job in plan.jobs}
    rows, edges, ready = _rows(session_id, plan, ids, now, mark_ready)
    if rows:
        db.execute(insert_statement(Job), rows)
    if edges:
        db.execute(insert_statement(JobDependency), edges)
    return ready


def write_plan(
    session_id: str,
    plan: Plan,
    headers: dict[str, Any],
    job_ids: dict[str, str],
    lease: tuple[str, str],
) -> list[str] | None:
    """:func:`store_plan` in a transaction of its own, committed on return,
    the ready jobs marked dispatched; the planner's ``lease`` (name, holder)
    is dropped either way. On PostgreSQL a plan with jobs is one statement
    and one round trip (:mod:`scheduler.store.plans_pg`); a plan without
    any may owe a webhook, queued through the statements every store runs."""
    name, holder = lease
    if plan.jobs and get_engine().dialect.driver == "psycopg":
        from scheduler.store import plans_pg

        now = utcnow()
        rows, edges, ready = _rows(session_id, plan, job_ids, now, mark_ready=True)
        planned = {"session_id": session_id} | _planned(plan, headers, now)
        held = {"name": name, "holder": holder}
        with statements(each_alone=True) as db:
            return ready if plans_pg.write_plan(db, planned, rows, edges, held) else None
    with statements() as db:
        stored = store_plan(db, session_id, plan, headers, job_ids=job_ids, mark_ready=True)
        drop(db, name, holder)
    return stored


def _planned(plan: Plan, headers: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The session's columns (:data:`_PLANNED_COLUMNS`) once planned."""
    return {
        "status": SessionStatus.RUNNING if plan.jobs else SessionStatus.EMPTY,
        "headers": headers,
        "added_params": plan.added_params,
        "trace": plan.trace,
        "urgent": plan.urgent,
        "planned_at": now,
        "finished_at": None if plan.jobs else now,
    }


def _rows(
    session_id: str, plan: Plan, ids: dict[str, str], now: datetime, mark_ready: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The plan's job rows, edge rows and ready job ids: each job's
    ``pending_deps`` counts the edges it waits for; those waiting for none
    are ready."""
    pending = {name: 0 for name in ids}
    for edge in plan.edges:
        pending[edge.job] += 1
    rows = []
    for job in plan.jobs:
        d = job.definition
        rows.append(
            {
                "id": ids[d.job_name],
                "session_id": session_id,
                "created_seq": job.position,
                "job_name": d.job_name,
                "service": d.service,
                "service_version": d.service_version,
                "service_hash": d.service_hash,
                "phase": d.phase,
                "worker_entry": d.worker_entry,
                "entry_root": _roots(d.entry_roots),
                "python": d.python,
                "channel": d.channel,
                "params": d.params,
                "added_params": job.added_params or {},
                "sort_position": d.sort_position,
                "priority": d.priority,
                "window": d.window,
                "status": JobStatus.QUEUED,
                "attempts": 0,
                "max_attempts": d.retries + 1,
                "retries": d.retries,
                "timeout_s": d.timeout_s,
                "retry_delay_s": d.retry_delay_s,
                "attempt_log": [],
                "pending_deps": pending[d.job_name],
                "created_at": now,
                "dispatched_at": now if mark_ready and pending[d.job_name] == 0 else None,
            }
        )
    edges = [
        {
            "job_id": ids[e.job],
            "depends_on_id": ids[e.depends_on],
            "requires_success": e.requires_success,
        }
        for e in plan.edges
    ]
    return rows, edges, [ids[name] for name, count in pending.items() if count == 0]


def _roots(roots: Sequence[Path]) -> str:
    return os.pathsep.join(str(r) for r in roots)
