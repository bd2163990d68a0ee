"""The store: SQLAlchemy models and transactions (:mod:`.db`, :mod:`.models`),
Alembic migrations, and plain-SQL reading for the listings (:mod:`.reader`)."""
