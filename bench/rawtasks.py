"""The raw-Celery baseline of ``bench.overhead``: a no-op task on the scheduler's app.

Loaded into the benchmark's worker with ``celery -A scheduler worker -I
bench.rawtasks``. It returns the time it finished, so the benchmark reads
when the last task of a canvas ended from its result (the baseline needs a
result backend anyway: a group followed by a task in a chain is a chord).
"""

from __future__ import annotations

import time

from scheduler.celery_app import app


@app.task(name="bench.noop", ignore_result=False)
def noop() -> float:
    return time.time()
