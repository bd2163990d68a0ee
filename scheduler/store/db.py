"""Engines, session scopes and schema upgrades of the store.

One engine per database URL and process. SQLite (the embedded default) runs
in WAL mode with a busy timeout and takes the write lock at ``BEGIN`` so two
processes never deadlock upgrading a read lock; PostgreSQL needs nothing
special. Code opens explicit scopes: ``with transaction() as s: ...``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeGuard, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, bindparam, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from scheduler.config import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# What runs statements: an ORM session, or a plain connection on the per-job
# path (:func:`statements`).
Executor = Session | Connection

_engines: dict[tuple[str, int], Engine] = {}
_lock = threading.Lock()

MIGRATIONS = Path(__file__).parent / "migrations"
# On the per-job path, a pooled PostgreSQL connection idle longer than this
# is tested before use (elsewhere, every time).
PING_AFTER_IDLE = 1.0


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    """psycopg 3 turns a statement run five times into a server-side prepared
    statement, and PostgreSQL may then settle on one generic plan chosen for
    the table as it was at that moment. A store that starts empty and fills
    fast (a first import) kept a sequential-scan plan on a table of thousands
    of rows: ingest ran 2.5 times slower. Custom plans, made at each execution
    for the table as it is, keep the parsing saved by preparing (turning
    preparing off instead cost planning 12 %). Set per connection with SET,
    so ``PGOPTIONS`` and poolers that refuse startup options are unaffected.
    The per-job statements, which find every row by a key, switch back to
    PostgreSQL's default for their own round trips (:mod:`scheduler.store.jobs_pg`)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        version = getattr(getattr(dbapi_connection, "info", None), "server_version", 0)
        if version < 120000:  # plan_cache_mode is PostgreSQL 12+
            return
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute("SET plan_cache_mode = force_custom_plan")
        cursor.close()
        dbapi_connection.autocommit = autocommit


# Set while :func:`statements` takes its connection from the pool.
_per_job = threading.local()


def _ping_when_idle(engine: Engine) -> None:
    """Test a pooled connection before use (a database restart or a firewall
    may have closed it meanwhile) — except on the per-job path
    (:func:`statements`) when it was in use within the last second: a
    worker running job after job saves the round trip, and a connection lost
    anyway fails its statement as a disconnect, which that path retries
    (:func:`retrying`) on a new connection."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None:
            return  # just connected
        if getattr(_per_job, "active", False) and time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            # Outside a transaction: a ROLLBACK would also make psycopg drop
            # the statements it prepared on this connection (DEALLOCATE ALL).
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_connection.autocommit = autocommit
        except Exception as exc:
            raise DisconnectionError(f"pooled connection lost: {exc}") from exc


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: ``DCM_DATABASE_URL``), created once per process."""
    url = url or get_settings().database_url
    key = (url, os.getpid())  # never share pooled connections across a fork
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                engine = create_engine(url, connect_args={"timeout": 30})
                _configure_sqlite(engine)
            else:
                engine = create_engine(url, pool_size=5, max_overflow=10)
                _ping_when_idle(engine)
                if parsed.get_driver_name() == "psycopg":
                    _configure_postgresql(engine)
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and after a database URL change)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def statements(url: str | None = None, *, each_alone: bool = False) -> Iterator[Connection]:
    """A transaction on a plain connection, for the statements every job runs
    (its claim, its ending): there an ORM session's bookkeeping costs more
    than the statements themselves. Committed when the block ends.

    ``each_alone``: on PostgreSQL, each statement is a transaction of its
    own (autocommit), for a block whose statements need no atomicity
    together — a claim is one ``UPDATE``. That saves the round trips of
    ``BEGIN`` and ``COMMIT``. SQLite keeps one transaction."""
    engine = get_engine(url)
    _per_job.active = True
    try:
        connection = engine.connect()
    finally:
        _per_job.active = False
    if each_alone and engine.dialect.name == "postgresql":
        with connection:
            try:
                yield connection.execution_options(isolation_level="AUTOCOMMIT")
            except BaseException:
                _drop_if_lost(connection)
                raise
        return
    with connection, connection.begin():
        yield connection


def _drop_if_lost(connection: Connection) -> None:
    """Take a connection the server dropped out of the pool before it goes
    back. SQLAlchemy does so itself when its own statement fails, but not
    when one sent through psycopg directly did (:mod:`.jobs_pg`): the pool's
    reset of a lost connection then logged an error with a traceback at
    every database restart, for nothing."""
    if connection.invalidated:
        return  # SQLAlchemy saw it: its own statement failed
    if getattr(connection.connection.driver_connection, "broken", False):
        connection.invalidate()


def bound(name: str, column: Any) -> Any:
    """A parameter ``name`` typed as ``column``, bound at execution: for the
    statements built once and run for every job or session."""
    return bindparam(name, type_=column.type)


def on_psycopg(db: Executor) -> TypeGuard[Connection]:
    """Whether ``db`` is a plain connection through psycopg, where the
    statements every job and every plan run go through psycopg itself
    (:mod:`scheduler.store.pipelines`)."""
    return isinstance(db, Connection) and db.dialect.driver == "psycopg"


def dialect_name(db: Executor) -> str:
    """``postgresql`` or ``sqlite``."""
    bind = db if isinstance(db, Connection) else db.get_bind()
    return str(bind.dialect.name)


@contextmanager
def transaction(url: str | None = None) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on error."""
    db = session_factory(url)()
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def alembic_config(url: str | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option(
        "sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%")
    )
    return config


def init_db(url: str | None = None) -> str:
    """Create or upgrade the schema to the newest migration; returns its revision."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    path = sqlite_path(url or get_settings().database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = get_engine(url)
    config = alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision() or ""


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for other databases and in-memory ones)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def insert_for(db: Executor) -> Any:
    """``insert`` of the session's dialect, for ``ON CONFLICT`` clauses."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if dialect_name(db) == "postgresql" else sqlite.insert


def rowcount(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE (typed ``Result`` hides ``rowcount``)."""
    return int(cast(CursorResult[Any], result).rowcount)


TRANSIENT = (OperationalError, InterfaceError)
# What psycopg itself raises for a lost connection, a server shutting down, a
# deadlock: the per-job statements (scheduler/store/jobs_pg.py) run on the
# driver's cursors, where SQLAlchemy does not wrap its errors.
DRIVER_TRANSIENT: tuple[type[Exception], ...] = ()
with contextlib.suppress(ImportError):
    import psycopg

    DRIVER_TRANSIENT = (psycopg.OperationalError,)
RETRIED: tuple[type[Exception], ...] = (DBAPIError, *DRIVER_TRANSIENT)
_ANY_TRANSIENT = TRANSIENT + DRIVER_TRANSIENT


def is_transient(error: BaseException) -> bool:
    """A database error worth retrying: connection lost, server restarting,
    SQLite busy. Integrity and programming errors are not."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, _ANY_TRANSIENT)


def retrying(
    operation: Callable[[], T], *, what: str, patience: float = 120.0, first_wait: float = 0.2
) -> T:
    """Run ``operation`` again while the store is briefly unavailable.

    Waits double from ``first_wait`` up to 5 s, for ``patience`` seconds in
    all; then the last error is raised. Used where losing the outcome would
    cost more than waiting (recording a finished job, claiming one).
    """
    deadline = time.monotonic() + patience
    wait = first_wait
    while True:
        try:
            return operation()
        except RETRIED as exc:
            if not is_transient(exc) or time.monotonic() + wait > deadline:
                raise
            cause = getattr(exc, "orig", None) or exc
            log.warning(
                "store unavailable while %s (%s); retrying in %.1fs",
                what,
                type(cause).__name__,
                wait,
            )
            time.sleep(wait)
            wait = min(wait * 2, 5.0)
