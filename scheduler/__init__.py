"""dcm-processor job scheduler: detects stable DICOM candidates, plans the
services' jobs and runs them as Celery tasks. ``app`` is the Celery app, so
``celery -A scheduler worker|beat|flower`` works.

The app is imported on first use: commands and processes that never send or
consume a message (listings, the callback host) do not pay for Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from scheduler.celery_app import app

        return app
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
