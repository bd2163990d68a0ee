"""Beat's scheduler: Celery's persistent scheduler, with two additions.

- It creates the folder of its schedule file (``$DCM_HOME`` by default), so
  ``celery -A scheduler beat`` starts on a machine where nothing else has
  written there yet (PostgreSQL and Redis in production).
- Every few seconds it renews the ``beat`` lease in the store, so
  ``dcm-scheduler doctor`` can tell an operator that beat — detection and
  the re-sender — has stopped (README, "Failure modes").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

log = logging.getLogger(__name__)

BEAT_LEASE = "beat"
ALIVE_EVERY = 5.0
# The lease lapses after this many missed renewals: beat is then reported gone.
ALIVE_FOR = 6 * ALIVE_EVERY


def renew_beat_lease() -> None:
    """Record that beat is alive; a store outage is logged, never raised."""
    from sqlalchemy import delete

    from scheduler.leases import new_holder, take
    from scheduler.store.db import transaction
    from scheduler.store.models import Lease

    try:
        with transaction() as db:
            # Two beats are harmless (README): the newest renewal holds it.
            db.execute(delete(Lease).where(Lease.name == BEAT_LEASE))
            take(db, BEAT_LEASE, ALIVE_FOR, new_holder())
    except Exception as exc:  # noqa: BLE001 - beat must go on without the store
        log.warning("could not record that beat is alive: %s", exc)


class Scheduler(PersistentScheduler):
    """``beat_scheduler`` of the app (celeryconfig)."""

    _alive_at = 0.0

    def setup_schedule(self) -> None:
        Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        delay: float = super().tick(*args, **kwargs)
        now = time.monotonic()
        if now - self._alive_at >= ALIVE_EVERY:
            self._alive_at = now
            renew_beat_lease()
        return min(delay, ALIVE_EVERY)
