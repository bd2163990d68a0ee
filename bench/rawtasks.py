"""The raw-Celery baseline of ``bench.overhead``: a no-op task on a plain Celery app.

Two sets of settings, chosen by ``DCM_BENCH_RAW_SETTINGS`` in the worker's
environment, each on its own queue so their workers never take each other's
messages:

- ``fastest`` (queue ``rawbench``): the fastest setup of raw Celery we know
  for this work — Celery's defaults (acknowledge on receipt, no task events)
  and a prefetch multiplier of 16.
- ``scheduler`` (queue ``rawbench-late``): the delivery guarantees the
  scheduler runs with and a raw deployment with the same guarantees needs
  too — acknowledge late, reject when the worker is lost, prefetch one
  message at a time (README, "Configuration"); task events off, as ours are
  until Flower turns them on.

Both use JSON and Redis as broker and result backend (a group followed by a
task in a chain is a chord, which needs one). The workers are ``celery -A
bench.rawtasks worker -P solo|prefork -c 1 -Q <queue>``. The task returns the
time it finished, so the benchmark reads when the last task of a canvas
ended from its result.
"""

from __future__ import annotations

import os
import time

from celery import Celery

REDIS_URL = os.environ.get("DCM_BENCH_REDIS", "redis://127.0.0.1:6379/0")
QUEUES = {"fastest": "rawbench", "scheduler": "rawbench-late"}
SETTINGS = os.environ.get("DCM_BENCH_RAW_SETTINGS", "fastest")

app = Celery("rawbench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUES["fastest"],
    worker_prefetch_multiplier=16,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)
if SETTINGS == "scheduler":
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=False,
    )


@app.task(name="bench.noop")
def noop() -> float:
    return time.time()
