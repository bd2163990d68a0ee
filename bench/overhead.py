"""Figure 3: scheduler overhead against raw Celery, and the cost of the fork per attempt.

200 sessions of a 6-job DAG (a ``pre`` job, a diamond ``a → b, c → d`` and a
``post`` job) whose workers do nothing, run by one real worker process
(``celery -A scheduler worker -P prefork -c 1 -Q default -I bench.rawtasks``,
started by this script) on PostgreSQL and Redis (database 0). The sessions
are planned first (rows written, nothing sent); the clock starts when their
200 ready ``pre`` jobs are sent (``scheduler.messages.send_jobs``) and stops
at the latest ``finished_at`` of their 1,200 jobs.

The baseline, in the same run, on the same broker, queue and worker: the
same DAG as a plain Celery canvas of a no-op task (``bench.rawtasks.noop``),
``chain(noop.si(), noop.si(), group(noop.si(), noop.si()), noop.si(),
noop.si())`` per session, 200 of them sent back to back, with no store and
no bookkeeping; its group-then-task step is a chord, so the worker runs with
a Redis result backend (database 0), which our job tasks ignore. Its clock
stops at the time the last task returned. Ours and raw alternate
``--rounds`` times; the figure is the ratio of the medians.

Also measured: one attempt of a no-op job through
``workers_bridge.process.execute`` (fork, wait, read the response) against
calling the worker function in-process (``workers_bridge.child.run``), in
this process, which has the same modules loaded as a worker.

    python -m bench.overhead [--sessions 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REDIS_URL,
    celery_worker,
    create_database,
    diamond_jobs,
    drop_database,
    emit,
    flush_redis,
    log,
    machine,
    manual_sessions,
    median,
    record_study,
    stop,
    worker_ready,
)
from scheduler import testing

TARGET_RATIO = 1.5
STUDY = "1.2.826.0.1.3680043.30.1"
HOSTNAME = "bench-overhead@localhost"


def plan_without_sending(session_ids: list[str]) -> list[str]:
    """Write the plans of the sessions; return their ready job ids, unsent."""
    from scheduler.emission import store_plan
    from scheduler.sessions import decide_for
    from scheduler.store.db import transaction

    ready: list[str] = []
    for session_id in session_ids:
        result, headers = decide_for("study", STUDY, "study.stable", session_id=session_id)
        with transaction() as db:
            ids = store_plan(db, session_id, result, headers)
        assert ids is not None and len(ids) == 1
        ready.extend(ids)
    return ready


def run_ours(sessions: int) -> dict[str, float]:
    from sqlalchemy import func, select

    from scheduler.messages import send_job_ids
    from scheduler.store.db import transaction
    from scheduler.store.models import Job, SchedulingSession

    ids = manual_sessions(STUDY, sessions)
    ready = plan_without_sending(ids)
    began = time.time()
    sent = send_job_ids(ready)
    assert sent == sessions

    def done() -> bool:
        with transaction() as db:
            open_sessions = db.scalar(
                select(func.count())
                .select_from(SchedulingSession)
                .where(SchedulingSession.id.in_(ids), SchedulingSession.status == "running")
            )
        return open_sessions == 0

    testing.wait_until(done, 1800, "our sessions to end", interval=0.1)
    with transaction() as db:
        rows = db.execute(
            select(Job.status, Job.started_at, Job.finished_at).where(Job.session_id.in_(ids))
        ).all()
    assert all(status == "succeeded" for status, *_ in rows), {s for s, *_ in rows}
    last = max(finished for _, _, finished in rows).timestamp()
    durations = [(f - s).total_seconds() * 1000 for _, s, f in rows]
    return {
        "seconds": last - began,
        "jobs": len(rows),
        "job_ms_median": statistics.median(durations),
    }


def run_raw(sessions: int) -> dict[str, float]:
    from celery import chain, group

    from bench.rawtasks import noop

    def canvas() -> Any:
        return chain(noop.si(), noop.si(), group(noop.si(), noop.si()), noop.si(), noop.si())

    began = time.time()
    results = [canvas().apply_async() for _ in range(sessions)]
    testing.wait_until(lambda: all(r.ready() for r in results), 1800, "raw canvases", interval=0.1)
    last = max(float(r.get(timeout=10)) for r in results)
    for result in results:
        result.forget()
    return {"seconds": last - began, "jobs": sessions * 6}


def fork_cost(attempts: int, services: Path) -> dict[str, float]:
    """Milliseconds per no-op attempt: forked child vs an in-process call."""
    from workers_bridge import child
    from workers_bridge.process import execute

    testing.noop_service(services, [])
    request = {
        "entry": testing.NOOP,
        "roots": [str(services / "noop")],
        "job_name": "noop",
        "headers": {},
        "params": {},
        "added_params": {},
        "kwargs": {},
    }
    assert execute(request, timeout=60).ok
    forked = []
    for _ in range(attempts):
        begin = time.perf_counter()
        execute(request, timeout=60)
        forked.append((time.perf_counter() - begin) * 1000)
    inline = []
    for _ in range(attempts):
        begin = time.perf_counter()
        child.run(request)
        inline.append((time.perf_counter() - begin) * 1000)
    return {"forked_ms": median(forked), "inline_ms": median(inline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attempts", type=int, default=300, help="attempts for the fork cost")
    args = parser.parse_args()
    name = "dcm_bench_overhead"
    url = create_database(name)
    with tempfile.TemporaryDirectory(prefix="dcm-bench-overhead-") as tmp:
        home = Path(tmp)
        values = testing.environment_values(home, url, REDIS_URL) | {
            "CELERY_RESULT_BACKEND": REDIS_URL
        }
        with testing.using_environment(values) as settings:
            from scheduler.store.db import init_db

            init_db(url)
            flush_redis()
            testing.noop_service(settings.services_path[0], diamond_jobs())
            record_study(STUDY)
            worker = celery_worker(
                "default",
                hostname=HOSTNAME,
                include="bench.rawtasks",
                env=values,
                logfile=home / "worker.log",
            )
            try:
                worker_ready(HOSTNAME)
                run_raw(10)  # warm-up: imports, connections, first forks
                run_ours(10)
                ours, raw = [], []
                for round_ in range(args.rounds):
                    raw.append(run_raw(args.sessions))
                    ours.append(run_ours(args.sessions))
                    log(
                        f"round {round_ + 1}: ours {ours[-1]['seconds']:.2f}s, "
                        f"raw {raw[-1]['seconds']:.2f}s"
                    )
            finally:
                stop(worker)
            forks = fork_cost(args.attempts, home / "fork-cost")
        flush_redis()
    drop_database(name)

    ours_s = median([o["seconds"] for o in ours])
    raw_s = median([r["seconds"] for r in raw])
    jobs = args.sessions * 6
    params = {
        "sessions": args.sessions,
        "jobs": jobs,
        "dag": "pre -> a -> (b, c) -> d -> post",
        "worker": "celery -A scheduler worker -P prefork -c 1 (subprocess)",
        "rounds": args.rounds,
        "statistic": "median",
        "store": "postgresql",
        "broker": "redis",
        **machine(),
    }
    emit(
        "overhead.raw_canvas",
        raw_s,
        "s",
        params,
        samples=[round(r["seconds"], 2) for r in raw],
        jobs_per_second=round(jobs / raw_s, 1),
    )
    emit(
        "overhead.scheduler",
        ours_s,
        "s",
        params,
        samples=[round(o["seconds"], 2) for o in ours],
        jobs_per_second=round(jobs / ours_s, 1),
        job_ms_median=round(median([o["job_ms_median"] for o in ours]), 2),
    )
    ratio = ours_s / raw_s
    emit(
        "overhead.ratio",
        ratio,
        "ratio",
        params,
        baseline={"name": "overhead.raw_canvas", "value": round(raw_s, 3), "unit": "s"},
        target=f"<= {TARGET_RATIO:g}x",
        met=ratio <= TARGET_RATIO,
    )
    per_job_fork = forks["forked_ms"] - forks["inline_ms"]
    emit(
        "overhead.fork_per_attempt",
        per_job_fork,
        "ms",
        {"attempts": args.attempts, "statistic": "median", **machine()},
        forked_ms=round(forks["forked_ms"], 3),
        inline_ms=round(forks["inline_ms"], 3),
        share_of_scheduler_time=round(per_job_fork * jobs / 1000 / ours_s, 3),
    )


if __name__ == "__main__":
    main()
