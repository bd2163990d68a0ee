"""Named leases in the store: a lock that expires.

Beat may run twice by mistake, and a process may die while holding a lock;
a lease row with an expiry covers both on SQLite and PostgreSQL alike. Taking
it is one conditional statement, so two processes never both hold it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, or_, update

from scheduler.store.db import Executor, insert_for, rowcount, transaction
from scheduler.store.models import Lease, utcnow


def new_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def take(db: Executor, name: str, ttl: float, holder: str, now: datetime | None = None) -> bool:
    """Take the lease in the caller's transaction (held once it commits): one
    statement that inserts it, or takes it over when it lapsed or is ours."""
    now = now or utcnow()
    values = {
        "lease_name": name,
        "lease_holder": holder,
        "lease_expires": now + timedelta(seconds=ttl),
        "lease_now": now,
    }
    return db.execute(_take_statement(insert_for(db)), values).first() is not None


@functools.cache
def _take_statement(insert: Any) -> Any:
    """:func:`take`'s statement for one dialect's ``insert``, built once with
    its values bound at execution: a planner takes a lease for every session,
    and building the statement cost more than running it."""
    statement = insert(Lease).values(
        name=bindparam("lease_name", type_=Lease.name.type),
        holder=bindparam("lease_holder", type_=Lease.holder.type),
        expires_at=bindparam("lease_expires", type_=Lease.expires_at.type),
    )
    return statement.on_conflict_do_update(
        index_elements=[Lease.name],
        set_={"holder": statement.excluded.holder, "expires_at": statement.excluded.expires_at},
        where=or_(
            Lease.expires_at < bindparam("lease_now", type_=Lease.expires_at.type),
            Lease.holder == bindparam("lease_holder", type_=Lease.holder.type),
        ),
    ).returning(Lease.name)


# :func:`drop`'s statement, built once (see :func:`_take_statement`).
_DROP = delete(Lease).where(
    Lease.name == bindparam("lease_name", type_=Lease.name.type),
    Lease.holder == bindparam("lease_holder", type_=Lease.holder.type),
)


def drop(db: Executor, name: str, holder: str) -> None:
    """Delete a one-off lease (``plan:<session>``) in the caller's transaction:
    leases named after something that ends leave no row behind."""
    db.execute(_DROP, {"lease_name": name, "lease_holder": holder})


def acquire(name: str, ttl: float, holder: str, now: datetime | None = None) -> bool:
    with transaction() as db:
        return take(db, name, ttl, holder, now)


def release(name: str, holder: str) -> None:
    with transaction() as db:
        db.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(holder="", expires_at=utcnow() - timedelta(seconds=1))
        )


@contextmanager
def lease(name: str, ttl: float) -> Iterator[bool]:
    """``with lease("detect", 60) as held:`` — ``held`` is False if another holds it."""
    holder = new_holder()
    held = acquire(name, ttl, holder)
    try:
        yield held
    finally:
        if held:
            release(name, holder)


def renew(name: str, holder: str, ttl: float) -> bool:
    with transaction() as db:
        kept = db.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=utcnow() + timedelta(seconds=ttl))
        )
        return rowcount(kept) == 1


@contextmanager
def renewing(name: str, holder: str, ttl: float, taken_at: float | None = None) -> Iterator[None]:
    """Renew a held lease every ``ttl / 3`` seconds while the block runs: work
    of unknown length keeps it, a dead holder loses it within ``ttl``.
    ``taken_at`` (``time.monotonic()`` when it was taken or last renewed)
    counts the time already spent, so a lease taken at the start of a long
    transaction is renewed at once rather than ``ttl / 3`` later."""
    stop = threading.Event()
    first = ttl / 3 - (time.monotonic() - taken_at if taken_at is not None else 0.0)

    def keep() -> None:
        wait = max(first, 0.0)
        while not stop.wait(wait):
            with contextlib.suppress(Exception):  # the store may be briefly away
                renew(name, holder, ttl)
            wait = ttl / 3

    thread = threading.Thread(target=keep, name=f"lease:{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
