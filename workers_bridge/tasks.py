"""The Celery task that runs one job: ``workers_bridge.run_job``.

``acks_late`` with ``reject_on_worker_lost``: a message is acknowledged only
after the job's outcome is stored, so a worker that dies mid-job leaves the
message to be delivered again; the atomic claim makes any duplicate a no-op.
Results are ignored: job state and results live in the store. Importing this
module (the app includes it) also gives every worker its heartbeat.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from scheduler.celery_app import app
from scheduler.messages import RUN_JOB
from workers_bridge import heartbeat, process, runner

heartbeat.install(app)


@signals.worker_process_shutdown.connect
def _close_fork_servers(**_kwargs: Any) -> None:
    """A pool process ends without the handlers that close its fork servers
    at exit: it closes them here, as the worker stops, so their attempt
    folders go with them and are not left to the next worker's start."""
    process.close_servers()


@app.task(
    name=RUN_JOB,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_job(self: Any, job_id: str) -> str | None:
    return runner.run_job(job_id, hostname=self.request.hostname)
