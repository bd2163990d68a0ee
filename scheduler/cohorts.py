"""Cohort runs (README, "Cohort runs"): one event over the stored studies
(series, patients) that match tag criteria, opened a few at a time.

:func:`start` counts the candidates and writes the ``cohorts`` row, nothing
more; :func:`open_due`, on beat under the ``cohorts`` lease, opens the next
sessions of each cohort at its rate (``N/min``), in one short transaction
per cohort and tick, never more than :data:`PER_TICK` at once nor while
that many of its sessions wait for a planner. Their ``scheduler.plan``
messages, and the jobs of the sessions, go at the lowest priority, so live
detection and planning keep going first (:func:`scheduler.messages.message_priority`).
Candidates are examined in the order they were first recorded (row id);
``position`` keeps where opening stopped and ``up_to`` the last row that
existed at the start, so data recorded later is not part of the cohort.
:func:`cancel_cohort` and :func:`retry_cohort` apply the operator's cancel
and retry (:mod:`scheduler.control`) to every session of the cohort.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from scheduler import control, messages
from scheduler.clock import iso, utcnow
from scheduler.detection import LEVELS
from scheduler.dicom import PATIENT_TAGS, SERIES_TAGS, STUDY_TAGS
from scheduler.emission import create_sessions
from scheduler.leases import lease
from scheduler.queries import NotFoundError
from scheduler.sessions import current_fingerprint
from scheduler.store.db import rowcount, transaction
from scheduler.store.models import Cohort, Patient, SchedulingSession, Series, Study
from scheduler.vocabulary import EVENT_NAME, Level, SessionStatus

# Sessions opened per cohort and tick at most, and the most of its sessions
# that may wait for a planner before it opens more: a cohort never fills the
# planning queue however high its rate.
PER_TICK = 100
# Candidates read per query while matching.
CHUNK = 500
LEASE = "cohorts"
LEASE_TTL = 120.0

OPENING, OPENED, DONE, CANCELLED = "opening", "opened", "done", "cancelled"
# The tags a --where may name: those ingest keeps on patient, study and series rows.
FIELDS = frozenset(PATIENT_TAGS + STUDY_TAGS + SERIES_TAGS)
NAME = re.compile(f"^{EVENT_NAME}$")
RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|min|m|h|hour)\s*$")
PER_MINUTE = {"s": 60.0, "sec": 60.0, "min": 1.0, "m": 1.0, "h": 1 / 60, "hour": 1 / 60}


class CohortError(ValueError):
    """A cohort that cannot be started as asked (bad criteria, rate or name)."""


class CohortExistsError(CohortError):
    """A cohort of that name exists already."""


# --------------------------------------------------------------------------
# Criteria


def parse_rate(text: str | None) -> float | None:
    """``30/min``, ``2/s``, ``500/h`` → sessions per minute; None: no limit."""
    if text is None:
        return None
    found = RATE.match(text)
    if found is None or float(found.group(1)) <= 0:
        raise CohortError(f"--rate {text!r}: give a positive number per s, min or h, e.g. 30/min")
    return float(found.group(1)) * PER_MINUTE[found.group(2)]


def parse_day(text: str, option: str) -> str:
    """A ``YYYY-MM-DD`` or ``YYYYMMDD`` date as DICOM writes it (``YYYYMMDD``)."""
    digits = text.strip().replace("-", "")
    try:
        if len(digits) != 8:
            raise ValueError(text)
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).strftime("%Y%m%d")
    except ValueError:
        raise CohortError(f"{option} {text!r}: give a date as YYYY-MM-DD") from None


def parse_where(items: Sequence[str]) -> dict[str, list[str]]:
    """``FIELD=VALUE`` items → field → accepted values (a repeated field
    accepts any of its values)."""
    where: dict[str, list[str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CohortError(f"--where {item!r}: give FIELD=VALUE, e.g. Modality=CT")
        if name not in FIELDS:
            raise CohortError(
                f"--where {item!r}: {name!r} is not a stored tag; use one of "
                + ", ".join(sorted(FIELDS))
            )
        where.setdefault(name, []).append(value)
    return where


def _pattern(value: str) -> re.Pattern[str]:
    """An exact value where ``*`` stands for any run of characters."""
    return re.compile("^" + ".*".join(re.escape(part) for part in value.split("*")) + "$")


@dataclass(frozen=True)
class Criteria:
    """What a candidate must satisfy: every ``where`` field (one of its
    values, ``*`` a wildcard; on the patient's, study's or one series' tags,
    all on the same series), the study date within ``since``..``until``
    (``YYYYMMDD``, both included), and at most ``limit`` candidates."""

    where: dict[str, list[str]] = field(default_factory=dict)
    since: str | None = None
    until: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise CohortError(f"--limit {self.limit}: give a positive number")
        if self.since and self.until and self.since > self.until:
            raise CohortError(f"--since {self.since} is after --until {self.until}")

    @classmethod
    def of(cls, document: Mapping[str, Any]) -> Criteria:
        return cls(
            {str(k): [str(v) for v in vs] for k, vs in dict(document.get("where") or {}).items()},
            document.get("since"),
            document.get("until"),
            document.get("limit"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """:class:`Criteria` compiled, applied to one series' merged tags."""

    def __init__(self, criteria: Criteria) -> None:
        self.criteria = criteria
        self.where = [
            (name, [_pattern(v) for v in values]) for name, values in criteria.where.items()
        ]

    def accepts(self, tags: Mapping[str, Any], received: datetime) -> bool:
        for name, patterns in self.where:
            value = tags.get(name)
            values = value if isinstance(value, list) else [value]
            texts = ["" if v is None else str(v) for v in values]
            if not any(p.match(t) for p in patterns for t in texts):
                return False
        if self.criteria.since or self.criteria.until:
            # The study date; a study without one counts on the day it arrived.
            day = str(tags.get("StudyDate") or "")[:8] or received.strftime("%Y%m%d")
            if self.criteria.since and day < self.criteria.since:
                return False
            if self.criteria.until and day > self.criteria.until:
                return False
        return True


# --------------------------------------------------------------------------
# Candidates


@dataclass(frozen=True)
class Candidate:
    """A resource that matched, with what opening its session needs."""

    pk: int
    uid: str
    fingerprint: str
    revision: int
    last_instance_id: int | None


def highest_pk(db: Session, level: str) -> int:
    model, _uid = LEVELS[level]
    return int(db.scalar(select(func.max(model.id))) or 0)


def matching(
    db: Session, level: str, criteria: Criteria, *, after: int = 0, up_to: int
) -> Iterator[Candidate]:
    """Candidates of ``level`` with a row id in (``after``, ``up_to``] that
    match ``criteria`` (the limit aside), in row id order, read a chunk at a
    time."""
    if level not in LEVELS:
        raise CohortError(f"unknown level {level!r}; use study, series or patient")
    model, uid_column = LEVELS[level]
    matcher = criteria.matcher()
    while after < up_to:
        pks = list(
            db.scalars(
                select(model.id)
                .where(model.id > after, model.id <= up_to)
                .order_by(model.id)
                .limit(CHUNK)
            )
        )
        if not pks:
            return
        rows = db.execute(
            select(
                model.id,
                uid_column,
                model.fingerprint,
                model.revision,
                model.last_instance_id,
                Patient.tags,
                Study.tags,
                Series.tags,
                Study.first_received_at,
            )
            .select_from(Series)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
            .where(model.id.in_(pks))
            .order_by(model.id)
        )
        seen = 0
        for pk, uid, fingerprint, revision, last, patient, study, series, received in rows:
            if pk == seen:
                continue  # another series of a candidate that matched already
            merged = {**(patient or {}), **(study or {}), **(series or {})}
            if matcher.accepts(merged, received):
                seen = pk
                yield Candidate(pk, uid, fingerprint, revision, last)
        after = pks[-1]


@dataclass
class Preview:
    """What a cohort would open (``--dry-run``): how many and the first few."""

    level: str
    count: int
    first: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preview(level: str, criteria: Criteria, show: int = 10) -> Preview:
    with transaction() as db:
        count, first = _count(db, level, criteria, show)
    return Preview(level, count, first)


def _count(db: Session, level: str, criteria: Criteria, show: int = 0) -> tuple[int, list[str]]:
    count, first = 0, list[str]()
    for found in matching(db, level, criteria, up_to=highest_pk(db, level)):
        count += 1
        if len(first) < show:
            first.append(found.uid)
        if criteria.limit is not None and count >= criteria.limit:
            break
    return count, first


# --------------------------------------------------------------------------
# Starting and opening


def default_name(event: str, now: datetime) -> str:
    return f"{event}-{now.strftime('%Y%m%d-%H%M%S')}"


def start(
    event: str,
    level: str,
    criteria: Criteria,
    *,
    rate_per_min: float | None = None,
    name: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write a cohort (its candidates counted now, opened later by beat);
    returns its summary."""
    now = now or utcnow()
    name = name or default_name(event, now)
    if not NAME.match(name):
        raise CohortError(f"cohort name {name!r}: use letters, digits and _ . : - (128 at most)")
    if not NAME.match(event):
        raise CohortError(f"event {event!r}: use letters, digits and _ . : - (128 at most)")
    if level not in set(Level):
        raise CohortError(f"unknown level {level!r}; use study, series or patient")
    with transaction() as db:
        if db.get(Cohort, name) is not None:
            raise CohortExistsError(f"a cohort named {name!r} exists already; choose --name")
        up_to = highest_pk(db, level)
        total, _first = _count(db, level, criteria)
        db.add(
            Cohort(
                name=name,
                event=event,
                level=level,
                criteria=criteria.as_dict(),
                rate_per_min=rate_per_min,
                total=total,
                opened=0,
                position=0,
                up_to=up_to,
                status=OPENING if total else DONE,
                created_at=now,
                finished_at=None if total else now,
            )
        )
    return summary(name)


def due(cohort: Cohort, now: datetime) -> int:
    """How many sessions the cohort may open now: what its rate allowed
    since it started, less what it opened, never more than :data:`PER_TICK`."""
    left = min(cohort.total - cohort.opened, PER_TICK)
    if cohort.rate_per_min is None:
        return left
    elapsed = max((now - cohort.created_at).total_seconds(), 0.0)
    allowed = math.floor(cohort.rate_per_min * elapsed / 60 + 1e-9)
    return max(min(allowed - cohort.opened, left), 0)


@dataclass
class Tick:
    """What one :func:`open_due` pass did: sessions opened per cohort, and
    the cohorts that finished."""

    opened: dict[str, list[str]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    skipped: bool = False


def open_due(now: datetime | None = None) -> Tick:
    """Beat's pass over the running cohorts: open what each may open now and
    send its plans at low priority; mark those whose sessions all ended
    ``done``. Two beats never both open: the pass holds the ``cohorts`` lease."""
    now = now or utcnow()
    tick = Tick()
    with transaction() as db:
        names = list(
            db.scalars(
                select(Cohort.name)
                .where(Cohort.status.in_((OPENING, OPENED)))
                .order_by(Cohort.created_at)
            )
        )
    if not names:
        return tick
    with lease(LEASE, LEASE_TTL) as held:
        if not held:
            tick.skipped = True
            return tick
        for name in names:
            opened = _open_next(name, now)
            if opened:
                tick.opened[name] = opened
                messages.send_plans(opened, cohort=True)
            elif _finish_if_ended(name, now):
                tick.finished.append(name)
    return tick


def _open_next(name: str, now: datetime) -> list[str]:
    """Open the sessions the cohort may open now; their ids."""
    with transaction() as db:
        cohort = db.get(Cohort, name)
        if cohort is None or cohort.status != OPENING:
            return []
        waiting = db.scalar(
            select(func.count())
            .select_from(SchedulingSession)
            .where(
                SchedulingSession.cohort == name,
                SchedulingSession.status == SessionStatus.PLANNING,
            )
        )
        want = min(due(cohort, now), PER_TICK - int(waiting or 0))
        if want <= 0:
            return []
        found: list[Candidate] = []
        position = cohort.position
        exhausted = True
        criteria = Criteria.of(cohort.criteria)
        for candidate in matching(
            db, cohort.level, criteria, after=cohort.position, up_to=cohort.up_to
        ):
            found.append(candidate)
            position = candidate.pk
            if len(found) >= want:
                exhausted = False
                break
        event, level = cohort.event, cohort.level
        opened_before, total = cohort.opened, cohort.total
        if exhausted:
            position = max(position, cohort.up_to)
    candidates = [_snapshot(level, c) for c in found]
    with transaction() as db:
        opened = opened_before + len(candidates)
        finished = exhausted or opened >= total
        changes: dict[str, Any] = {"opened": opened, "position": position}
        if finished:
            changes |= {"status": OPENED, "total": opened}
        # Conditional on the state read above: a cancel (or another opener)
        # in between wins, and nothing is opened.
        claimed = db.execute(
            update(Cohort)
            .where(
                Cohort.name == name,
                Cohort.status == OPENING,
                Cohort.opened == opened_before,
            )
            .values(**changes)
        )
        if rowcount(claimed) != 1:
            return []
        ids = create_sessions(
            db,
            [
                {
                    "event": event,
                    "level": level,
                    "uid": c.uid,
                    "fingerprint": c.fingerprint,
                    "revision": c.revision,
                    "trigger": uuid.uuid4().hex,
                    "last_instance_id": c.last_instance_id,
                    "cohort": name,
                }
                for c in candidates
            ],
            now,
        )
    return list(ids.values())


def _snapshot(level: str, candidate: Candidate) -> Candidate:
    """The candidate with a fingerprint; rows recorded by an older version
    have none stored and get it computed."""
    if candidate.fingerprint and candidate.last_instance_id is not None:
        return Candidate(
            candidate.pk,
            candidate.uid,
            candidate.fingerprint,
            max(candidate.revision, 1),
            candidate.last_instance_id,
        )
    now = current_fingerprint(level, candidate.uid)
    return Candidate(
        candidate.pk, candidate.uid, now.fingerprint, now.revision, now.last_instance_id
    )


def _finish_if_ended(name: str, now: datetime) -> bool:
    """Mark an ``opened`` cohort ``done`` once none of its sessions is open."""
    with transaction() as db:
        open_sessions = db.scalar(
            select(func.count())
            .select_from(SchedulingSession)
            .where(
                SchedulingSession.cohort == name,
                SchedulingSession.status.in_((SessionStatus.PLANNING, SessionStatus.RUNNING)),
            )
        )
        if open_sessions:
            return False
        done = db.execute(
            update(Cohort)
            .where(Cohort.name == name, Cohort.status == OPENED)
            .values(status=DONE, finished_at=now)
        )
        return rowcount(done) == 1


# --------------------------------------------------------------------------
# Reading


def _counts(db: Session, names: Sequence[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {n: {s.value: 0 for s in SessionStatus} for n in names}
    if not names:
        return counts
    rows = db.execute(
        select(SchedulingSession.cohort, SchedulingSession.status, func.count())
        .where(SchedulingSession.cohort.in_(list(names)))
        .group_by(SchedulingSession.cohort, SchedulingSession.status)
    )
    for name, status, count in rows:
        counts[str(name)][str(status)] = int(count)
    return counts


def cohort_json(row: Cohort, counts: dict[str, int]) -> dict[str, Any]:
    ended = sum(n for s, n in counts.items() if SessionStatus(s).final)
    return {
        "name": row.name,
        "event": row.event,
        "level": row.level,
        "criteria": row.criteria,
        "rate_per_min": row.rate_per_min,
        "status": row.status,
        "total": row.total,
        "opened": row.opened,
        "ended": ended,
        "sessions": counts,
        "created_at": iso(row.created_at),
        "finished_at": iso(row.finished_at),
    }


def list_cohorts(db: Session) -> list[dict[str, Any]]:
    """Every cohort, newest first, with its sessions counted by status."""
    rows = list(db.scalars(select(Cohort).order_by(Cohort.created_at.desc(), Cohort.name)))
    counts = _counts(db, [r.name for r in rows])
    return [cohort_json(r, counts[r.name]) for r in rows]


def summary(name: str) -> dict[str, Any]:
    """One cohort as :func:`list_cohorts` shows it."""
    with transaction() as db:
        row = db.get(Cohort, name)
        if row is None:
            raise NotFoundError(f"no cohort {name!r}")
        return cohort_json(row, _counts(db, [name])[name])


# --------------------------------------------------------------------------
# Cancel and retry


@dataclass
class CohortReport:
    """What a cancel or retry of a whole cohort did."""

    cohort: str
    sessions: list[str] = field(default_factory=list)  # sessions cancelled or retried
    jobs: int = 0  # jobs cancelled or re-queued
    not_opened: int = 0  # candidates a cancel left unopened

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open_session_ids(db: Session, name: str, statuses: Sequence[str]) -> list[str]:
    return list(
        db.scalars(
            select(SchedulingSession.id)
            .where(SchedulingSession.cohort == name, SchedulingSession.status.in_(statuses))
            .order_by(SchedulingSession.created_at, SchedulingSession.id)
        )
    )


def cancel_cohort(name: str, now: datetime | None = None) -> CohortReport:
    """Stop opening sessions and cancel every session of the cohort still open."""
    now = now or utcnow()
    with transaction() as db:
        row = db.get(Cohort, name)
        if row is None:
            raise NotFoundError(f"no cohort {name!r}")
        if row.status in (CANCELLED, DONE):
            raise control.NothingToDoError(f"cohort {name} has already ended ({row.status})")
        report = CohortReport(name, not_opened=row.total - row.opened)
        # An opener that read the cohort before this commits opens nothing
        # after it: its update is conditional on the status (_open_next).
        db.execute(
            update(Cohort).where(Cohort.name == name).values(status=CANCELLED, finished_at=now)
        )
    with transaction() as db:
        open_ids = _open_session_ids(db, name, (SessionStatus.PLANNING, SessionStatus.RUNNING))
    for session_id in open_ids:
        try:
            done = control.cancel_session(session_id)
        except control.NothingToDoError:
            continue  # ended meanwhile
        report.sessions.append(session_id)
        report.jobs += len(done.cancelled) + len(done.stopped)
    return report


def retry_cohort(name: str) -> CohortReport:
    """Re-run the failed jobs of every failed or partial session of the cohort."""
    with transaction() as db:
        row = db.get(Cohort, name)
        if row is None:
            raise NotFoundError(f"no cohort {name!r}")
        failed = _open_session_ids(db, name, (SessionStatus.FAILED, SessionStatus.PARTIAL))
    report = CohortReport(name)
    for session_id in failed:
        try:
            done = control.retry_jobs(session_id=session_id)
        except control.NothingToDoError:
            continue  # failed in planning: no job to run again
        report.sessions.append(session_id)
        report.jobs += len(done.requeued)
    if not report.sessions:
        raise control.NothingToDoError(f"cohort {name} has no failed job to retry")
    with transaction() as db:
        # Its sessions run again: the cohort is not done until they end.
        db.execute(
            update(Cohort)
            .where(Cohort.name == name, Cohort.status == DONE)
            .values(status=OPENED, finished_at=None)
        )
    return report
