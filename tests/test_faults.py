"""Faults (README, "Failure modes") with real worker processes: nothing lost, nothing doubled.

Each test kills or restarts a real process — a Celery worker, Redis,
PostgreSQL, beat — and checks that every job still ends exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from scheduler import resender, sessions
from scheduler.store.db import init_db, transaction
from scheduler.store.models import Job, Worker, utcnow
from scheduler.testing import (
    detect_and_send,
    environment_values,
    record_study,
    using_environment,
    wait_session,
    wait_until,
)

from .conftest import Define, require
from .engine import jobs_by_name
from .processes import CeleryProcess, PostgresCluster, RedisServer, postgres_bin

WORK = "dcm_testjobs:work"


def calls(path: Path, name: str) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.split()[0] == name)


class Cluster:
    """Worker processes on the test's store and broker."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[CeleryProcess] = []

    def worker(
        self, name: str, queues: str = "dcm.planning,default", concurrency: int = 1
    ) -> CeleryProcess:
        process = CeleryProcess(
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            log=self.folder / f"{name}.log",
        ).start()
        self.processes.append(process)

        def present() -> bool:
            with transaction() as db:
                return (
                    db.scalar(select(Worker.pid).where(Worker.hostname.startswith(f"{name}@")))
                    == process.pid
                )

        wait_until(present, timeout=60, what=f"worker {name} to start")
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def beat(self, name: str) -> CeleryProcess:
        process = CeleryProcess(
            "beat",
            "--schedule",
            str(self.folder / f"{name}-schedule"),
            log=self.folder / f"{name}.log",
        ).start()
        self.processes.append(process)
        return process


def cluster_on(
    tmp_path: Path, pg_url: str, broker: str, services_root: Path, *, kill_at_end: bool = False
) -> Iterator[Cluster]:
    """Worker processes on PostgreSQL and ``broker``; stopped (or, when
    nothing is left to wait for, killed) at the end."""
    values = environment_values(tmp_path, pg_url, broker) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
        "DCM_HEARTBEAT_INTERVAL": "1",
        "DCM_DETECT_INTERVAL": "0.5",
    }
    with using_environment(values):
        group = Cluster(tmp_path)
        try:
            yield group
        finally:
            if kill_at_end:
                for process in group.processes:
                    process.kill()
            else:
                group.stop()


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, redis_url: str, services_root: Path) -> Iterator[Cluster]:
    yield from cluster_on(tmp_path, pg_url, redis_url, services_root)


def start(uid: str) -> str:
    record_study(uid, now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    return session_id


@pytest.mark.parametrize(
    ("victim_process", "reason"),
    [("pool process", "died during the attempt"), ("fork server", "SIGKILL")],
)
def test_a_killed_pool_process_or_fork_server_re_runs_its_job_once(
    cluster: Cluster, define: Define, tmp_path: Path, victim_process: str, reason: str
) -> None:
    pidfile, calls_file = tmp_path / "pid", tmp_path / "calls"
    define(
        [
            {
                "jobName": "victim",
                "workerEntry": WORK,
                "params": {"pidfile": str(pidfile), "calls": str(calls_file), "hang_first": True},
            }
        ]
    )
    cluster.worker("w1")
    session_id = start("60.1")
    wait_until(pidfile.exists, timeout=60, what="the first attempt to start")
    attempt = psutil.Process(int(pidfile.read_text()))
    fork_server = psutil.Process(attempt.ppid())
    pool_process = fork_server.parent()
    (pool_process if victim_process == "pool process" else fork_server).kill()
    attempt.wait(timeout=30)  # the attempt dies with it (parent-death signal)
    fork_server.wait(timeout=30)

    doc = wait_session(session_id, timeout=90)
    victim = jobs_by_name(doc)["victim"]
    assert (doc["status"], victim["status"], victim["attempts"]) == ("succeeded", "succeeded", 2)
    assert victim["attempt_log"][0]["status"] == "lost"
    assert reason in victim["attempt_log"][0]["error"]
    assert calls(calls_file, "victim") == 2  # one killed attempt, one that finished
    if victim_process == "fork server":
        assert pool_process.is_running()  # it started a new fork server and went on


def test_a_killed_pool_process_takes_down_what_its_attempt_started(
    cluster: Cluster, define: Define, tmp_path: Path
) -> None:
    from .test_callbacks import ended, sleepers

    path = tmp_path / "sleepers"
    define(
        [
            {
                "jobName": "greedy",
                "workerEntry": "dcm_testjobs:spawn_and_hang",
                "params": {"sleepers": str(path)},
            }
        ]
    )
    cluster.worker("w1")
    start("60.7")
    pids = sleepers(path)
    attempt = psutil.Process(psutil.Process(pids[0]).ppid())
    pool_process = psutil.Process(attempt.ppid()).parent()  # above the fork server
    pool_process.kill()
    for pid in [*pids, attempt.pid]:  # the attempt, its group and its own session
        wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to die")


@pytest.mark.parametrize("victim_process", ["pool process", "fork server"])
def test_a_killed_pool_process_or_fork_server_takes_down_an_attempt_that_ignores_signals(
    cluster: Cluster, define: Define, tmp_path: Path, victim_process: str
) -> None:
    from .test_callbacks import ended

    daemon, pidfile = tmp_path / "daemon", tmp_path / "pid"
    params = {"daemon": str(daemon), "pidfile": str(pidfile)}
    define([{"jobName": "stubborn", "workerEntry": "dcm_testjobs:stubborn", "params": params}])
    worker = cluster.worker("w1")
    start("60.8")
    wait_until(pidfile.exists, timeout=60, what="the attempt to start")
    attempt = psutil.Process(int(pidfile.read_text()))
    fork_server = psutil.Process(attempt.ppid())
    (fork_server.parent() if victim_process == "pool process" else fork_server).kill()
    for pid in (attempt.pid, int(daemon.read_text()), fork_server.pid):
        wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to die")
    # The lost attempt is re-queued and runs again, ignoring SIGTERM: a warm
    # shutdown would wait a minute for it. Killing the worker takes it down.
    worker.kill()


def test_a_killed_worker_s_job_is_requeued_by_the_re_sender_and_finishes_once(
    cluster: Cluster, define: Define, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile, calls_file = tmp_path / "pid", tmp_path / "calls"
    define(
        [
            {
                "jobName": "victim",
                "workerEntry": WORK,
                "params": {"pidfile": str(pidfile), "calls": str(calls_file), "hang_first": True},
            }
        ]
    )
    first = cluster.worker("w1")
    session_id = start("60.2")
    wait_until(pidfile.exists, timeout=60, what="the first attempt to start")
    attempt = psutil.Process(int(pidfile.read_text()))
    first.kill()  # the whole worker: main process and pool
    attempt.wait(timeout=30)
    cluster.worker("w2")

    def requeued() -> bool:
        return resender.resend().lost == 1  # after 3 missed heartbeats

    wait_until(requeued, timeout=60, what="the re-sender to notice the lost attempt")
    doc = wait_session(session_id, timeout=90)
    victim = jobs_by_name(doc)["victim"]
    assert (victim["status"], victim["attempts"]) == ("succeeded", 2)
    assert victim["worker"].startswith("w2@")
    assert [e["status"] for e in victim["attempt_log"]] == ["lost", "succeeded"]
    assert calls(calls_file, "victim") == 2


def test_a_job_longer_than_the_visibility_timeout_runs_once(
    tmp_path: Path, pg_url: str, redis_url: str, services_root: Path, define: Define
) -> None:
    gate, calls_file = tmp_path / "gate", tmp_path / "calls"
    define(
        [
            {
                "jobName": "long",
                "workerEntry": WORK,
                "params": {"calls": str(calls_file), "wait_for": str(gate)},
            }
        ]
    )
    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
        "DCM_VISIBILITY_TIMEOUT": "2",
        "DCM_HEARTBEAT_INTERVAL": "1",
    }
    with using_environment(values):
        group = Cluster(tmp_path)
        try:
            workers = [group.worker("w1"), group.worker("w2")]
            session_id = start("60.3")
            # Redis hands the unacknowledged message to the other worker once
            # the visibility timeout passes; the claim turns it away.
            wait_until(
                lambda: any("duplicate delivery ignored" in w.log_text() for w in workers),
                timeout=120,
                what="the message to be delivered a second time",
            )
            gate.write_text("go")
            doc = wait_session(session_id, timeout=60)
        finally:
            group.stop()
    long_job = jobs_by_name(doc)["long"]
    assert (long_job["status"], long_job["attempts"]) == ("succeeded", 1)
    assert calls(calls_file, "long") == 1


def test_jobs_planned_while_redis_is_down_run_when_it_is_back(
    tmp_path: Path, pg_url: str, services_root: Path, define: Define
) -> None:
    define(
        [
            {"jobName": "a", "workerEntry": WORK},
            {"jobName": "b", "workerEntry": WORK, "dependsOn": "a"},
        ]
    )
    broker = RedisServer()
    broker.start()
    values = environment_values(tmp_path, pg_url, broker.url) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
    }
    with using_environment(values) as settings:
        group = Cluster(tmp_path)
        try:
            group.worker("w1")
            broker.stop()  # Redis goes away
            record_study("60.4")
            session_id = sessions.open_session("study", "60.4", "study.stable", manual=False)
            assert session_id is not None
            planned = sessions.plan_session(session_id)  # rows written, messages refused
            assert planned is not None and planned.ready
            broker.start()  # and comes back on the same port
            wait_until(
                lambda: resender.resend(settings, now=utcnow() + timedelta(seconds=30)).jobs,
                timeout=60,
                what="the re-sender to dispatch",
            )
            doc = wait_session(session_id, timeout=90)
        finally:
            group.stop()
            broker.stop()
    assert doc["status"] == "succeeded"
    assert [j["attempts"] for j in doc["jobs"]] == [1, 1]


def test_a_postgresql_restart_while_a_job_runs_loses_nothing(
    tmp_path: Path, redis_url: str, services_root: Path, define: Define
) -> None:
    require(postgres_bin() is not None, "PostgreSQL server binaries")
    gate, calls_file = tmp_path / "gate", tmp_path / "calls"
    define(
        [
            {
                "jobName": "during",
                "workerEntry": WORK,
                "params": {"calls": str(calls_file), "wait_for": str(gate)},
            },
            {
                "jobName": "after",
                "workerEntry": WORK,
                "dependsOn": "during",
                "params": {"calls": str(calls_file)},
            },
        ]
    )
    database = PostgresCluster()
    database.init()
    database.start()
    values = environment_values(tmp_path, database.url, redis_url) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
        "DCM_HEARTBEAT_INTERVAL": "1",
    }
    try:
        with using_environment(values):
            init_db()
            group = Cluster(tmp_path)
            try:
                group.worker("w1")
                session_id = start("60.5")
                wait_until(lambda: calls(calls_file, "during") == 1, what="the job to start")
                database.restart()
                gate.write_text("go")  # the job ends right after the restart
                doc = wait_session(session_id, timeout=120)
                # Beat-side work goes on too.
                record_study("60.6", now=utcnow() - timedelta(seconds=1))
                assert len(detect_and_send()) == 1
            finally:
                group.stop()
    finally:
        database.stop()
    assert doc["status"] == "succeeded"
    assert calls(calls_file, "during") == 1 and calls(calls_file, "after") == 1


def test_two_beats_and_two_planners_on_200_studies_make_one_session_each(
    cluster: Cluster, define: Define, tmp_path: Path
) -> None:
    calls_file = tmp_path / "calls"
    define([{"jobName": "count", "workerEntry": WORK, "params": {"calls": str(calls_file)}}])
    for name in ("p1", "p2"):
        cluster.worker(name, queues="dcm.planning")
    cluster.worker("jobs", queues="default", concurrency=2)
    cluster.beat("beat1")
    cluster.beat("beat2")
    now = utcnow() - timedelta(seconds=1)
    import threading

    def ingest(part: int) -> None:
        for n in range(part, 200, 2):
            record_study(f"70.{n}", instances=2, now=now)

    threads = [threading.Thread(target=ingest, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def all_done() -> bool:
        with transaction() as db:
            statuses = list(db.scalars(select(Job.status)))
        return len(statuses) == 200 and all(st == "succeeded" for st in statuses)

    wait_until(all_done, timeout=300, what="200 sessions to finish")
    from scheduler.store.models import SchedulingSession

    with transaction() as db:
        uids = list(db.scalars(select(SchedulingSession.uid)))
    assert sorted(uids) == sorted(f"70.{n}" for n in range(200))
    lines = calls_file.read_text().splitlines()
    assert len(lines) == 200 and len({line.split()[1] for line in lines}) == 200


def test_a_stopped_worker_leaves_no_attempt_folder_behind(cluster: Cluster, define: Define) -> None:
    # Its pool process ends without running the handlers that close its fork
    # servers at exit: their folders stayed until the next worker started.
    import tempfile

    from workers_bridge.process import FOLDER_PREFIX

    define([{"jobName": "quick", "workerEntry": WORK}])
    worker = cluster.worker("tidy", concurrency=1)
    session_id = start("53.1")
    wait_session(session_id)
    [pool] = psutil.Process(worker.pid).children()
    folders = list(Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}{pool.pid}-*"))
    assert folders  # the pool process's fork server ran the job
    worker.stop()  # a warm shutdown, as SIGTERM from an operator or systemd
    assert not [folder for folder in folders if folder.exists()]
