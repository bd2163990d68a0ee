"""``dcm-scheduler run``: the whole scheduler as one process tree on this machine.

It starts ``celery -A scheduler worker -B`` (a worker with embedded beat)
consuming the planning queue and every channel of the loaded services, in a
process group of its own, and prints a one-line status while it works. On
Ctrl-C or SIGTERM it stops the whole group — worker, pool processes, beat —
with a warm shutdown first (running jobs finish or are re-delivered), then
SIGKILL for anything still there after the grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select

from scheduler.config import get_settings
from scheduler.redact import mask
from scheduler.store.db import init_db, session_scope
from scheduler.store.models import Job, SchedulingSession

SHUTDOWN_GRACE = 30.0


def channels_to_consume() -> list[str]:
    from celeryconfig import DEFAULT_CHANNEL, PLANNING_QUEUE
    from scheduler.scheduling import current_registry

    channels = {job.channel for job in current_registry().jobs()}
    return [PLANNING_QUEUE, DEFAULT_CHANNEL, *sorted(channels - {DEFAULT_CHANNEL})]


def worker_command(queues: Sequence[str], log_file: Path, concurrency: int | None) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "scheduler",
        "worker",
        "-B",
        "-Q",
        ",".join(queues),
        "--loglevel",
        "INFO",
        "--logfile",
        str(log_file),
    ]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    return command


def status_line() -> str:
    with session_scope() as session:
        sessions = dict(
            session.execute(
                select(SchedulingSession.status, func.count()).group_by(SchedulingSession.status)
            ).all()
        )
        jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    def part(counts: dict[str, int], keys: Sequence[str]) -> str:
        return ", ".join(f"{counts.get(k, 0)} {k}" for k in keys)

    return (
        "sessions: "
        + part(sessions, ("planning", "running", "succeeded", "partial", "failed"))
        + " | jobs: "
        + part(jobs, ("queued", "running", "succeeded", "failed"))
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen[Any], grace: float = SHUTDOWN_GRACE) -> int:
    """Warm shutdown: SIGTERM to the worker (it stops consuming, lets running
    tasks finish, stops its pool and beat), then SIGKILL whatever of its
    process group is still there after the grace period."""
    pgid = process.pid  # the worker leads its own group (start_new_session)
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(grace)
    except subprocess.TimeoutExpired:
        code = -signal.SIGKILL
    deadline = time.monotonic() + 5.0
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)  # beat and pool children exit right after the worker
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if process.returncode is None:
        process.wait()
    return code


def run(console: Console, *, concurrency: int | None = None, verbose: bool = False) -> int:
    settings = get_settings()
    init_db()
    settings.home.mkdir(parents=True, exist_ok=True)
    log_file = settings.home / "run.log"
    queues = channels_to_consume()
    command = worker_command(queues, log_file, concurrency)
    console.print(f"store:   {mask(settings.database_url)}", highlight=False)
    console.print(f"queues:  {', '.join(queues)}", highlight=False)
    console.print(f"log:     {log_file}  (Ctrl-C to stop)", highlight=False)
    output = None if verbose else subprocess.DEVNULL
    process = subprocess.Popen(
        command, start_new_session=True, stdout=output, stderr=output, stdin=subprocess.DEVNULL
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    interactive = console.is_terminal
    last = ""
    try:
        while not stop.wait(1.0):
            if process.poll() is not None:
                console.print(
                    f"\nthe worker exited with status {process.returncode}; see {log_file}"
                )
                return process.returncode or 1
            try:
                line = status_line()
            except Exception as exc:  # noqa: BLE001 - the store may be briefly away
                line = f"store unavailable: {exc}"
            if interactive:
                console.print(f"\r{line}", end="", highlight=False, soft_wrap=True)
            elif line != last:
                console.print(line, highlight=False)
            last = line
        console.print("\nstopping: warm shutdown of the worker and beat…")
        code = stop_group(process)
        console.print(f"stopped (worker exit status {code})")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            stop_group(process, grace=5.0)
