"""Figure 3: per-job overhead of the scheduler against the fastest raw Celery setup.

200 sessions of a 6-job DAG (a ``pre`` job, a diamond ``a → b, c → d`` and a
``post`` job) whose workers do nothing, run by one real worker process
(``celery -A scheduler worker -P solo`` and ``-P prefork -c 1``, started by
this script) on PostgreSQL and Redis (database 0). The sessions are planned
first (rows written, nothing sent); the clock starts when their 200 ready
``pre`` jobs are sent (``scheduler.messages.send_jobs``) and stops at the
latest ``finished_at`` of their 1,200 jobs.

The baselines, in the same run, on the same broker: the same DAG as a plain
Celery canvas of a no-op task (``bench.rawtasks``), ``chain(noop.si(),
noop.si(), group(noop.si(), noop.si()), noop.si(), noop.si())`` per session,
200 of them sent back to back, in its own solo and prefork workers under two
sets of settings: the fastest we know (Celery's defaults, prefetch 16) and
the same delivery guarantees as ours (late acknowledgement, prefetch 1).
Its clock stops at the time the last task returned. Ours and raw alternate
``--rounds`` times per pool; ``overhead.ratio.<pool>`` is against the
fastest raw figure of all, ``overhead.ratio_same_guarantees.<pool>`` against
the faster pool of raw with our guarantees.

The split of one job's time (claim, attempt start, run, ending, publish) is
measured by running ``workers_bridge.runner.run_job`` in this process on
``--split-sessions`` more sessions; what a worker spends beyond it is
Celery's own work between tasks (receiving, acknowledging, events). With
the split, the CPU time per job of this process, of the PostgreSQL backends
and of the fork servers with their attempts (``cpu_ms_per_job``): on a
shared machine it moves far less than wall time.

    python -m bench.overhead [--sessions 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REDIS_URL,
    celery_worker,
    cpu_seconds_of,
    diamond_jobs,
    emit,
    flushed_redis,
    log,
    machine,
    manual_sessions,
    median,
    postgres_cpu_seconds,
    record_study,
    stop,
    throwaway_database,
    worker_ready,
)
from scheduler import testing

TARGET_RATIO = 3.0
GOAL_RATIO = 2.0
STUDY = "1.2.826.0.1.3680043.30.1"
POOLS = ("solo", "prefork")
# bench.rawtasks's two sets of settings, and the name of each one's figure.
RAW_SETTINGS = {"fastest": "overhead.raw_canvas", "scheduler": "overhead.raw_canvas_late_acks"}
# Ours against each: the fastest raw setup of all, and the fastest with the
# delivery guarantees the scheduler keeps (late acknowledgement, prefetch 1).
RATIOS = {"fastest": "overhead.ratio", "scheduler": "overhead.ratio_same_guarantees"}


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
        rows = db.execute(select(Job.status, Job.finished_at).where(Job.session_id.in_(ids))).all()
    assert all(status == "succeeded" for status, _ in rows), {s for s, _ in rows}
    last = max(finished for _, finished in rows).timestamp()
    return {"seconds": last - began, "jobs": len(rows)}


def run_raw(sessions: int, settings: str) -> dict[str, float]:
    from celery import chain, group

    from bench.rawtasks import QUEUES, noop

    def task() -> Any:
        return noop.si().set(queue=QUEUES[settings])

    def canvas() -> Any:
        return chain(task(), task(), group(task(), task()), task(), task())

    began = time.time()
    results = [canvas().apply_async() for _ in range(sessions)]
    testing.wait_until(lambda: all(r.ready() for r in results), 1800, "raw canvases", interval=0.1)
    last = max(float(r.get(timeout=10)) for r in results)
    for result in results:
        result.forget()
    return {"seconds": last - began, "jobs": sessions * 6}


def raw_worker(pool: str, settings: str, logfile: Path) -> subprocess.Popen[bytes]:
    from bench.rawtasks import QUEUES, app

    name = f"raw-{settings}-{pool}@localhost"
    worker = celery_worker(
        QUEUES[settings],
        pool=pool,
        hostname=name,
        env={"DCM_BENCH_RAW_SETTINGS": settings},
        logfile=logfile,
        extra=["--without-heartbeat"],
        app="bench.rawtasks",
    )
    testing.wait_until(
        lambda: app.control.ping(destination=[name], timeout=0.5), 60, f"worker {name}"
    )
    return worker


def run_split(sessions: int) -> dict[str, float]:
    """Median milliseconds of each part of a job, run in this process."""
    from sqlalchemy import select

    from scheduler.store.db import transaction
    from scheduler.store.models import Job
    from workers_bridge import runner

    ids = manual_sessions(STUDY, sessions)
    plan_without_sending(ids)
    splits: list[runner.Split] = []
    cpu = {"worker": 0.0, "postgres": 0.0, "attempts": 0.0}
    while True:
        with transaction() as db:
            ready = list(
                db.scalars(
                    select(Job.id).where(
                        Job.session_id.in_(ids), Job.status == "queued", Job.pending_deps == 0
                    )
                )
            )
        if not ready:
            break
        before = cpu_seconds()
        for job_id in ready:
            split = runner.Split()
            assert runner.run_job(job_id, "bench-split@localhost", split) == "succeeded"
            splits.append(split)
        for part, seconds in cpu_seconds().items():
            cpu[part] += seconds - before[part]
    parts = {
        part: median([getattr(split, part) * 1000 for split in splits])
        for part in ("claim", "start", "run", "ending", "publish")
    }
    parts["total"] = median(
        [(s.claim + s.start + s.run + s.ending + s.publish) * 1000 for s in splits]
    )
    parts["jobs"] = len(splits)
    parts |= {f"cpu_{part}": seconds * 1000 / len(splits) for part, seconds in cpu.items()}
    return parts


def cpu_seconds() -> dict[str, float]:
    """CPU time so far of this process (the worker's side of each job), of
    the PostgreSQL backends serving this benchmark's database, and of this
    process's fork servers with the attempts they reaped."""
    from workers_bridge import process

    attempts = sum(
        cpu_seconds_of(server.process.pid, reaped_children=True)
        for server in list(process._servers.values())
    )
    return {
        "worker": cpu_seconds_of(),
        "postgres": postgres_cpu_seconds("dcm_bench_overhead"),
        "attempts": attempts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split-sessions", type=int, default=100)
    parser.add_argument("--pools", default=",".join(POOLS), help="comma list of solo, prefork")
    args = parser.parse_args()
    pools = [pool for pool in args.pools.split(",") if pool]
    unknown = [pool for pool in pools if pool not in POOLS]
    if not pools or unknown:
        parser.error(f"--pools takes a comma list of {', '.join(POOLS)}; got {args.pools!r}")
    name = "dcm_bench_overhead"
    with throwaway_database(name) as url, flushed_redis():
        jobs = args.sessions * 6
        ours: dict[str, list[float]] = {pool: [] for pool in pools}
        raw: dict[str, dict[str, list[float]]] = {
            settings: {pool: [] for pool in pools} for settings in RAW_SETTINGS
        }
        with tempfile.TemporaryDirectory(prefix="dcm-bench-overhead-") as tmp:
            home = Path(tmp)
            values = testing.environment_values(home, url, REDIS_URL)
            with testing.using_environment(values) as settings:
                from scheduler.store.db import init_db

                init_db(url)
                testing.noop_service(settings.services_path[0], diamond_jobs())
                record_study(STUDY)
                for pool in pools:
                    hostname = f"bench-{pool}@localhost"
                    workers = [
                        celery_worker(
                            "default",
                            pool=pool,
                            hostname=hostname,
                            env=values,
                            logfile=home / f"worker-{pool}.log",
                        ),
                        *(
                            raw_worker(pool, raw_settings, home / f"raw-{raw_settings}-{pool}.log")
                            for raw_settings in RAW_SETTINGS
                        ),
                    ]
                    try:
                        worker_ready(hostname)
                        for raw_settings in RAW_SETTINGS:  # warm-up: imports, connections
                            run_raw(10, raw_settings)
                        run_ours(10)
                        for round_ in range(args.rounds):
                            for raw_settings in RAW_SETTINGS:
                                seconds = run_raw(args.sessions, raw_settings)["seconds"]
                                raw[raw_settings][pool].append(seconds * 1000 / jobs)
                            ours[pool].append(run_ours(args.sessions)["seconds"] * 1000 / jobs)
                            log(
                                f"{pool} round {round_ + 1}: ours {ours[pool][-1]:.2f} ms/job, raw "
                                + ", ".join(
                                    f"{raw[s][pool][-1]:.2f} ms/task ({s})" for s in RAW_SETTINGS
                                )
                            )
                    finally:
                        for worker in workers:
                            stop(worker)
                split = run_split(args.split_sessions)
                from workers_bridge.process import close_servers

                close_servers()

    params = {
        "sessions": args.sessions,
        "jobs": jobs,
        "dag": "pre -> a -> (b, c) -> d -> post",
        "rounds": args.rounds,
        "statistic": "median",
        "store": "postgresql",
        "broker": "redis",
        **machine(),
    }
    baselines: dict[str, tuple[str, float]] = {}
    for raw_settings, figure in RAW_SETTINGS.items():
        for pool in pools:
            emit(
                f"{figure}.{pool}",
                median(raw[raw_settings][pool]),
                "ms/task",
                params
                | {
                    "worker": f"celery -A bench.rawtasks worker -P {pool} -c 1",
                    "settings": raw_settings,
                },
                samples=[round(v, 2) for v in raw[raw_settings][pool]],
            )
        fastest_pool = min(pools, key=lambda pool: median(raw[raw_settings][pool]))
        baselines[raw_settings] = (
            f"{figure}.{fastest_pool}",
            median(raw[raw_settings][fastest_pool]),
        )
    for pool in pools:
        value = median(ours[pool])
        emit(
            f"overhead.scheduler.{pool}",
            value,
            "ms/job",
            params | {"worker": f"celery -A scheduler worker -P {pool} -c 1"},
            samples=[round(v, 2) for v in ours[pool]],
            jobs_per_second=round(1000 / value, 1),
            celery_between_tasks_ms=round(value - split["total"], 2),
        )
        for raw_settings, ratio_name in RATIOS.items():
            baseline_name, baseline = baselines[raw_settings]
            ratio = value / baseline
            emit(
                f"{ratio_name}.{pool}",
                ratio,
                "ratio",
                params,
                baseline={"name": baseline_name, "value": round(baseline, 3), "unit": "ms/task"},
                target=f"<= {TARGET_RATIO:g}x (goal {GOAL_RATIO:g}x)",
                met=ratio <= TARGET_RATIO,
            )
    emit(
        "overhead.split",
        split["total"],
        "ms/job",
        {"sessions": args.split_sessions, "jobs": split["jobs"], "statistic": "median",
         "where": "workers_bridge.runner.run_job in the benchmark's process", **machine()},
        **{f"{part}_ms": round(split[part], 3)
           for part in ("claim", "start", "run", "ending", "publish")},
        cpu_ms_per_job={part: round(split[f"cpu_{part}"], 3)
                        for part in ("worker", "postgres", "attempts")},
    )  # fmt: skip


if __name__ == "__main__":
    main()
