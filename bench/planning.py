"""Figure 2: planning + emission throughput through ``plan_session``.

One study (20 instances, two series; ``--instances``) and a service of 10 job definitions,
each with a trivial ``registryEntry`` callback (``return True``). Sessions
are opened beforehand (manual triggers, so each is new); the figure is how
many of them one process plans per second with
``scheduler.sessions.plan_session``: headers, the 10 callbacks, the rows
(session, jobs, edges) on PostgreSQL and the messages of the ready jobs on a
real Redis broker (database 0, flushed before each round; no worker consumes
them). A live worker row for channel ``default`` is recorded first, as in
production, so planning does not warn about an unconsumed channel.

Two shapes: ``flat`` (10 independent main jobs: 10 messages per session)
and ``dag`` (1 pre job, 8 main jobs, 1 post job: 1 message per session).

    python -m bench.planning [--sessions 200] [--rounds 3] [--shapes flat,dag] [--instances 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    REDIS_URL,
    cpu_seconds_of,
    emit,
    flush_redis,
    flushed_redis,
    live_descendants_cpu_seconds,
    log,
    machine,
    manual_sessions,
    median,
    postgres_cpu_seconds,
    record_study,
    redis_cpu_seconds,
    throwaway_database,
)
from scheduler import testing

TARGET = 200.0
STUDY = "1.2.826.0.1.3680043.20.1"


def jobs_of(shape: str) -> list[dict[str, Any]]:
    def job(name: str, **fields: Any) -> dict[str, Any]:
        return {
            "jobName": name,
            "workerEntry": testing.NOOP,
            "registryEntry": testing.ACCEPT,
            **fields,
        }

    if shape == "flat":
        return [job(f"job{n}") for n in range(10)]
    return (
        [job("pre", phase="pre")]
        + [job(f"main{n}") for n in range(8)]
        + [job("post", phase="post")]
    )


def queued_messages() -> int:
    client = redis.Redis.from_url(REDIS_URL)
    return sum(int(client.llen(key)) for key in client.scan_iter("default*"))


def plan_share(session_ids: list[str]) -> None:
    """One planner process of ``--planners N``: plans its share of the sessions."""
    from scheduler.sessions import plan_session

    for session_id in session_ids:
        plan_session(session_id)


def plan_in_processes(ids: list[str], planners: int) -> None:
    """Plan ``ids`` split over ``planners`` processes, as ``celery -A scheduler
    worker -Q dcm.planning -c N`` would (fork; each opens its own connections)."""
    if planners == 1:
        plan_share(ids)
        return
    import multiprocessing

    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=plan_share, args=(ids[n::planners],)) for n in range(planners)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0, process.exitcode


def measure(
    shape: str, sessions: int, rounds: int, folder: Path, planners: int = 1, instances: int = 20
) -> None:
    from scheduler.presence import record_presence
    from scheduler.sessions import plan_session
    from scheduler.store.db import init_db, transaction

    name = f"dcm_bench_planning_{shape}"
    with throwaway_database(name) as url, flushed_redis():
        home = folder / shape
        values = testing.environment_values(home, url, REDIS_URL) | {
            "DCM_SERVICES_PATH": str(folder / "services")
        }
        with testing.using_environment(values):
            init_db(url)
            # One services folder per process: a service module is imported once.
            testing.noop_service(folder / "services", jobs_of(shape))
            record_study(STUDY, instances)
            with transaction() as db:
                record_presence(db, "bench-planning@localhost", ["dcm.planning", "default"])
            for ready in (plan_session(s) for s in manual_sessions(STUDY, 20)):  # warm-up
                assert ready is not None and len(ready.plan.jobs) == 10
            rates = []
            cpu = dict.fromkeys(("planner", "callback_hosts", "postgres", "redis"), 0.0)
            for _ in range(rounds):
                flush_redis()
                ids = manual_sessions(STUDY, sessions)
                before = cpu_split(name)
                begin = time.perf_counter()
                plan_in_processes(ids, planners)
                elapsed = time.perf_counter() - begin
                for part, seconds in cpu_split(name).items():
                    cpu[part] += seconds - before[part]
                rates.append(sessions / elapsed)
                per_session = 10 if shape == "flat" else 1
                sent = queued_messages()
                assert sent == sessions * per_session, (sent, sessions * per_session)
                log(f"{shape}: {sessions} sessions in {elapsed:.2f}s, {sent} messages")
    value = median(rates)
    # The target is for one planner process; more planners are the scale-out figure.
    scaled = {} if planners == 1 else {"target": None, "met": None}
    emit(
        "planning.sessions_per_second" if planners == 1 else "planning.sessions_per_second_scaled",
        value,
        "sessions/s",
        {
            "shape": shape,
            "jobs_per_session": 10,
            "messages_per_session": 10 if shape == "flat" else 1,
            "sessions": sessions,
            "rounds": rounds,
            "statistic": "median",
            "store": "postgresql",
            "broker": "redis",
            "instances": instances,
            "planners": planners,
            **machine(),
        },
        **(scaled or {"target": f">= {TARGET:g} sessions/s", "met": value >= TARGET}),
        samples=[round(r, 1) for r in rates],
        cpu_ms_per_session={
            part: round(seconds * 1000 / (sessions * rounds), 3) for part, seconds in cpu.items()
        },
    )


def cpu_split(database: str) -> dict[str, float]:
    """CPU seconds so far of the planners (this process and the planner
    processes it reaped), of the live callback hosts, of the PostgreSQL
    backends serving ``database`` and of Redis."""
    return {
        "planner": cpu_seconds_of(reaped_children=True),
        "callback_hosts": live_descendants_cpu_seconds(),
        "postgres": postgres_cpu_seconds(database),
        "redis": redis_cpu_seconds(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="flat,dag")
    parser.add_argument(
        "--planners", type=int, default=1, help="planner processes (1: the target figure)"
    )
    parser.add_argument(
        "--instances", type=int, default=20, help="instances of the study (a CT: hundreds)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcm-bench-planning-") as tmp:
        for shape in args.shapes.split(","):
            measure(shape, args.sessions, args.rounds, Path(tmp), args.planners, args.instances)


if __name__ == "__main__":
    main()
