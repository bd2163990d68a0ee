"""Worker presence: who consumes which channel, and since when we heard from it.

When a Celery worker starts, the :class:`Presence` bootstep records its
hostname and the queues it consumes in the ``workers`` table, then refreshes
its heartbeat every ``DCM_HEARTBEAT_INTERVAL`` seconds until the worker
stops. ``dcm-scheduler workers`` lists them; planning warns when a job goes
to a channel that no live worker consumes.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta
from typing import Any

from celery import bootsteps
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from scheduler.config import get_settings
from scheduler.store.db import insert_for, transaction
from scheduler.store.models import Worker, utcnow

log = logging.getLogger(__name__)


def live_after(now: datetime | None = None) -> datetime:
    """Heartbeats older than this mean the worker is gone."""
    interval = get_settings().heartbeat_interval
    return (now or utcnow()) - timedelta(seconds=3 * interval)


def record_presence(
    db: Session, hostname: str, channels: list[str] | None, now: datetime | None = None
) -> None:
    """Upsert the worker's row; ``channels`` replaces its list when given."""
    now = now or utcnow()
    insert = insert_for(db)
    values: dict[str, Any] = {
        "hostname": hostname,
        "channels": {c: True for c in channels or []},
        "pid": os.getpid(),
        "started_at": now,
        "last_heartbeat": now,
    }
    update: dict[str, Any] = {"last_heartbeat": now}
    if channels is not None:
        update |= {"channels": values["channels"], "pid": values["pid"], "started_at": now}
    db.execute(
        insert(Worker)
        .values(**values)
        .on_conflict_do_update(index_elements=["hostname"], set_=update)
    )


def live_channels(db: Session, now: datetime | None = None) -> set[str]:
    """Channels consumed by at least one worker with a recent heartbeat."""
    rows = db.scalars(select(Worker.channels).where(Worker.last_heartbeat >= live_after(now)))
    return {channel for channels in rows for channel in channels}


class Presence(bootsteps.StartStopStep):
    """Worker bootstep: records the worker and its queues at start, beats
    every ``DCM_HEARTBEAT_INTERVAL`` seconds in a thread, stops with the worker.

    A bootstep rather than signal handlers so that every kind of worker —
    ``celery worker``, ``dcm-scheduler run``, the in-process ones of the demo
    and the tests — starts and stops it the same way.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hostname = ""

    def start(self, parent: Any) -> None:
        hostname = str(getattr(parent, "hostname", "") or "")
        self._hostname = hostname
        if not hostname:
            return
        try:
            with transaction() as db:
                record_presence(db, hostname, consumed_queues(parent))
        except Exception as exc:  # noqa: BLE001 - presence must never stop a worker
            log.warning("could not record worker %s: %s", hostname, exc)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat,
            args=(hostname, get_settings().heartbeat_interval),
            name="dcm-worker-heartbeat",
            daemon=True,
        )
        self._thread.start()

    def _beat(self, hostname: str, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                with transaction() as db:
                    record_presence(db, hostname, None)
            except Exception as exc:  # noqa: BLE001 - the store may be briefly away
                log.warning("worker heartbeat failed: %s", exc)

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            # A worker that stops cleanly leaves no row; one that dies stays
            # listed as silent, which is what an operator needs to see.
            try:
                with transaction() as db:
                    db.execute(
                        delete(Worker).where(
                            Worker.hostname == self._hostname, Worker.pid == os.getpid()
                        )
                    )
            except Exception as exc:  # noqa: BLE001 - the store may be away at shutdown
                log.warning("could not remove worker %s from the store: %s", self._hostname, exc)

    shutdown = terminate = stop


def consumed_queues(worker: Any) -> list[str]:
    """Queue names a WorkController consumes (``-Q`` or all configured)."""
    queues = worker.app.amqp.queues
    return sorted(queues.consume_from or queues)
