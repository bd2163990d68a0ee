"""`dcm-scheduler run` owns its process tree (README, "Failure modes").

Whatever kills `run`, nothing it started keeps running; a second `run` on the
same home refuses to start; a worker that dies is restarted within limits;
workers on one host have names of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from scheduler.store.db import init_db, transaction
from scheduler.store.models import Job, Worker
from scheduler.testing import record_study, using_environment, wait_until
from scheduler.vocabulary import PLANNING_QUEUE, JobStatus

from .conftest import Define
from .engine import sessions_of
from .processes import CeleryProcess

WORK = "dcm_testjobs:work"


class Run:
    """One `dcm-scheduler run` process, its output in a file."""

    def __init__(self, env: dict[str, str], output: Path, *args: str) -> None:
        self.output = output
        with open(output, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "run", *args],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children(recursive=True)

    def child(self, role: str) -> psutil.Process | None:
        """The `celery … worker` (of the job channels, not the planner) or
        `celery … beat` process of this run."""
        for child in psutil.Process(self.pid).children():
            try:
                command = child.cmdline()
            except psutil.Error:  # one that just died, not reaped yet
                continue
            if role in command and PLANNING_QUEUE not in command:
                return child
        return None

    def worker_main(self) -> psutil.Process | None:
        return self.child("worker")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture
def embedded(tmp_path: Path, services_root: Path, define: Define) -> Iterator[dict[str, str]]:
    """The embedded defaults (SQLite, filesystem broker) under a fresh DCM_HOME."""
    values = {
        "DCM_HOME": str(tmp_path / "home"),
        "DCM_DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_OUTPUT_DIR": "",
        "DCM_STABLE_AGE": "0.5",
        "DCM_DETECT_INTERVAL": "0.5",
        "DCM_HEARTBEAT_INTERVAL": "1",
        "DCM_RESEND_AFTER": "3",
        "DCM_SETTINGS": "",
        "DCM_HEADER_FIELDS": "",
    }
    with using_environment(values):
        init_db()
        yield dict(os.environ)


def live_worker_pids() -> set[int]:
    with transaction() as db:
        return {pid for pid in db.scalars(select(Worker.pid)) if pid and psutil.pid_exists(pid)}


def test_a_killed_run_leaves_nothing_of_its_tree_running(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define(
        [
            {
                "jobName": "slow",
                "workerEntry": WORK,
                "registryEntry": "dcm_testjobs:accept",
                "params": {"wait_for": str(tmp_path / "never"), "pidfile": str(tmp_path / "pid")},
            }
        ]
    )
    record_study("90.1")
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "1")
    try:
        wait_until((tmp_path / "pid").exists, timeout=90, what="a job to run under `run`")
        tree = run.tree()
        # the worker, its pool process, beat, the callback host, the attempt
        assert len(tree) >= 5, [p.cmdline() for p in tree]
        run.process.kill()
        run.process.wait(10)
        _gone, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        run.stop()


def test_a_second_run_on_the_same_home_refuses_and_names_the_first(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define([{"jobName": "hello", "workerEntry": WORK}])
    first = Run(embedded, tmp_path / "first.out", "--concurrency", "1")
    try:
        wait_until(live_worker_pids, timeout=90, what="the first run's worker")
        home = Path(embedded["DCM_HOME"])
        assert f"log:     {home / 'run.log'}" in first.text()
        second = Run(embedded, tmp_path / "second.out", "--concurrency", "1")
        assert second.process.wait(60) == 1
        assert f"PID {first.pid}" in second.text() and str(home) in second.text()
        assert first.process.poll() is None  # the first one is untouched
    finally:
        first.stop()
    assert first.process.returncode == 0
    third = Run(
        embedded, tmp_path / "third.out", "--concurrency", "1"
    )  # the lock went with the first
    try:
        wait_until(live_worker_pids, timeout=90, what="the third run's worker")
        assert third.process.poll() is None
    finally:
        third.stop()


def test_a_dead_worker_is_restarted_and_run_stops_past_its_restarts(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define([{"jobName": "hello", "workerEntry": WORK}])
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "1", "--restarts", "1")
    try:
        wait_until(run.worker_main, timeout=60, what="the worker")
        worker = run.worker_main()
        assert worker is not None
        wait_until(lambda: worker.pid in live_worker_pids(), timeout=90, what="it to register")
        old_tree = [worker, *worker.children(recursive=True)]
        worker.kill()

        def replaced() -> psutil.Process | None:
            new = run.worker_main()
            return new if new is not None and new.pid != worker.pid else None

        successor = wait_until(replaced, timeout=60, what="the worker to be restarted")
        _gone, alive = psutil.wait_procs(old_tree, timeout=10)
        assert alive == []  # its beat and pool process did not stay behind
        assert "was killed by signal 9 (SIGKILL); restarting it in 1s" in run.text()
        wait_until(lambda: successor.pid in live_worker_pids(), timeout=90, what="registration")
        # one restart allowed: the next death stops `run`, and all it started
        successor_tree = [successor, *successor.children(recursive=True)]
        successor.kill()
        assert run.process.wait(60) == 1
        assert "2 deaths within 600s, stopping" in run.text()
        _gone, alive = psutil.wait_procs(successor_tree, timeout=10)
        assert alive == []
        log = (Path(embedded["DCM_HOME"]) / "run.log").read_text()
        assert log.count("started worker as process") == 2 and "stopping" in log
    finally:
        run.stop()


def test_two_workers_on_one_host_are_two_workers(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define([{"jobName": "hello", "workerEntry": WORK}])
    workers = [
        CeleryProcess("worker", "-c", "1", log=tmp_path / f"w{n}.log", env=embedded).start()
        for n in (1, 2)
    ]
    try:

        def both() -> bool:
            with transaction() as db:
                return len(list(db.scalars(select(Worker.hostname)))) == 2

        wait_until(both, timeout=90, what="both workers to register")
        with transaction() as db:
            rows = {pid: name for pid, name in db.execute(select(Worker.pid, Worker.hostname))}
        assert set(rows) == {w.pid for w in workers}
        for pid, name in rows.items():
            assert name.startswith(f"celery-{pid}@")
        # A worker stopped cleanly leaves the list; one killed stays, silent.
        workers[0].stop()
        workers[1].kill()
        with transaction() as db:
            assert set(db.scalars(select(Worker.pid))) == {workers[1].pid}
    finally:
        for worker in workers:
            worker.stop()


def test_run_works_on_the_defaults_and_a_sigterm_stops_its_whole_tree(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define([{"jobName": "hello", "workerEntry": WORK}])
    record_study("90.6")
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "2")
    try:

        def finished() -> bool:
            found = sessions_of("90.6")
            return bool(found) and found[0].status == "succeeded"

        wait_until(finished, timeout=90, what="the session to run under `dcm-scheduler run`")
        tree = run.tree()
        assert len(tree) >= 3  # the worker, its pool and beat
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(60) == 0, run.text()
    finally:
        run.stop()
    assert "sessions:" in run.text() and "stopping" in run.text()
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []


def test_a_study_is_planned_while_the_only_job_slot_is_busy(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    define([{"jobName": "slow", "workerEntry": WORK, "params": {"wait_for": str(gate)}}])
    record_study("81.1")
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "1")
    try:

        def running() -> bool:
            with transaction() as db:
                return JobStatus.RUNNING in db.scalars(select(Job.status)).all()

        wait_until(running, timeout=90, what="the first study's job to hold the only slot")
        record_study("81.2")

        def planned() -> bool:
            found = sessions_of("81.2")
            return bool(found) and found[0].planned_at is not None

        # Planning has a process of its own: it does not wait for the slot
        # (an urgent study's jobs go first once they are planned).
        wait_until(planned, timeout=60, what="the second study to be planned")
        assert not gate.exists() and running()
        gate.touch()
        wait_until(
            lambda: all(s.status == "succeeded" for u in ("81.1", "81.2") for s in sessions_of(u)),
            timeout=60,
            what="both sessions to finish",
        )
    finally:
        run.stop()


def test_a_run_killed_mid_job_finishes_every_session_after_a_restart(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    define([{"jobName": "slow", "workerEntry": WORK, "params": {"wait_for": str(gate)}}])
    for n in range(4):
        record_study(f"80.{n}")

    def statuses() -> list[str]:
        with transaction() as db:
            return list(db.scalars(select(Job.status)))

    first = Run(embedded, tmp_path / "first.out", "--concurrency", "2")
    try:
        wait_until(lambda: "running" in statuses(), timeout=90, what="jobs to start")
        tree = first.tree()
        first.process.kill()  # nothing else: what it started must die with it
        first.process.wait(30)
        _gone, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == []
    finally:
        first.stop()
    gate.write_text("go")
    second = Run(embedded, tmp_path / "second.out", "--concurrency", "2")
    try:
        wait_until(
            lambda: statuses() == ["succeeded"] * 4,
            timeout=180,
            what="every session to finish after the restart",
        )
    finally:
        second.stop()


def test_a_dead_beat_is_restarted_and_detection_goes_on(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define([{"jobName": "hello", "workerEntry": WORK}])
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "1")
    try:
        beat = wait_until(lambda: run.child("beat"), timeout=60, what="beat to start")
        beat.kill()

        def successor() -> psutil.Process | None:
            new = run.child("beat")
            return new if new is not None and new.pid != beat.pid else None

        wait_until(successor, timeout=60, what="beat to be restarted")
        assert "the beat was killed by signal 9 (SIGKILL); restarting it" in run.text()
        record_study("90.7")  # found by the new beat's detection

        def finished() -> bool:
            found = sessions_of("90.7")
            return bool(found) and found[0].status == "succeeded"

        wait_until(finished, timeout=90, what="the new study to be detected and run")
    finally:
        run.stop()


def test_a_service_with_a_new_channel_gets_a_worker_without_a_restart(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    define([{"jobName": "hello", "workerEntry": WORK}])
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "1")
    try:
        wait_until(live_worker_pids, timeout=90, what="the worker")
        define([{"jobName": "on-gpu", "workerEntry": WORK, "channel": "gpu"}])
        record_study("90.8")

        def finished() -> bool:
            found = sessions_of("90.8")
            return bool(found) and found[0].status == "succeeded"

        wait_until(finished, timeout=120, what="the gpu job to run")
        assert "new channel(s) gpu: started a worker for them" in run.text()
        assert len(live_worker_pids()) == 3  # the planner, the first worker, gpu's
    finally:
        run.stop()


def test_a_worker_that_stops_answering_is_killed_and_restarted(
    embedded: dict[str, str], define: Define, tmp_path: Path
) -> None:
    import signal as signals

    define([{"jobName": "hello", "workerEntry": WORK}])
    run = Run(embedded, tmp_path / "run.out", "--concurrency", "1")
    try:
        worker = wait_until(run.worker_main, timeout=60, what="the worker")
        wait_until(lambda: worker.pid in live_worker_pids(), timeout=90, what="it to register")
        worker.send_signal(signals.SIGSTOP)  # alive, but answering nothing

        def replaced() -> psutil.Process | None:
            new = run.worker_main()
            return new if new is not None and new.pid != worker.pid else None

        wait_until(replaced, timeout=90, what="the silent worker to be replaced")
        assert "the worker has been silent for" in run.text()
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
        record_study("90.9")

        def finished() -> bool:
            found = sessions_of("90.9")
            return bool(found) and found[0].status == "succeeded"

        wait_until(finished, timeout=90, what="work to go on with the new worker")
    finally:
        run.stop()
