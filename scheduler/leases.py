"""Named leases in the store: a lock that expires.

Beat may run twice by mistake, and a process may die while holding a lock;
a lease row with an expiry covers both on SQLite and PostgreSQL alike. Taking
it is one conditional statement, so two processes never both hold it.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.dialects import postgresql, sqlite

from scheduler.store.db import rowcount, session_scope
from scheduler.store.models import Lease, utcnow


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire(name: str, ttl: float, holder: str, now: datetime | None = None) -> bool:
    now = now or utcnow()
    with session_scope() as session:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(
            insert(Lease)
            .values(name=name, holder="", expires_at=now - timedelta(seconds=1))
            .on_conflict_do_nothing()
        )
        taken = session.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.expires_at < now, Lease.holder == holder))
            .values(holder=holder, expires_at=now + timedelta(seconds=ttl))
        )
        return rowcount(taken) == 1


def release(name: str, holder: str) -> None:
    with session_scope() as session:
        session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(holder="", expires_at=utcnow() - timedelta(seconds=1))
        )


@contextmanager
def lease(name: str, ttl: float) -> Iterator[bool]:
    """``with lease("detect", 60) as held:`` — ``held`` is False if another holds it."""
    holder = _holder()
    held = acquire(name, ttl, holder)
    try:
        yield held
    finally:
        if held:
            release(name, holder)


def renew(name: str, holder: str, ttl: float) -> bool:
    with session_scope() as session:
        kept = session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=utcnow() + timedelta(seconds=ttl))
        )
        return rowcount(kept) == 1


@contextmanager
def kept_lease(name: str, ttl: float = 15.0) -> Iterator[bool]:
    """Like :func:`lease`, renewed every ``ttl / 3`` seconds while the block
    runs: work of unknown length keeps it, a dead holder loses it in ``ttl``."""
    holder = _holder()
    held = acquire(name, ttl, holder)
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(ttl / 3):
            try:
                renew(name, holder, ttl)
            except Exception:  # noqa: BLE001 - the store may be briefly away
                continue

    thread = threading.Thread(target=keep, name=f"lease:{name}", daemon=True)
    if held:
        thread.start()
    try:
        yield held
    finally:
        stop.set()
        if held:
            thread.join(timeout=5)
            release(name, holder)
