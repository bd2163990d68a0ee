"""Detection of stable candidates (docs/architecture.md, "How it works").

A series, study or patient is a candidate when it is ``receiving`` and its
last instance is older than ``stable_age``. Each candidate is claimed with
one conditional UPDATE (it only succeeds while the resource is still
``receiving`` with the same fingerprint and no newer instance), in the same
transaction as its ``planning`` session, whose idempotency key the database
enforces: two detectors can never create two sessions for one fingerprint.
A lease keeps runs from overlapping; a run that dies loses nothing, since
an unclaimed candidate is still ``receiving`` for the next run.

The query reads the ``(state, last_received_at)`` index, so its cost follows
the number of candidates, not the size of the archive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select, update

from scheduler.config import Settings, get_settings
from scheduler.emission import create_sessions
from scheduler.leases import lease
from scheduler.store.db import transaction
from scheduler.store.models import Patient, Series, Study, utcnow
from scheduler.vocabulary import Level, ResourceState

log = logging.getLogger(__name__)

LEVELS: dict[str, tuple[Any, Any]] = {
    Level.SERIES: (Series, Series.series_uid),
    Level.STUDY: (Study, Study.study_uid),
    Level.PATIENT: (Patient, Patient.patient_id),
}
BATCH = 1000


@dataclass
class Claimed:
    level: str
    uid: str
    revision: int
    fingerprint: str
    event: str
    session_id: str | None  # None when the fingerprint was already planned
    last_instance_id: int | None = None


@dataclass
class DetectionRun:
    claimed: list[Claimed] = field(default_factory=list)
    skipped: bool = False  # another run held the lease

    @property
    def sessions(self) -> list[str]:
        return [c.session_id for c in self.claimed if c.session_id]


def detect(settings: Settings | None = None, now: datetime | None = None) -> DetectionRun:
    """Claim every stable candidate of the configured levels; create their sessions."""
    settings = settings or get_settings()
    now = now or utcnow()
    run = DetectionRun()
    ttl = max(60.0, settings.detect_interval * 4)
    with lease("detect", ttl) as held:
        if not held:
            return DetectionRun(skipped=True)
        for level in settings.detect_levels:
            run.claimed.extend(claim_level(level, now - timedelta(seconds=settings.stable_age)))
    return run


def claim_level(level: str, cutoff: datetime) -> list[Claimed]:
    model, uid_column = LEVELS[level]
    claimed: list[Claimed] = []
    with transaction() as db:
        # Lock what we claim (PostgreSQL; SQLite holds its write lock from
        # BEGIN): the rows cannot change before the UPDATE below, and a row
        # that another detector or an ingest holds is left for the next run.
        rows = db.execute(
            select(
                model.id,
                uid_column,
                model.fingerprint,
                model.stable_fingerprint,
                model.revision,
                model.last_instance_id,
            )
            .where(model.state == ResourceState.RECEIVING, model.last_received_at <= cutoff)
            .order_by(model.last_received_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return claimed
        # One UPDATE and one INSERT for the whole batch, not two statements
        # per candidate: the run's cost is a few round trips, whatever the count.
        changed = or_(
            model.stable_fingerprint.is_(None), model.stable_fingerprint != model.fingerprint
        )
        db.execute(
            update(model)
            .where(model.id.in_([row[0] for row in rows]))
            .values(
                state=ResourceState.STABLE,
                stable_fingerprint=model.fingerprint,
                revision=case((changed, model.revision + 1), else_=model.revision),
            )
            .execution_options(synchronize_session=False)
        )
        event = f"{level}.stable"
        fresh: list[Claimed] = []  # a new fingerprint: a new session
        for _pk, uid, fingerprint, stable_fingerprint, revision, last_instance in rows:
            changed_now = fingerprint != stable_fingerprint
            revision = revision + 1 if changed_now else revision
            item = Claimed(level, uid, revision, fingerprint, event, None, last_instance)
            claimed.append(item)
            if changed_now:
                fresh.append(item)
        created = create_sessions(
            db,
            [
                {
                    "event": event,
                    "level": level,
                    "uid": c.uid,
                    "fingerprint": c.fingerprint,
                    "revision": c.revision,
                    "last_instance_id": c.last_instance_id,
                }
                for c in fresh
            ],
        )
        for c in fresh:
            c.session_id = created.get(c.uid)
    return claimed
