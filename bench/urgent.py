"""Urgent first: how many jobs start before an urgent session's job, behind a backlog.

One job worker, ``celery -A scheduler worker -P prefork -c 1`` on the
``default`` channel (the product settings: prefetch multiplier 1, late
acks), on PostgreSQL and Redis (database 0; ``--broker`` for another, such
as RabbitMQ). Planning runs in this process. Each round occupies the
worker with a blocker job, sends a backlog of ``--backlog`` sessions of one
50 ms job with priorities 0-9 (cycled), then one more session whose job has
priority 0, releases the blocker and waits for all of them. The figure is
the number of jobs that started after that last session was sent and
before its job started (the blocker, already running, is not counted):
with the session urgent (README, "Urgent studies first"), 0; the baseline
is the same session not urgent, which waits for the whole backlog (its
priority 0 shares its level with priority 1, in order of arrival).

    python -m bench.urgent [--backlog 100] [--rounds 3] [--broker URL]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from bench.common import (
    REDIS_URL,
    bench_store,
    celery_worker,
    emit,
    log,
    machine,
    stop,
    worker_ready,
)
from scheduler import testing

SLOW = '''"""A job that takes 50 ms, and one that waits for a file."""

import os
import time


def work(*args, **kwargs):
    time.sleep(0.05)


def block(job_name, headers, params, *args, **kwargs):
    while not os.path.exists(params["gate"]):
        time.sleep(0.05)
'''


def service(services: Path, gate: Path) -> None:
    package = services / "urgentbench" / "urgentbench"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(SLOW)
    jobs: list[dict[str, Any]] = [
        {"jobName": f"routine-{p}", "workerEntry": "urgentbench:work", "priority": p}
        for p in range(10)
    ]
    for name, urgent in (("stroke", True), ("knee", False)):
        jobs.append(
            {
                "jobName": name,
                "workerEntry": "urgentbench:work",
                "events": [name],
                "priority": 0,
                "urgent": urgent,
            }
        )
    for job in jobs[:10]:
        job["events"] = [job["jobName"]]
    jobs.append(
        {
            "jobName": "blocker",
            "workerEntry": "urgentbench:block",
            "events": ["block"],
            "params": {"gate": str(gate)},
        }
    )
    testing.write_service(services, jobs, "urgentbench")


def one_round(backlog: int, event: str, gate: Path) -> int:
    """Jobs started after the ``event`` session was sent and before its job,
    the worker kept busy by a blocker while the backlog and it are sent."""
    from sqlalchemy import select

    from scheduler.clock import utcnow
    from scheduler.sessions import trigger
    from scheduler.store.db import transaction
    from scheduler.store.models import Job

    gate.unlink(missing_ok=True)
    blocker = trigger("block", "study", "1.2.3").session_id
    testing.wait_until(
        lambda: running(blocker), timeout=60, what="the blocker to start", interval=0.05
    )
    sessions = [trigger(f"routine-{i % 10}", "study", "1.2.3").session_id for i in range(backlog)]
    sent_at = utcnow()
    last = trigger(event, "study", "1.2.3").session_id
    gate.write_text("go")
    for session_id in [blocker, *sessions, last]:
        testing.wait_session(session_id, timeout=600)
    with transaction() as db:
        [started] = db.scalars(select(Job.started_at).where(Job.session_id == last))
        return len(
            db.scalars(
                select(Job.id).where(
                    Job.session_id.in_(sessions), Job.started_at > sent_at, Job.started_at < started
                )
            ).all()
        )


def running(session_id: str) -> bool:
    from sqlalchemy import select

    from scheduler.store.db import transaction
    from scheduler.store.models import Job

    with transaction() as db:
        return db.scalar(select(Job.status).where(Job.session_id == session_id)) == "running"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", default=REDIS_URL)
    args = parser.parse_args()
    with bench_store("dcm_bench_urgent", broker=args.broker) as (home, _values, settings):
        gate = home / "gate"
        service(settings.services_path[0], gate)
        testing.record_study("1.2.3")
        worker: subprocess.Popen[bytes] | None = None
        try:
            worker = celery_worker("default", hostname="urgent@bench", logfile=home / "w.log")
            worker_ready("urgent@bench")
            params = machine() | {
                "broker": args.broker.split(":", 1)[0],
                "backlog": args.backlog,
                "rounds": args.rounds,
                "pool": "prefork",
                "concurrency": 1,
            }
            figures: dict[str, list[int]] = {"stroke": [], "knee": []}
            for round_ in range(args.rounds):
                for event in ("knee", "stroke"):
                    figures[event].append(one_round(args.backlog, event, gate))
                    log(f"round {round_ + 1} {event}: {figures[event][-1]} ahead")
            emit(
                "urgent.jobs_ahead",
                max(figures["stroke"]),
                "jobs",
                params | {"statistic": "max"},
                baseline={
                    "name": "normal.jobs_ahead",
                    "value": min(figures["knee"]),
                    "unit": "jobs",
                },
                target="<= 1",
                met=max(figures["stroke"]) <= 1,
                samples=figures["stroke"],
                baseline_samples=figures["knee"],
            )
        finally:
            if worker is not None:
                stop(worker)


if __name__ == "__main__":
    main()
