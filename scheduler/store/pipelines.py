"""Several statements in one round trip, on PostgreSQL, through psycopg itself.

The statements every job and every plan run (:mod:`.jobs_pg`,
:mod:`.plans_pg`) go to the server together in psycopg's pipeline mode on
the transaction's own psycopg connection. They find their rows by a key,
so they are planned once per connection rather than at each execution,
which the store's connections otherwise do (:mod:`.db`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from psycopg import Pipeline
from sqlalchemy import Connection


def driver(db: Connection) -> Any:
    """The psycopg connection under ``db``."""
    return db.connection.driver_connection


def supported() -> bool:
    """Whether libpq has pipeline mode (14+)."""
    return Pipeline.is_supported()


def pipeline(db: Connection) -> Any:
    """psycopg's pipeline mode (statements sent together, their results read
    at the block's end) where libpq has it; elsewhere each statement is a
    round trip of its own."""
    return driver(db).pipeline() if supported() else contextlib.nullcontext()


@contextlib.contextmanager
def planned_once(db: Connection, cursor: Any) -> Iterator[None]:
    """The block's statements planned once per connection (PostgreSQL's
    default choice), the settings sent through ``cursor``: a plan made once
    serves every job or session, and planning the claim cost the server
    more than running it. The connection's custom plans come back at the
    block's end, for what follows in the same transaction too; on an error
    the transaction (or, without one, the block's implicit one) undoes both.
    A plan made while a table was tiny (a sequential scan) is made anew once
    autovacuum has analysed the grown table."""
    if driver(db).info.server_version < 120000:  # plan_cache_mode is 12+
        yield
        return
    cursor.execute("SET plan_cache_mode = auto")
    try:
        yield
    finally:
        cursor.execute("SET plan_cache_mode = force_custom_plan")
