"""Emission: a :class:`~scheduler.planning.Plan` becomes rows, then messages (SPEC §9).

Rows first: the session, its jobs and their dependency edges are written in
one transaction, guarded by the session's idempotency key and its
``planning`` status, so planning the same data twice is a no-op. Messages
after commit: the jobs with no pending dependency go out as one Celery
``group`` of ``workers_bridge.run_job`` signatures (task id = job id, queue =
channel, priority, Flower name ``dcm:<jobName>``). Jobs with dependencies are
sent later by the bridge when their ``pending_deps`` counter reaches zero.
If the broker is down the rows stay undispatched and the re-sender sends
them when it is back: nothing is lost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import group
from sqlalchemy import insert as insert_statement
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scheduler.planning import Plan
from scheduler.store.db import insert_for, rowcount, transaction
from scheduler.store.models import Job, JobDependency, SchedulingSession, new_id, utcnow

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
            "status": "planning",
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


def write_plan(
    db: Session,
    session_id: str,
    plan: Plan,
    headers: dict[str, Any],
    *,
    now: datetime | None = None,
    job_ids: dict[str, str] | None = None,
) -> list[str] | None:
    """Store the plan of a ``planning`` session; returns the ids of the jobs
    ready to run, or ``None`` if the session was planned already.
    ``job_ids`` (jobName → id) lets the caller choose the ids."""
    now = now or utcnow()
    status = "running" if plan.jobs else "empty"
    claimed = db.execute(
        update(SchedulingSession)
        .where(SchedulingSession.id == session_id, SchedulingSession.status == "planning")
        .values(
            status=status,
            headers=headers,
            added_params=plan.added_params,
            trace=plan.trace,
            planned_at=now,
            finished_at=None if plan.jobs else now,
        )
    )
    if rowcount(claimed) != 1:
        return None
    ids = job_ids or {job.definition.job_name: new_id() for job in plan.jobs}
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
                "phase": d.phase,
                "worker_entry": d.worker_entry,
                "entry_root": _roots(d.entry_roots),
                "python": d.python,
                "channel": d.channel,
                "params": d.params,
                "added_params": job.added_params or {},
                "sort_position": d.sort_position,
                "priority": d.priority,
                "status": "queued",
                "attempts": 0,
                "max_attempts": d.retries + 1,
                "retries": d.retries,
                "timeout_s": d.timeout_s,
                "retry_delay_s": d.retry_delay_s,
                "attempt_log": [],
                "pending_deps": pending[d.job_name],
                "created_at": now,
            }
        )
    if rows:
        db.execute(insert_statement(Job), rows)
    edges = [
        {
            "job_id": ids[e.job],
            "depends_on_id": ids[e.depends_on],
            "requires_success": e.requires_success,
        }
        for e in plan.edges
    ]
    if edges:
        db.execute(insert_statement(JobDependency), edges)
    return [ids[name] for name, count in pending.items() if count == 0]


def _roots(roots: Sequence[Path]) -> str:
    return os.pathsep.join(str(r) for r in roots)


def broker_priority(app: Any, priority: int) -> int:
    """Our priority (0-9, higher first) in the broker's terms: Redis runs
    the lowest number first, AMQP the highest."""
    url = str(app.conf.broker_url or "")
    return 9 - priority if url.startswith(("redis", "rediss")) else priority


@dataclass(frozen=True)
class ReadyJob:
    """What sending a job needs, without loading its row."""

    id: str
    job_name: str
    channel: str
    priority: int
    sort_position: float

    @classmethod
    def of(cls, job_id: str, definition: Any) -> ReadyJob:
        return cls(
            job_id,
            definition.job_name,
            definition.channel,
            definition.priority,
            definition.sort_position,
        )


def job_signature(job: Job | ReadyJob, countdown: float | None = None) -> Any:
    from workers_bridge.tasks import run_job

    options: dict[str, Any] = {
        "task_id": job.id,
        "queue": job.channel,
        "priority": broker_priority(run_job.app, job.priority),
        "shadow": f"dcm:{job.job_name}",
    }
    if countdown:
        options["countdown"] = countdown
    return run_job.signature(args=(job.id,), **options)


def dispatch(jobs: Sequence[str | ReadyJob], countdown: float | None = None) -> int:
    """Send the given queued jobs; returns how many went out.

    ``jobs`` are ids, read from the store, or :class:`ReadyJob` when the
    caller knows them already (the planner, which just wrote them).
    Ready jobs are ordered by priority (higher first), then sortPosition.
    A broker error is logged, not raised: the re-sender sends them later.
    """
    known = [job for job in jobs if isinstance(job, ReadyJob)]
    ids = [job for job in jobs if isinstance(job, str)]
    if ids:
        with transaction() as db:
            known.extend(
                ReadyJob(*row)
                for row in db.execute(
                    select(
                        Job.id, Job.job_name, Job.channel, Job.priority, Job.sort_position
                    ).where(Job.id.in_(ids), Job.status == "queued")
                )
            )
    return send_ready(known, countdown)


def send_ready(jobs: Sequence[ReadyJob], countdown: float | None = None) -> int:
    """Send jobs known to be queued and ready (one group), then mark them dispatched."""
    if not jobs:
        return 0
    ordered = sorted(jobs, key=lambda j: (-j.priority, j.sort_position, j.job_name))
    try:
        group(job_signature(job, countdown) for job in ordered).apply_async(
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2}
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure: leave it to the re-sender
        log.warning("broker unavailable, %d job(s) left for the re-sender: %s", len(jobs), exc)
        return 0
    with transaction() as db:
        db.execute(
            update(Job).where(Job.id.in_([j.id for j in jobs])).values(dispatched_at=utcnow())
        )
    return len(jobs)
