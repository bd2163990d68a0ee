"""The raw-Celery baseline of ``bench.overhead``: a no-op task on a plain Celery app.

The fastest setup of raw Celery we know for this work, not the scheduler's
settings: Celery's defaults (acknowledge on receipt, no task events), JSON,
a prefetch multiplier of 16, Redis as broker and result backend (a group
followed by a task in a chain is a chord, which needs one). Its worker is
``celery -A bench.rawtasks worker -P solo|prefork -c 1 -Q rawbench``. The
task returns the time it finished, so the benchmark reads when the last
task of a canvas ended from its result.
"""

from __future__ import annotations

import os
import time

from celery import Celery

REDIS_URL = os.environ.get("DCM_BENCH_REDIS", "redis://127.0.0.1:6379/0")
QUEUE = "rawbench"

app = Celery("rawbench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=16,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop() -> float:
    return time.time()
