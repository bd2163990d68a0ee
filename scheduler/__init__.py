"""Scheduler package; the Celery app is exposed as `app` once defined."""
