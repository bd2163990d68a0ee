"""Detection of stable candidates (SPEC §6).

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

from sqlalchemy import select, update

from scheduler.config import Settings, get_settings
from scheduler.emission import create_session
from scheduler.leases import lease
from scheduler.store.db import rowcount, session_scope
from scheduler.store.models import RECEIVING, STABLE, Patient, Series, Study, utcnow

log = logging.getLogger(__name__)

LEVELS: dict[str, tuple[Any, Any]] = {
    "series": (Series, Series.series_uid),
    "study": (Study, Study.study_uid),
    "patient": (Patient, Patient.patient_id),
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
    with session_scope() as session:
        rows = session.execute(
            select(
                model.id,
                uid_column,
                model.fingerprint,
                model.stable_fingerprint,
                model.revision,
            )
            .where(model.state == RECEIVING, model.last_received_at <= cutoff)
            .order_by(model.last_received_at)
            .limit(BATCH)
        ).all()
        for pk, uid, fingerprint, stable_fingerprint, revision in rows:
            changed = fingerprint != stable_fingerprint
            revision = revision + 1 if changed else revision
            taken = session.execute(
                update(model)
                .where(
                    model.id == pk,
                    model.state == RECEIVING,
                    model.fingerprint == fingerprint,
                    model.last_received_at <= cutoff,
                )
                .values(state=STABLE, stable_fingerprint=fingerprint, revision=revision)
            )
            if rowcount(taken) != 1:
                continue
            event = f"{level}.stable"
            session_id = None
            if changed:
                session_id = create_session(
                    session,
                    event=event,
                    level=level,
                    uid=uid,
                    fingerprint=fingerprint,
                    revision=revision,
                )
            claimed.append(Claimed(level, uid, revision, fingerprint, event, session_id))
    return claimed
