"""RabbitMQ as the broker, beside Redis: the same sessions, the same outcomes.

Real worker processes, PostgreSQL, and each broker in turn (``broker_url``):
priorities decided by the broker, a retry after its delay, a cancelled
session, and a killed worker on RabbitMQ (the fault tests of
``test_faults.py``, run unchanged on RabbitMQ).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery

import celeryconfig
from scheduler.config import load_settings
from scheduler.control import cancel_session
from scheduler.sessions import trigger
from scheduler.store.models import utcnow
from scheduler.testing import detect_and_send, record_study, wait_session, wait_until

from . import test_faults
from .conftest import Define
from .engine import jobs_by_name
from .support import RABBITMQ_VHOST, rabbitmq_queues
from .test_faults import Cluster, calls, cluster_on

WORK = "dcm_testjobs:work"


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"jobName": name, "workerEntry": WORK, **fields}


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, broker_url: str, services_root: Path) -> Iterator[Cluster]:
    """Worker processes on PostgreSQL and, in turn, Redis and RabbitMQ.
    Killed at the end: a warm shutdown takes seconds, and the next test
    purges the queues and truncates the store anyway."""
    yield from cluster_on(tmp_path, pg_url, broker_url, services_root, kill_at_end=True)


@pytest.fixture
def rabbitmq_cluster(
    tmp_path: Path, pg_url: str, rabbitmq_url: str, services_root: Path
) -> Iterator[Cluster]:
    """Worker processes on PostgreSQL and RabbitMQ."""
    yield from cluster_on(tmp_path, pg_url, rabbitmq_url, services_root)


def start(uid: str) -> str:
    record_study(uid, now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    return session_id


def run_order(calls_file: Path) -> list[str]:
    return [line.split()[0] for line in calls_file.read_text().splitlines()]


def occupy_the_gpu_worker(
    cluster: Cluster, define: Define, tmp_path: Path, uid: str, jobs: list[dict[str, Any]]
) -> str:
    """Define ``jobs`` beside a ``blocker`` on the ``gpu`` channel and start
    the blocker on the only worker process there: what is sent next waits in
    the broker until ``tmp_path / "gate"`` is written. The blocker's session id."""
    gate, calls_file = tmp_path / "gate", tmp_path / "calls"
    blocker = job(
        "blocker",
        events=["block"],
        channel="gpu",
        params={"calls": str(calls_file), "wait_for": str(gate)},
    )
    define([blocker, *jobs])
    cluster.worker("w1", queues="gpu", concurrency=1)
    record_study(uid)
    session_id = trigger("block", "study", uid).session_id
    wait_until(lambda: calls(calls_file, "blocker") == 1, what="the blocker to occupy the worker")
    return session_id


@pytest.mark.parametrize(
    ("url", "arguments"),
    [
        ("amqp://guest:guest@rabbit:5672//", {"x-max-priority": 10}),
        ("pyamqp://rabbit//", {"x-max-priority": 10}),
        ("redis://127.0.0.1:6379/0", None),
        ("filesystem://", None),
    ],
)
def test_on_amqp_every_queue_of_the_scheduler_is_a_priority_queue(
    url: str, arguments: dict[str, int] | None, tmp_path: Path
) -> None:
    settings = load_settings({"DCM_HOME": str(tmp_path), "CELERY_BROKER_URL": url})
    app = Celery("probe", set_as_current=False)
    app.config_from_object(celeryconfig.celery_settings(settings))
    queues = app.amqp.queues
    # The configured queues, and one Celery creates for a channel (`-Q gpu`).
    for name in ("dcm.planning", "default", "gpu"):
        assert queues[name].queue_arguments == arguments, name
    assert app.conf.task_default_priority == (5 if arguments else None)


def test_among_ready_jobs_of_a_channel_the_higher_priority_runs_first(
    cluster: Cluster, define: Define, tmp_path: Path, broker_url: str
) -> None:
    gate, calls_file = tmp_path / "gate", tmp_path / "calls"
    recorded = {"calls": str(calls_file)}
    # One event per job, so each is sent on its own, in the order the test
    # chooses; all on the `gpu` channel, a queue Celery creates on demand.
    blocked = occupy_the_gpu_worker(
        cluster,
        define,
        tmp_path,
        "90.1",
        [
            job("routine", events=["routine"], channel="gpu", priority=1, params=recorded),
            job("normal", events=["normal"], channel="gpu", params=recorded),
            job("urgent", events=["urgent"], channel="gpu", priority=9, params=recorded),
            job(
                "urgent-report",
                events=["urgent"],
                channel="gpu",
                priority=7,
                dependsOn="urgent",
                params=recorded,
            ),
        ],
    )
    # Sent lowest priority first while the only worker process is busy: the
    # broker, not the order of sending, decides what runs next.
    waiting = [
        trigger(event, "study", "90.1").session_id for event in ("routine", "normal", "urgent")
    ]
    gate.write_text("go")
    for session_id in [blocked, *waiting]:
        assert wait_session(session_id)["status"] == "succeeded"
    # urgent-report is sent only when urgent ends, after normal and routine,
    # and still runs before them.
    assert run_order(calls_file) == ["blocker", "urgent", "urgent-report", "normal", "routine"]
    if broker_url.startswith("amqp"):
        declared = rabbitmq_queues(RABBITMQ_VHOST)
        assert declared["gpu"].get("x-max-priority") == 10


def test_an_urgent_session_s_first_job_starts_right_after_the_running_one(
    cluster: Cluster, define: Define, tmp_path: Path
) -> None:
    """README, "Urgent studies first": behind a backlog on one worker
    process, only the job already running starts before the urgent one."""
    gate, calls_file = tmp_path / "gate", tmp_path / "calls"
    recorded = {"calls": str(calls_file)}
    blocked = occupy_the_gpu_worker(
        cluster,
        define,
        tmp_path,
        "90.5",
        [
            job("routine", events=["routine"], channel="gpu", params=recorded),
            job("important", events=["routine"], channel="gpu", priority=9, params=recorded),
            job(
                "stroke", events=["stroke"], channel="gpu", priority=0, urgent=True, params=recorded
            ),
        ],
    )
    sessions = [blocked, *(trigger("routine", "study", "90.5").session_id for _ in range(3))]
    urgent = trigger("stroke", "study", "90.5").session_id
    gate.write_text("go")
    docs = [wait_session(session_id) for session_id in [*sessions, urgent]]
    assert all(doc["status"] == "succeeded" for doc in docs)
    assert docs[-1]["urgent"] is True
    ran = sorted((j for doc in docs for j in doc["jobs"]), key=lambda j: j["started_at"])
    assert [j["job_name"] for j in ran] == [
        "blocker",
        "stroke",
        *["important"] * 3,
        *["routine"] * 3,
    ]


def test_a_retry_runs_after_its_delay_and_succeeds(
    cluster: Cluster, define: Define, tmp_path: Path
) -> None:
    calls_file = tmp_path / "calls"
    define(
        [
            job(
                "flaky",
                retries=1,
                retryDelay="2s",
                params={"fail_times": 1, "calls": str(calls_file)},
            )
        ]
    )
    cluster.worker("w1")
    doc = wait_session(start("90.2"))
    flaky = jobs_by_name(doc)["flaky"]
    assert (doc["status"], flaky["status"], flaky["attempts"]) == ("succeeded", "succeeded", 2)
    first, second = flaky["attempt_log"]
    assert (first["status"], second["status"]) == ("failed", "succeeded")
    assert first["error"].startswith("RuntimeError: planned failure 1 of flaky")
    waited = datetime.fromisoformat(second["started_at"]) - datetime.fromisoformat(
        first["finished_at"]
    )
    assert waited >= timedelta(seconds=2)
    assert calls(calls_file, "flaky") == 2


def test_a_cancelled_session_stops_its_running_attempt_and_runs_nothing_queued(
    cluster: Cluster, define: Define, tmp_path: Path
) -> None:
    pidfile, never, calls_file = tmp_path / "pid", tmp_path / "never", tmp_path / "calls"
    recorded = {"calls": str(calls_file)}
    define(
        [
            job(
                "long",
                priority=9,
                params={**recorded, "pidfile": str(pidfile), "wait_for": str(never)},
            ),
            # Ready, but the only worker process is busy: its message waits
            # in the broker.
            job("waiting", params=recorded),
            job("next", dependsOn="long", params=recorded),
        ]
    )
    worker = cluster.worker("w1")
    session_id = start("90.3")
    wait_until(pidfile.exists, what="the long job to start")
    attempt = psutil.Process(int(pidfile.read_text()))

    report = cancel_session(session_id)
    assert (report.stopped, sorted(report.cancelled)) == (["long"], ["next", "waiting"])
    attempt.wait(timeout=30)  # killed at its next heartbeat
    doc = wait_session(session_id)
    assert doc["status"] == "cancelled"
    assert {j["status"] for j in doc["jobs"]} == {"cancelled"}
    assert jobs_by_name(doc)["long"]["attempt_log"][-1]["status"] == "cancelled"
    # The waiting job's message is delivered once the worker is free, and
    # turned away.
    turned_away = f"job {jobs_by_name(doc)['waiting']['id']} is not queued any more"
    wait_until(
        lambda: turned_away in worker.log_text(),
        what="the cancelled job's message to be turned away",
    )
    assert run_order(calls_file) == ["long"]


def test_a_killed_pool_process_re_runs_its_job_once(
    rabbitmq_cluster: Cluster, define: Define, tmp_path: Path
) -> None:
    """On RabbitMQ the pool's death re-queues the message at once (late
    acks, reject_on_worker_lost); the job's second attempt finishes it."""
    test_faults.test_a_killed_pool_process_or_fork_server_re_runs_its_job_once(
        rabbitmq_cluster, define, tmp_path, "pool process", "died during the attempt"
    )


def test_a_killed_worker_s_job_is_requeued_by_the_re_sender_and_finishes_once(
    rabbitmq_cluster: Cluster, define: Define, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On RabbitMQ the dead worker's message comes back at once, reaches the
    second worker while the job still counts as running and is turned away;
    the re-sender re-queues the job once its heartbeats stop."""
    test_faults.test_a_killed_worker_s_job_is_requeued_by_the_re_sender_and_finishes_once(
        rabbitmq_cluster, define, tmp_path, monkeypatch
    )
