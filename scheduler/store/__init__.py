"""The store: SQLAlchemy models, sessions and Alembic migrations."""

from scheduler.store.db import dispose_engines, get_engine, init_db, transaction

__all__ = ["dispose_engines", "get_engine", "init_db", "transaction"]
