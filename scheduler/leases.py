"""Named leases in the store: a lock that expires.

Beat may run twice by mistake, and a process may die while holding a lock;
a lease row with an expiry covers both on SQLite and PostgreSQL alike. Taking
it is one conditional statement, so two processes never both hold it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, update

from scheduler.store.db import Executor, bound, insert_for, rowcount, transaction
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
        name=bound("lease_name", Lease.name),
        holder=bound("lease_holder", Lease.holder),
        expires_at=bound("lease_expires", Lease.expires_at),
    )
    return statement.on_conflict_do_update(
        index_elements=[Lease.name],
        set_={"holder": statement.excluded.holder, "expires_at": statement.excluded.expires_at},
        where=or_(
            Lease.expires_at < bound("lease_now", Lease.expires_at),
            Lease.holder == bound("lease_holder", Lease.holder),
        ),
    ).returning(Lease.name)


# :func:`drop`'s statement, built once (see :func:`_take_statement`).
_DROP = delete(Lease).where(
    Lease.name == bound("lease_name", Lease.name),
    Lease.holder == bound("lease_holder", Lease.holder),
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
    held = _Held(name, holder, ttl, (time.monotonic() if taken_at is None else taken_at) + ttl / 3)
    renewer = _renewer()
    renewer.add(held)
    try:
        yield
    finally:
        renewer.remove(held)


@dataclass(eq=False)  # identity: the same lease may be held in two blocks
class _Held:
    name: str
    holder: str
    ttl: float
    due: float  # time.monotonic() of its next renewal


class _Renewer:
    """The one thread of a process that renews the leases held in
    :func:`renewing` blocks. A planner holds a lease for each session for a
    few milliseconds: a thread started and joined for each cost more than
    some of the plan's statements, while renewals are seconds apart."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.held: set[_Held] = set()
        self.renewing: _Held | None = None
        # When the thread's wait ends: an earlier lease must wake it;
        # -inf while it is awake, and will look at every lease anyway.
        self.wakes_at = -math.inf
        threading.Thread(target=self._run, name="lease-renewer", daemon=True).start()

    def add(self, held: _Held) -> None:
        with self.changed:
            self.held.add(held)
            if held.due < self.wakes_at:
                self.changed.notify_all()

    def remove(self, held: _Held) -> None:
        """Renew ``held`` no more, once a renewal of it under way has ended
        (5 s at most, as the store may be away)."""
        with self.changed:
            self.held.discard(held)
            self.changed.wait_for(lambda: self.renewing is not held, timeout=5)

    def _run(self) -> None:
        while True:
            with self.changed:
                now = time.monotonic()
                held = min(self.held, key=lambda h: h.due, default=None)
                if held is None or held.due > now:
                    self.wakes_at = math.inf if held is None else held.due
                    self.changed.wait(None if held is None else held.due - now)
                    self.wakes_at = -math.inf
                    continue
                self.renewing = held
            with contextlib.suppress(Exception):  # the store may be briefly away
                renew(held.name, held.holder, held.ttl)
            with self.changed:
                held.due = time.monotonic() + held.ttl / 3
                self.renewing = None
                self.changed.notify_all()


_renewer_of_process: _Renewer | None = None
_renewer_lock = threading.Lock()


def _renewer() -> _Renewer:
    global _renewer_of_process
    with _renewer_lock:
        if _renewer_of_process is None:
            _renewer_of_process = _Renewer()
        return _renewer_of_process


def _forget_renewer() -> None:
    """In a forked child: the parent's renewing thread did not come along."""
    global _renewer_of_process, _renewer_lock
    _renewer_of_process = None
    _renewer_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_renewer)
