"""dcm-processor job scheduler: detects stable DICOM candidates, plans the
services' jobs and runs them as Celery tasks. ``app`` is the Celery app, so
``celery -A scheduler worker|beat|flower`` works."""

from scheduler.celery_app import app

__all__ = ["app"]
