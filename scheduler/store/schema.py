"""The schema this code needs: the newest Alembic migration.

A test keeps it equal to Alembic's head, so reading commands can check the
store's schema without loading Alembic.
"""

SCHEMA_HEAD = "0006"
