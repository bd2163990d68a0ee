"""What one Prometheus scrape of ``GET /metrics`` costs on a big store.

A store of ``--sessions`` finished sessions (10,000 by default) with five
jobs each (50,000 jobs, over 10 job names and 2 channels), each job with one
or two attempt-log entries, each session with a trace of its callbacks'
timings, plus ``--instances`` instances (100,000), 200 queued jobs (half
of them for a closed off-peak window) and 20 workers, is bulk-loaded;
one session in 20 is urgent, one in 4 belongs to one of 3 cohort runs, and
the ``gpu`` channel is paused. Then the collector of ``scheduler.metrics``
runs as a scrape runs it (``generate_latest`` over its registry). The figure is
the median of ``--runs`` scrapes after one warm-up, per backend, with the
size of the exposition.

    python -m bench.metrics_scrape [--sessions 10000] [--backends postgresql,sqlite]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from bench.common import create_database, drop_database, emit, log, machine, median
from scheduler import testing

JOBS_PER_SESSION = 5
JOB_NAMES = 10
QUEUED = 200
WORKERS = 20


def generate(url: str, sessions: int, instances: int) -> None:
    """Bulk-load the store (see the module docstring)."""
    from sqlalchemy import insert, text

    from scheduler.store.db import get_engine
    from scheduler.store.models import (
        Instance,
        Job,
        Patient,
        PausedChannel,
        SchedulingSession,
        Series,
        Study,
        Worker,
    )

    now = datetime.now(UTC)
    start = now - timedelta(days=30)
    resource = {
        "instance_count": instances,
        "first_received_at": start,
        "last_received_at": start,
        "state": "stable",
    }
    with get_engine(url).begin() as db:
        db.execute(insert(Patient), [{"id": 1, "patient_id": "BENCH", **resource}])
        db.execute(insert(Study), [{"id": 1, "study_uid": "1.2", "patient_pk": 1, **resource}])
        db.execute(insert(Series), [{"id": 1, "series_uid": "1.2.3", "study_pk": 1, **resource}])
        db.execute(
            insert(Instance),
            [
                {
                    "id": n,
                    "sop_uid": f"1.2.3.{n}",
                    "series_pk": 1,
                    "tags": {},
                    "received_at": start + timedelta(seconds=n),
                }
                for n in range(1, instances + 1)
            ],
        )
        session_rows, job_rows = [], []
        for s in range(sessions):
            created = start + timedelta(seconds=s * 60)
            session_id = f"s-{s:08d}"
            names = [f"job-{(s + j) % JOB_NAMES}" for j in range(JOBS_PER_SESSION)]
            session_rows.append(
                {
                    "id": session_id,
                    "event": "study.stable",
                    "level": "study",
                    "uid": f"1.2.{s}",
                    "fingerprint": str(s),
                    "last_instance_id": 1 + s % instances,
                    "trace": {
                        "event": "study.stable",
                        "jobs": {n: {"scheduled": True, "reason": "ok"} for n in names},
                        "callback_s": {n: 0.01 * (1 + j) for j, n in enumerate(names[:3])},
                        "planning_s": 0.05,
                    },
                    "status": "partial" if s % 10 == 0 else "succeeded",
                    "urgent": s % 20 == 1,
                    "cohort": f"cohort-{s % 3}" if s % 4 == 3 else None,
                    "created_at": created,
                    "planned_at": created + timedelta(seconds=1),
                    "finished_at": created + timedelta(seconds=50),
                }
            )
            for j, name in enumerate(names):
                failed = s % 10 == 0 and j == 0
                started = created + timedelta(seconds=2 + j)
                log_entry = {"status": "failed" if failed else "succeeded", "attempt": 1}
                job_rows.append(
                    {
                        "id": f"{session_id}-{j}",
                        "session_id": session_id,
                        "created_seq": j,
                        "job_name": name,
                        "service": f"service-{(s + j) % 3}",
                        "worker_entry": "bench:work",
                        "channel": "gpu" if j == 4 else "default",
                        "status": "failed" if failed else "succeeded",
                        "attempts": 2 if s % 7 == 0 else 1,
                        "attempt_log": [log_entry, log_entry] if s % 7 == 0 else [log_entry],
                        "created_at": created,
                        "dispatched_at": started - timedelta(seconds=0.5),
                        "started_at": started,
                        "finished_at": started + timedelta(seconds=10 + j),
                    }
                )
        for q in range(QUEUED):
            job_rows.append(
                {
                    "id": f"queued-{q}",
                    "session_id": session_rows[-1]["id"],
                    "created_seq": JOBS_PER_SESSION + q,
                    "job_name": f"queued-{q}",
                    "service": "service-0",
                    "worker_entry": "bench:work",
                    "channel": "gpu" if q % 2 else "default",
                    "status": "queued",
                    "attempts": 0,
                    "attempt_log": [],
                    "created_at": now,
                    # Half held back by an off-peak window, never sent.
                    "window": f"{(now.hour + 2) % 24:02d}:00-{(now.hour + 3) % 24:02d}:00"
                    if q % 2
                    else None,
                    "dispatched_at": None if q % 2 else now,
                    "started_at": None,
                    "finished_at": None,
                }
            )
        db.execute(insert(SchedulingSession), session_rows)
        db.execute(insert(Job), job_rows)
        db.execute(
            insert(Worker),
            [
                {"hostname": f"w{n}@bench", "channels": {"default": True}, "last_heartbeat": now}
                for n in range(WORKERS)
            ],
        )
        db.execute(insert(PausedChannel), [{"channel": "gpu", "paused_at": now}])
        db.execute(text("ANALYZE"))


def measure(backend: str, sessions: int, instances: int, runs: int, folder: Path) -> None:
    from scheduler.metrics import StoreCollector
    from scheduler.store.db import init_db

    name = f"dcm_bench_metrics_{sessions}"
    url = create_database(name) if backend == "postgresql" else f"sqlite:///{folder / f'{name}.db'}"
    values = testing.environment_values(folder / f"home-{backend}", url, "memory://")
    values["DCM_TIMEZONE"] = "UTC"  # the windows of the queued jobs are on UTC
    try:
        with testing.using_environment(values):
            init_db(url)
            began = time.perf_counter()
            generate(url, sessions, instances)
            log(f"{backend}: store generated in {time.perf_counter() - began:.1f}s")
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StoreCollector())
            timings, body = [], b""
            for index in range(runs + 1):
                began = time.perf_counter()
                body = generate_latest(registry)
                if index:  # the first scrape warms caches up
                    timings.append((time.perf_counter() - began) * 1000)
    finally:
        if backend == "postgresql":
            drop_database(name)
    samples = sum(1 for line in body.decode().splitlines() if not line.startswith("#"))
    emit(
        "metrics.scrape",
        median(timings),
        "ms",
        {
            "backend": backend,
            "sessions": sessions,
            "jobs": sessions * JOBS_PER_SESSION + QUEUED,
            "instances": instances,
            "runs": runs,
            "statistic": "median",
            **machine(),
        },
        samples=samples,
        bytes=len(body),
        max_ms=round(max(timings), 1),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        for backend in args.backends.split(","):
            measure(backend, args.sessions, args.instances, args.runs, Path(folder))


if __name__ == "__main__":
    main()
