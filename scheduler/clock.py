"""Time as the scheduler stores and prints it: aware UTC, ISO 8601 with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``: the one form every output uses."""
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def live_after(heartbeat_interval: float, now: datetime | None = None) -> datetime:
    """Heartbeats older than this mean their worker is gone: three missed."""
    return (now or utcnow()) - timedelta(seconds=3 * heartbeat_interval)
