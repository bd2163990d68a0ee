"""Sessions, from opening to planned: the use case behind detection's plan
tasks, ``dcm-scheduler plan`` and ``trigger``, and dcm-processor's push.

A session is opened for a candidate (:func:`open_session`: idempotent for
detection and manual plans, always new for a trigger), then planned once
(:func:`plan_session`): the headers of exactly the instances its
fingerprint covers are read, the registry callbacks decide the jobs
(:mod:`scheduler.planning`, in the callback host of :mod:`scheduler.callbacks`),
the plan is stored (:mod:`scheduler.emission`) and its ready jobs are sent
(:mod:`scheduler.messages`). :func:`decide_for` does the deciding alone,
writing nothing (``plan --dry-run``). The trace of every session names the
services left out and the jobs sent to channels nobody consumes.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, select

from scheduler import notifications
from scheduler.config import Settings, get_settings
from scheduler.detection import LEVELS as RESOURCE_LEVELS
from scheduler.emission import create_session, session_dir, write_plan
from scheduler.headers import (
    UnknownCandidateError,
    build_headers,
    candidate_query,
    session_rows_query,
)
from scheduler.ingest import fingerprint as fingerprint_of
from scheduler.leases import drop, new_holder, renewing, take
from scheduler.messages import ReadyJob, SessionFlags, send_jobs
from scheduler.planning import Plan, decide, make_callback_runner
from scheduler.presence import live_after, live_channels
from scheduler.registry import Registry, current_registry, record_load
from scheduler.store.db import Executor, bound, on_psycopg, statements, transaction
from scheduler.store.models import SchedulingSession, new_id, utcnow
from scheduler.vocabulary import Level, SessionStatus

# Warnings that the trace and the CLI report too, on a logger of their own so
# the CLI, which prints them, can keep them out of its stderr.
channel_log = logging.getLogger("scheduler.channels")


def header_fields(settings: Settings, registry: Registry) -> Sequence[str] | None:
    if settings.header_fields is not None:
        return settings.header_fields
    return registry.header_fields


@dataclass
class PlannedSession:
    """A session just planned: its decisions, headers and ready jobs."""

    session_id: str
    plan: Plan
    headers: dict[str, Any]
    ready: list[str]
    status: str

    def as_dict(self, event: str, level: str, uid: str) -> dict[str, Any]:
        """The report of ``trigger`` and ``plan`` (CLI ``--json`` and the API)."""
        return {
            "session_id": self.session_id,
            "event": event,
            "level": level,
            "uid": uid,
            "status": self.status,
            "jobs": self.plan.job_names,
            "urgent": self.plan.urgent,
            "trace": self.plan.trace,
        }


def decide_for(
    level: str,
    uid: str,
    event: str,
    *,
    revision: int = 1,
    session_id: str = "dry-run",
    inputs: tuple[dict[str, Any], set[str]] | None = None,
    registry: Registry | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Headers and decisions for a candidate, writing nothing (``plan --dry-run``).

    ``inputs`` are the headers and live channels when the caller already
    read them (:func:`read_inputs`) in its own transaction, with the
    ``registry`` it read them for.
    """
    settings = get_settings()
    registry = registry or current_registry(settings)
    if inputs is None:
        with transaction() as db:
            inputs = read_inputs(db, level, uid, settings, registry)
    headers, live = inputs
    context = {
        "session_id": session_id,
        "level": level,
        "uid": uid,
        "session_dir": str(session_dir(settings.output_dir, session_id)),
    }
    started = time.perf_counter()
    result = decide(
        registry.every_job(),
        headers,
        event=event,
        revision=revision,
        context=context,
        run_callback=make_callback_runner(settings.callback_timeout, registry.code_version),
    )
    # How long deciding took, callbacks included (README, "Metrics").
    result.trace["planning_s"] = round(time.perf_counter() - started, 6)
    trace_left_out_services(result, registry)
    warn_unconsumed_channels(result, live)
    return result, headers


def trace_left_out_services(result: Plan, registry: Registry) -> None:
    """Every service left out of this session, and each of its jobs, in the
    trace with the reason: a session never lacks a service silently."""
    if not registry.problems:
        return
    result.trace["service_problems"] = [str(p) for p in registry.problems]
    groups: dict[tuple[str, str], list[str]] = {}
    for problem in registry.problems:
        where = "" if problem.job is None else f"job {problem.job!r}: "
        groups.setdefault((problem.service, problem.file), []).append(where + problem.message)
    result.trace["services_left_out"] = [
        {"service": name, "file": file, "problems": reasons}
        for (name, file), reasons in groups.items()
    ]
    for name, service in registry.rejected.items():
        problems = registry.broken[name]
        for job in service.jobs:
            if job.job_name in result.trace["jobs"]:
                continue  # a jobName another service owns
            # The job's own problem when it has one, else the service's first.
            own = next((p for p in problems if p.job == job.job_name), None)
            first = own or problems[0]
            why = (
                first.message
                if first is own or first.job is None
                else (f"job {first.job!r}: {first.message}")
            )
            result.trace["jobs"][job.job_name] = {
                "service": name,
                "phase": job.phase,
                "scheduled": False,
                "reason": f"service {name!r} is left out: {why}",
            }


def read_inputs(
    db: Executor,
    level: str,
    uid: str,
    settings: Settings,
    registry: Registry,
    up_to: int | None = None,
    read: Read | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """What planning reads from the store: the headers (of the instances up
    to ``up_to``, see :func:`scheduler.headers.build_headers`) and the live
    channels; ``read``: what the caller read of them already."""
    fields = header_fields(settings, registry)
    rows = None if read is None else read.rows
    headers = build_headers(db, level, uid, fields, up_to=up_to, rows=rows)
    return headers, live_channels(db) if read is None else read.live


@dataclass(frozen=True)
class Read:
    """What a planner read with the session: the live channels and, when
    the session is of the level it expected, the rows of its headers."""

    live: set[str]
    rows: list[Any] | None


# The channels this process has warned about in its log, each until a live
# worker consumes it again: a planner sends every study's jobs to a channel
# left without a worker, and one line says so.
_warned_channels: set[str] = set()


def warn_unconsumed_channels(result: Plan, live: set[str]) -> None:
    """Record in the trace every job sent to a channel no live worker
    consumes; log each such channel once, until a worker consumes it again."""
    _warned_channels.difference_update(live)
    channels = {job.definition.channel for job in result.jobs}
    if not channels:
        return
    if get_settings().uses_filesystem_broker:
        # The embedded broker only reaches workers on this machine.
        start_hint = "start `dcm-scheduler run`, which consumes every channel of the services"
    else:
        start_hint = "start one with: celery -A scheduler worker -Q {channel}"
    warnings = []
    for job in result.jobs:
        channel = job.definition.channel
        if channel in live:
            continue
        message = (
            f"job {job.definition.job_name!r} is sent to channel {channel!r}, which no live "
            f"worker consumes; {start_hint.format(channel=channel)}"
        )
        result.trace["jobs"][job.definition.job_name]["warning"] = message
        warnings.append(message)
        if channel not in _warned_channels:
            _warned_channels.add(channel)
            channel_log.warning(
                "%s (said once for channel %r until a worker consumes it; each "
                "session's trace keeps its warnings)",
                message,
                channel,
            )
    if warnings:
        result.trace["warnings"] = warnings


def lease_name(session_id: str) -> str:
    """The lease a planner holds on a session while it plans it."""
    return f"plan:{session_id}"


PLAN_LEASE_TTL = 15.0

# What planning reads of a session still to plan; built once, as the other
# statements every plan runs (see scheduler.leases).
_TO_PLAN = select(
    SchedulingSession.level,
    SchedulingSession.uid,
    SchedulingSession.event,
    SchedulingSession.revision,
    SchedulingSession.last_instance_id,
    SchedulingSession.cohort,
).where(
    SchedulingSession.id == bound("session_id", SchedulingSession.id),
    SchedulingSession.status == SessionStatus.PLANNING,
)


def plan_session(session_id: str) -> PlannedSession | None:
    """Plan a ``planning`` session and send its ready jobs; None if already
    planned, or being planned by another process right now.

    A duplicate plan message (the re-sender's, or a redelivery) must not run
    every callback again while this planner works: the planner holds the
    lease ``plan:<session>``, renewed while the callbacks run, so it lapses
    within seconds if the planner dies and the re-sender plans it again.
    The lease costs no transaction of its own: it is taken with the reads
    of the session and dropped in the transaction that writes the plan.

    Both run on a plain connection (:func:`~scheduler.store.db.statements`):
    a planner plans session after session, and an ORM session's bookkeeping
    cost more than the statements. On PostgreSQL they go through psycopg
    itself, a few round trips in all (:mod:`scheduler.store.plans_pg`). A
    connection lost meanwhile fails the plan with a transient error, which
    the plan task retries.
    """
    settings = get_settings()
    registry = current_registry(settings)
    record_load(registry)
    name, holder = lease_name(session_id), new_holder()
    inputs: tuple[dict[str, Any], set[str]] | None = None
    error = ""
    taken_at = time.monotonic()
    # Statements alone (autocommit on PostgreSQL): the lease is one statement,
    # atomic alone, and what follows only reads.
    with statements(each_alone=True) as db:
        opened = _take_and_read(db, session_id, name, holder)
        if opened is None:
            return None
        row, read = opened
        if row is None:
            drop(db, name, holder)
            return None
        level, uid, event, revision, last_instance, cohort = row
        try:
            inputs = read_inputs(db, level, uid, settings, registry, last_instance, read)
        except UnknownCandidateError as exc:
            error = str(exc)
    planned = False
    try:
        if inputs is None:
            _fail_planning(session_id, error)
            return None
        # The callbacks run outside any transaction: they may take seconds.
        with renewing(name, holder, PLAN_LEASE_TTL, taken_at):
            result, headers = decide_for(
                level,
                uid,
                event,
                revision=revision,
                session_id=session_id,
                inputs=inputs,
                registry=registry,
            )
            ids = {job.definition.job_name: new_id() for job in result.jobs}
            ready = write_plan(session_id, result, headers, ids, (name, holder))
            planned = True
    finally:
        if not planned:
            with statements() as db:
                drop(db, name, holder)
    if ready is None:
        return None
    # The planner knows what it just wrote: send it without reading it back.
    # The plan decided the session's urgency; its cohort never changes.
    flags = SessionFlags(result.urgent, cohort is not None)
    definitions = {ids[job.definition.job_name]: job.definition for job in result.jobs}
    send_jobs([ReadyJob.of(job_id, definitions[job_id], flags) for job_id in ready], marked=True)
    status = SessionStatus.RUNNING if result.jobs else SessionStatus.EMPTY
    if status == SessionStatus.EMPTY:
        notifications.announce()
    return PlannedSession(session_id, result, headers, ready, status)


def _take_and_read(
    db: Connection, session_id: str, name: str, holder: str
) -> tuple[Any, Read | None] | None:
    """Take the planning lease, then read the session if it is still to
    plan: read after the lease, its status is never one that a planner which
    just finished has already changed. None when another planner holds the
    lease; else the session's row (None when planned already) and, on
    PostgreSQL, the live channels and the rows of its headers if it is of
    the level of the last session planned here, read in the same round trip
    (:func:`scheduler.store.plans_pg.take_and_read`)."""
    if on_psycopg(db):
        from scheduler.store import plans_pg

        now = utcnow()
        lease = {
            "name": name,
            "holder": holder,
            "expires": now + timedelta(seconds=PLAN_LEASE_TTL),
            "now": now,
        }
        expected = _usual_level[0]
        statement = _session_rows_statement(db.dialect, expected)
        taken, row, live, rows = plans_pg.take_and_read(
            db, session_id, lease, live_after(now), statement
        )
        if not taken:
            return None
        if row is not None and row[0] != expected:
            _usual_level[0] = row[0]
            return row, Read(live, None)  # its headers are read on their own
        return row, Read(live, rows)
    if not take(db, name, PLAN_LEASE_TTL, holder):
        return None
    return db.execute(_TO_PLAN, {"session_id": session_id}).first(), None


# The level of the last session this process planned: its next session's
# headers are read with the lease when it is of the same level.
_usual_level: list[str] = [Level.STUDY]


@functools.cache
def _session_rows_statement(dialect: Any, level: str) -> tuple[str, dict[str, Any]]:
    """:func:`scheduler.headers.session_rows_query` as SQL for ``dialect``,
    with its constant parameters."""
    compiled = session_rows_query(level).compile(dialect=dialect)
    return compiled.string, {k: v for k, v in compiled.params.items() if k != "session_id"}


def _fail_planning(session_id: str, message: str) -> None:
    with transaction() as db:
        row = db.get(SchedulingSession, session_id)
        if row is None or row.status != SessionStatus.PLANNING:
            return
        row.status, row.error, row.finished_at = SessionStatus.FAILED, message, utcnow()
        notifications.queue_session_event(db, session_id, row.status, row.finished_at)
    notifications.announce()


@dataclass(frozen=True)
class Snapshot:
    """What a resource holds now: its fingerprint, revision and newest instance."""

    fingerprint: str
    revision: int
    last_instance_id: int | None


def current_fingerprint(level: str, uid: str) -> Snapshot:
    """The resource as it is now (for manual plans, triggers and pushes)."""
    model, column = RESOURCE_LEVELS[level]
    with transaction() as db:
        row = db.execute(
            select(model.fingerprint, model.revision, model.last_instance_id).where(column == uid)
        ).first()
        if row is None:
            raise UnknownCandidateError(f"no {level} {uid!r} in the store")
        fingerprint, revision, last_instance = row
        if not fingerprint or last_instance is None:  # recorded by an older version
            instances = [i for *_rest, i in db.execute(candidate_query(level, uid))]
            fingerprint = fingerprint_of(i.sop_uid for i in instances)
            last_instance = max((i.id for i in instances), default=None)
    return Snapshot(fingerprint, max(revision, 1), last_instance)


def existing_session(level: str, uid: str, event: str) -> str:
    """The session that detection or a manual plan opened for the data the
    resource holds now (the idempotency key with an empty trigger)."""
    now = current_fingerprint(level, uid)
    with transaction() as db:
        found = db.scalar(
            select(SchedulingSession.id).where(
                SchedulingSession.event == event,
                SchedulingSession.level == level,
                SchedulingSession.uid == uid,
                SchedulingSession.fingerprint == now.fingerprint,
                SchedulingSession.trigger == "",
            )
        )
    if found is None:
        raise UnknownCandidateError(f"no session of {event} for {level} {uid!r} and its data")
    return str(found)


def open_session(level: str, uid: str, event: str, *, manual: bool) -> str | None:
    """Create the session of a manual plan (idempotent) or trigger (always new)."""
    if level not in set(Level):
        raise ValueError(f"unknown level {level!r}")
    now = current_fingerprint(level, uid)
    trigger = uuid.uuid4().hex if manual else ""
    with transaction() as db:
        return create_session(
            db,
            event=event,
            level=level,
            uid=uid,
            fingerprint=now.fingerprint,
            revision=now.revision,
            trigger=trigger,
            last_instance_id=now.last_instance_id,
        )


class PlannedElsewhereError(RuntimeError):
    """A session just opened was planned by another process meanwhile."""


def trigger(event: str, level: str, uid: str) -> PlannedSession:
    """A new session for ``level``/``uid`` with a custom ``event`` (every
    trigger is a new session, even for the same data), planned now."""
    session_id = open_session(level, uid, event, manual=True)
    assert session_id is not None  # a fresh trigger id never collides
    planned = plan_session(session_id)
    if planned is None:  # pragma: no cover - only if someone else planned it meanwhile
        raise PlannedElsewhereError(f"session {session_id} was planned elsewhere")
    return planned
