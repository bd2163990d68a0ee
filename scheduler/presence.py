"""Worker presence in the store: who consumes which channel, and when we
last heard from it.

Workers record themselves (``workers_bridge.heartbeat``) and are listed by
``dcm-scheduler workers``; planning warns when a job goes to a channel that
no live worker consumes; a worker that missed three heartbeats is gone.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from scheduler import clock
from scheduler.config import get_settings
from scheduler.store.db import Executor, bound, insert_for
from scheduler.store.models import Worker, utcnow


def live_after(now: datetime | None = None) -> datetime:
    """Heartbeats older than this mean the worker is gone."""
    return clock.live_after(get_settings().heartbeat_interval, now)


def record_presence(
    db: Executor,
    hostname: str,
    channels: list[str] | None,
    now: datetime | None = None,
    *,
    if_new: list[str] | None = None,
) -> None:
    """Upsert the worker's row; ``channels`` replaces its list when given;
    ``if_new`` are the channels of a row written afresh (a heartbeat after a
    prune removed the row of a worker silent too long)."""
    now = now or utcnow()
    insert = insert_for(db)
    values: dict[str, Any] = {
        "hostname": hostname,
        "channels": {c: True for c in channels or if_new or []},
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


# Built once: planning reads the live channels for every session.
_LIVE = select(Worker.channels).where(
    Worker.last_heartbeat >= bound("live_after", Worker.last_heartbeat)
)


def live_channels(db: Executor, now: datetime | None = None) -> set[str]:
    """Channels consumed by at least one worker with a recent heartbeat."""
    rows = db.scalars(_LIVE, {"live_after": live_after(now)})
    return {channel for channels in rows for channel in channels}


def forget_worker(db: Session, hostname: str, pid: int) -> None:
    """Remove a worker that stopped cleanly (one that died stays, silent)."""
    db.execute(delete(Worker).where(Worker.hostname == hostname, Worker.pid == pid))


def consumed_queues(worker: Any) -> list[str]:
    """Queue names a Celery WorkController consumes (``-Q`` or all configured)."""
    queues = worker.app.amqp.queues
    return sorted(queues.consume_from or queues)
