"""Figure 6: resident memory of one job worker before and after 10,000 jobs.

One real worker, ``celery -A scheduler worker -P prefork -c 1 -Q default``
(a subprocess of this script), on PostgreSQL and Redis (database 0). This
process plans ``--jobs``/5 sessions of 5 independent no-op jobs with
``plan_session`` (so every job is sent at planning) and waits for them to
finish. RSS (psutil) is read for the pool process — the one that runs
``workers_bridge.run_job`` and forks each attempt — and for the worker's
main process:

- ``before``: worker ready, no job run yet;
- ``warm``: after the first 100 jobs (imports, connection pools and caches
  in place);
- ``after``: after all jobs.

The figure is the pool process's growth from ``before`` to ``after``; the
growth from ``warm`` is reported with it (the part that would keep growing).

    python -m bench.memory [--jobs 10000]
"""

from __future__ import annotations

import argparse
import time

import psutil

from bench.common import (
    bench_store,
    celery_worker,
    emit,
    log,
    machine,
    manual_sessions,
    record_study,
    stop,
    worker_ready,
)
from scheduler import testing

TARGET_MB = 20.0
STUDY = "1.2.826.0.1.3680043.60.1"
HOSTNAME = "bench-memory@localhost"
WARM_JOBS = 100


def run_sessions(count: int) -> None:
    from sqlalchemy import func, select

    from scheduler.sessions import plan_session
    from scheduler.store.db import transaction
    from scheduler.store.models import SchedulingSession

    ids = manual_sessions(STUDY, count)
    for session_id in ids:
        planned = plan_session(session_id)
        assert planned is not None and len(planned.ready) == 5

    def done() -> bool:
        with transaction() as db:
            running = db.scalar(
                select(func.count())
                .select_from(SchedulingSession)
                .where(SchedulingSession.status.in_(["planning", "running"]))
            )
        return running == 0

    testing.wait_until(done, 3600, "the sessions to end", interval=0.5)
    with transaction() as db:
        failed = db.scalar(
            select(func.count())
            .select_from(SchedulingSession)
            .where(SchedulingSession.status != "succeeded")
        )
    assert failed == 0, f"{failed} sessions did not succeed"


def rss(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    args = parser.parse_args()
    with bench_store("dcm_bench_memory") as (home, values, settings):
        from scheduler.presence import record_presence
        from scheduler.store.db import transaction

        testing.noop_service(
            settings.services_path[0],
            [{"jobName": f"job{n}", "workerEntry": testing.NOOP} for n in range(5)],
        )
        record_study(STUDY)
        with transaction() as db:  # planning warns about no worker otherwise
            record_presence(db, "bench-memory-planner@localhost", ["default"])
        worker = celery_worker(
            "default", hostname=HOSTNAME, env=values, logfile=home / "worker.log"
        )
        try:
            worker_ready(HOSTNAME)
            time.sleep(1.0)
            main_process = psutil.Process(worker.pid)
            (pool,) = main_process.children()
            before = {"pool": rss(pool), "main": rss(main_process)}
            run_sessions(WARM_JOBS // 5)
            warm = {"pool": rss(pool), "main": rss(main_process)}
            begin = time.perf_counter()
            run_sessions((args.jobs - WARM_JOBS) // 5)
            elapsed = time.perf_counter() - begin
            after = {"pool": rss(pool), "main": rss(main_process)}
            assert pool.is_running() and pool in main_process.children(), "pool replaced"
        finally:
            stop(worker)
        log(f"{args.jobs} jobs in {elapsed:.0f}s; rss {before} -> {warm} -> {after}")
    growth = after["pool"] - before["pool"]
    emit(
        "memory.worker_rss_growth",
        growth,
        "MB",
        {
            "jobs": args.jobs,
            "worker": "celery -A scheduler worker -P prefork -c 1 (subprocess)",
            "measured": "pool process (runs run_job, forks each attempt)",
            "store": "postgresql",
            "broker": "redis",
            **machine(),
        },
        baseline={"name": "rss_before", "value": round(before["pool"], 1), "unit": "MB"},
        target=f"< {TARGET_MB:g} MB",
        met=growth < TARGET_MB,
        rss_before_mb=round(before["pool"], 1),
        rss_warm_mb=round(warm["pool"], 1),
        rss_after_mb=round(after["pool"], 1),
        growth_after_warm_up_mb=round(after["pool"] - warm["pool"], 1),
        main_process_rss_mb=[
            round(before["main"], 1),
            round(warm["main"], 1),
            round(after["main"], 1),
        ],
        jobs_per_second=round((args.jobs - WARM_JOBS) / elapsed, 1),
    )


if __name__ == "__main__":
    main()
