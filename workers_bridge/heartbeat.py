"""The worker's heartbeat: a bootstep that keeps the ``workers`` table true.

When a Celery worker starts, :class:`Heartbeat` records its hostname and the
queues it consumes (:mod:`scheduler.presence`), refreshes its heartbeat every
``DCM_HEARTBEAT_INTERVAL`` seconds in a thread, and removes the row when the
worker stops cleanly. It is added to every worker of the app when this
module is imported, which the app's task modules do.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps

from scheduler.config import get_settings
from scheduler.presence import consumed_queues, forget_worker, record_presence
from scheduler.store.db import transaction

log = logging.getLogger(__name__)


class Heartbeat(bootsteps.StartStopStep):
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
        channels = consumed_queues(parent)
        try:
            with transaction() as db:
                record_presence(db, hostname, channels)
        except Exception as exc:  # noqa: BLE001 - presence must never stop a worker
            log.warning("could not record worker %s: %s", hostname, exc)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat,
            args=(hostname, get_settings().heartbeat_interval, channels),
            name="dcm-worker-heartbeat",
            daemon=True,
        )
        self._thread.start()

    def _beat(self, hostname: str, interval: float, channels: list[str]) -> None:
        while not self._stop.wait(interval):
            try:
                with transaction() as db:
                    record_presence(db, hostname, None, if_new=channels)
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
                    forget_worker(db, self._hostname, os.getpid())
            except Exception as exc:  # noqa: BLE001 - the store may be away at shutdown
                log.warning("could not remove worker %s from the store: %s", self._hostname, exc)

    shutdown = terminate = stop


def install(app: Any) -> None:
    """Add the heartbeat to the workers of ``app`` (once)."""
    if Heartbeat not in app.steps["worker"]:
        app.steps["worker"].add(Heartbeat)
