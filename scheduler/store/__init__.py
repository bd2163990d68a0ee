"""The store: SQLAlchemy models, sessions and Alembic migrations."""

from scheduler.store.db import dispose_engines, get_engine, init_db, session_scope

__all__ = ["dispose_engines", "get_engine", "init_db", "session_scope"]
