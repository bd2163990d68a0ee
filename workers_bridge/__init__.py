"""The worker side of the scheduler: runs one job, records its status and
releases its dependents. ``workers_bridge.run_job`` is the Celery task."""
