"""Read models of sessions and jobs: the stable JSON shapes of README, "Commands".

The CLI's ``--json`` output and the HTTP API both come from here, so the
documents are the same wherever an operator or a script reads them. Times
are ISO 8601 UTC.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from scheduler.store.models import Job, JobDependency, SchedulingSession, Worker, iso, utcnow


class NotFoundError(LookupError):
    """No session or job with that id."""


def duration(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def session_json(row: SchedulingSession) -> dict[str, Any]:
    return {
        "id": row.id,
        "event": row.event,
        "level": row.level,
        "uid": row.uid,
        "revision": row.revision,
        "fingerprint": row.fingerprint,
        "trigger": row.trigger or None,
        "status": row.status,
        "error": row.error,
        "created_at": iso(row.created_at),
        "planned_at": iso(row.planned_at),
        "finished_at": iso(row.finished_at),
    }


def job_json(row: Job, depends_on: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "id": row.id,
        "session_id": row.session_id,
        "job_name": row.job_name,
        "service": row.service,
        "phase": row.phase,
        "channel": row.channel,
        "priority": row.priority,
        "status": row.status,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "depends_on": list(depends_on),
        "params": row.params,
        "result": row.result,
        "error": row.error,
        "attempt_log": [_attempt_entry(entry) for entry in row.attempt_log],
        "worker": row.worker,
        "created_at": iso(row.created_at),
        "dispatched_at": iso(row.dispatched_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "duration_s": duration(row.started_at, row.finished_at),
    }


def _attempt_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """An attempt-log entry with its times in the one ISO form (entries
    written by earlier versions end in ``+00:00``)."""
    return {
        key: value.replace("+00:00", "Z")
        if key.endswith("_at") and isinstance(value, str)
        else value
        for key, value in entry.items()
    }


def dependency_names(db: Session, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """job id → names of the jobs it depends on."""
    if not job_ids:
        return {}
    upstream = aliased(Job)
    rows = db.execute(
        select(JobDependency.job_id, upstream.job_name)
        .join(upstream, upstream.id == JobDependency.depends_on_id)
        .where(JobDependency.job_id.in_(list(job_ids)))
        .order_by(upstream.created_seq)
    ).all()
    names: dict[str, list[str]] = defaultdict(list)
    for job_id, name in rows:
        names[job_id].append(name)
    return names


def list_sessions(
    db: Session,
    *,
    status: str | None = None,
    uid: str | None = None,
    event: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    query = select(SchedulingSession).order_by(SchedulingSession.created_at.desc())
    if status:
        query = query.where(SchedulingSession.status == status)
    if uid:
        query = query.where(SchedulingSession.uid == uid)
    if event:
        query = query.where(SchedulingSession.event == event)
    if since:
        query = query.where(SchedulingSession.created_at >= since)
    rows = db.scalars(query.limit(limit).offset(offset))
    return [session_json(row) for row in rows]


def list_jobs(
    db: Session,
    *,
    session_id: str | None = None,
    status: str | None = None,
    job_name: str | None = None,
    limit: int = 500,
    offset: int = 0,
) -> list[dict[str, Any]]:
    query = select(Job)
    if session_id:
        query = query.where(Job.session_id == session_id).order_by(Job.created_seq)
    else:
        query = query.order_by(Job.created_at.desc(), Job.created_seq)
    if status:
        query = query.where(Job.status == status)
    if job_name:
        query = query.where(Job.job_name == job_name)
    rows = list(db.scalars(query.limit(limit).offset(offset)))
    deps = dependency_names(db, [row.id for row in rows])
    return [job_json(row, deps.get(row.id, ())) for row in rows]


def show_session(db: Session, session_id: str) -> dict[str, Any]:
    """The session with its ``trace`` and ``jobs`` (``show --json``)."""
    row = db.get(SchedulingSession, resolve_session_id(db, session_id))
    assert row is not None
    document = session_json(row)
    document["trace"] = row.trace
    document["added_params"] = row.added_params
    document["jobs"] = list_jobs(db, session_id=row.id)
    return document


def resolve_session_id(db: Session, given: str) -> str:
    """The full id of a session given by id or by a unique prefix (operators
    paste the short ids the tables print)."""
    if db.get(SchedulingSession, given) is not None:
        return given
    if len(given) < 4:
        raise NotFoundError(f"no session {given!r}")
    ids = list(
        db.scalars(
            select(SchedulingSession.id).where(SchedulingSession.id.startswith(given)).limit(2)
        )
    )
    if len(ids) != 1:
        raise NotFoundError(
            f"no session {given!r}" if not ids else f"session id {given!r} is ambiguous"
        )
    return ids[0]


def stages(jobs: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Jobs grouped by depth in the DAG: stage n only needs stages before it."""
    by_name = {job["job_name"]: job for job in jobs}
    depth: dict[str, int] = {}

    def level(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name in depth:
            return depth[name]
        parents = [p for p in by_name[name]["depends_on"] if p in by_name and p not in seen]
        depth[name] = 1 + max((level(p, seen | {name}) for p in parents), default=-1)
        return depth[name]

    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        grouped[level(job["job_name"])].append(job)
    return [grouped[key] for key in sorted(grouped)]


def list_workers(db: Session) -> list[dict[str, Any]]:
    """Workers seen, newest heartbeat first, with their age and liveness."""
    from scheduler.presence import live_after

    now = utcnow()
    threshold = live_after(now)
    rows = db.scalars(select(Worker).order_by(Worker.last_heartbeat.desc()))
    return [
        {
            "hostname": row.hostname,
            "channels": sorted(row.channels),
            "pid": row.pid,
            "started_at": iso(row.started_at),
            "last_heartbeat": iso(row.last_heartbeat),
            "age_s": round((now - row.last_heartbeat).total_seconds(), 1),
            "live": row.last_heartbeat >= threshold,
        }
        for row in rows
    ]


def services_report(registry: Any, problems: Sequence[str] = ()) -> dict[str, Any]:
    """The loaded services with their jobs, the broken ones, and every
    problem (``services list --json`` and ``GET /api/services``);
    ``problems`` come first (folders of the services path that are missing)."""
    return {
        "services": [
            {
                "name": service.name,
                "version": service.version,
                "source": str(service.source),
                "legacy": service.legacy,
                "jobs": [job_definition_json(job) for job in service.jobs],
            }
            for service in registry.services
        ],
        "broken": sorted(registry.broken),
        "problems": [*problems, *(str(problem) for problem in registry.problems)],
    }


def job_definition_json(job: Any) -> dict[str, Any]:
    """A loaded job definition (the ``services list --json`` shape)."""
    return {
        "job_name": job.job_name,
        "phase": job.phase,
        "events": list(job.events),
        "depends_on": list(job.depends_on),
        "channel": job.channel,
        "worker_entry": job.worker_entry,
        "registry_entry": job.registry_entry,
        "sort_position": job.sort_position,
        "priority": job.priority,
        "timeout_s": job.timeout_s,
        "retries": job.retries,
        "disabled": job.disabled,
    }
