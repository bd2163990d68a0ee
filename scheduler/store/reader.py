"""Reading the store with plain SQL, through the database driver itself.

The listings (``sessions``, ``jobs``, ``show``, ``workers``, and the HTTP
API's reads) are a few ``SELECT``\\ s. Run through the driver they need
neither SQLAlchemy nor the ORM: a reading command starts in a fraction of
the time (README, "Commands"), and what it runs cannot write. A
:class:`Reader` answers rows as dicts, with the store's JSON columns decoded
and its times as aware UTC datetimes, the same on SQLite and PostgreSQL;
:func:`reader_of` wraps a SQLAlchemy session the rest of the code holds, so
there is one set of queries (:mod:`scheduler.queries`) for every caller.

SQL is written with ``:name`` parameters and rendered for the driver.
Standard library only, but for the driver of the URL's database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

# The store's columns that hold JSON, and those that hold times.
JSON_COLUMNS = frozenset(
    {"tags", "channels", "headers", "added_params", "trace", "params", "result", "attempt_log"}
)
TIME_COLUMNS = frozenset(
    {
        "created_at",
        "planned_at",
        "finished_at",
        "dispatched_at",
        "started_at",
        "heartbeat_at",
        "run_after",
        "last_heartbeat",
        "received_at",
        "expires_at",
        "paused_at",
    }
)
_PARAMETER = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


class StoreNotReadyError(RuntimeError):
    """The store does not exist yet, or has an older schema than this code."""


class Reader(Protocol):
    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]: ...

    @property
    def dialect(self) -> str: ...


def _decode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in JSON_COLUMNS and isinstance(value, str | bytes):
        return json.loads(value)
    if name in TIME_COLUMNS:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _records(names: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[dict[str, Any]]:
    columns = list(names)
    return [
        {name: _decode(name, value) for name, value in zip(columns, row, strict=True)}
        for row in rows
    ]


def render(sql: str, dialect: str, params: dict[str, Any]) -> tuple[str, Any]:
    """``:name`` parameters in the driver's style; lists expand for ``IN``."""
    values: dict[str, Any] = {}

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        value = params[name]
        names = [name]
        if isinstance(value, list | tuple | set | frozenset):
            names = [f"{name}_{n}" for n in range(len(value))] or [f"{name}_none"]
            values.update(zip(names, value, strict=False))
            if not value:
                values[names[0]] = None  # IN (NULL): matches nothing
        else:
            values[name] = value
        if dialect == "postgresql":
            return ", ".join(f"%({n})s" for n in names)
        return ", ".join(f":{n}" for n in names)

    return _PARAMETER.sub(one, sql), values


class DriverReader:
    """A read-only connection of the database driver itself."""

    def __init__(self, connection: Any, dialect: str) -> None:
        self.connection = connection
        self._dialect = dialect

    @property
    def dialect(self) -> str:
        return self._dialect

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        text, values = render(sql, self._dialect, params)
        cursor = self.connection.cursor()
        try:
            cursor.execute(text, values)
            names = [column[0] for column in cursor.description or ()]
            return _records(names, cursor.fetchall())
        finally:
            cursor.close()


class SessionReader:
    """The same queries through a SQLAlchemy session's connection."""

    def __init__(self, db: Any) -> None:
        self.db = db

    @property
    def dialect(self) -> str:
        return str(self.db.get_bind().dialect.name)

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        text, values = render(sql, self.dialect, params)
        result = self.db.connection().exec_driver_sql(text, values)
        return _records(result.keys(), result.fetchall())


def reader_of(source: Any) -> Reader:
    """A reader for ``source``: a reader already, or a SQLAlchemy session."""
    return source if hasattr(source, "rows") else SessionReader(source)


def _sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL; None for another database."""
    if not url.startswith("sqlite:"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path.split("?", 1)[0]) if path and path != ":memory:" else None


def _postgresql_conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (``postgresql+psycopg://`` → ``postgresql://``)."""
    return "postgresql://" + url.split("://", 1)[1]


@contextmanager
def opened(url: str) -> Iterator[DriverReader]:
    """A read-only reader on the database at ``url``, schema unchecked.
    Raises :class:`StoreNotReadyError` when it cannot be opened."""
    from scheduler.redact import hide_secrets, mask

    path = _sqlite_file(url)
    if url.startswith("sqlite:"):
        if path is None or not path.is_file():
            raise StoreNotReadyError(
                f"no store at {path or url}: run `dcm-scheduler init-db` first, "
                "or point DCM_HOME / DCM_DATABASE_URL at an existing store"
            )
        import sqlite3

        try:
            connection: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise StoreNotReadyError(f"cannot read the store at {path}: {exc}") from exc
        reader = DriverReader(connection, "sqlite")
        failure: Any = sqlite3.Error
    else:
        import psycopg

        try:
            connection = psycopg.connect(_postgresql_conninfo(url), connect_timeout=10)
        except psycopg.Error as exc:
            reason = hide_secrets(str(exc).strip().splitlines()[0], url)
            raise StoreNotReadyError(f"cannot read the store at {mask(url)}: {reason}") from exc
        connection.read_only = True
        connection.autocommit = True
        reader = DriverReader(connection, "postgresql")
        failure = psycopg.Error
    try:
        yield reader
    except failure as exc:  # a damaged file, a server gone mid-read
        reason = hide_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else "", url)
        raise StoreNotReadyError(
            f"the store at {mask(url)} answered: {reason or type(exc).__name__}"
        ) from exc
    finally:
        connection.close()


@contextmanager
def connect(url: str) -> Iterator[DriverReader]:
    """:func:`opened`, and the store checked to have the schema this code
    needs (:func:`check_schema`)."""
    from scheduler.redact import mask

    with opened(url) as reader:
        check_schema(reader, mask(url))
        yield reader


def store_revision(url: str) -> str | None:
    """The schema revision of the store at ``url``; None when there is no
    store or no schema yet. Creates nothing."""
    if url.startswith("sqlite:") and not (_sqlite_file(url) or Path()).is_file():
        return None
    with opened(url) as reader:
        return schema_revision(reader)


def schema_revision(reader: Reader) -> str | None:
    """The store's Alembic revision; None when it has no schema."""
    if reader.dialect == "sqlite":
        found = reader.rows(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        )
    else:
        found = reader.rows("SELECT to_regclass('alembic_version') AS name")
        found = [row for row in found if row["name"]]
    if not found:
        return None
    rows = reader.rows("SELECT version_num FROM alembic_version")
    return str(rows[0]["version_num"]) if rows else None


def check_schema(reader: Reader, shown: str) -> None:
    """Raise :class:`StoreNotReadyError` unless the store is at this code's schema."""
    from scheduler.store.schema import SCHEMA_HEAD

    revision = schema_revision(reader)
    if revision is None:
        raise StoreNotReadyError(f"the store at {shown} has no schema: run `dcm-scheduler init-db`")
    if revision != SCHEMA_HEAD:
        if revision.isdigit() and SCHEMA_HEAD.isdigit() and int(revision) > int(SCHEMA_HEAD):
            # A newer release upgraded the store: init-db of this one cannot help.
            raise StoreNotReadyError(
                f"the store at {shown} is at schema {revision}, newer than this version's "
                f"{SCHEMA_HEAD}: upgrade dcm-scheduler here too"
            )
        raise StoreNotReadyError(
            f"the store at {shown} is at schema {revision}, this version needs "
            f"{SCHEMA_HEAD}: run `dcm-scheduler init-db`"
        )
