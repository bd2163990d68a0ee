"""Helpers for tests that run sessions, beyond those of scheduler.testing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from scheduler.store.db import transaction
from scheduler.store.models import SchedulingSession


def sessions_of(uid: str) -> list[SchedulingSession]:
    with transaction() as db:
        return list(
            db.scalars(
                select(SchedulingSession)
                .where(SchedulingSession.uid == uid)
                .order_by(SchedulingSession.revision)
            )
        )


def jobs_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in doc["jobs"]}
