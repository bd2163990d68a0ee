"""``dcm-scheduler run``: the whole scheduler as one supervised process tree.

It starts ``celery -A scheduler worker -B`` (a worker with embedded beat)
consuming the planning queue and every channel of the loaded services, and
watches it (README, "Failure modes"):

- ``run`` holds ``$DCM_HOME/run.pid`` locked while it lives: a second ``run``
  on the same home refuses to start and names the process that holds it;
- the worker dies with ``run`` whatever kills ``run``, SIGKILL included, and
  the worker's pool processes, beat and job attempts die with the worker
  (:mod:`scheduler.lifeline`): nothing of a killed ``run`` keeps working;
- when the worker dies on its own, ``run`` kills what is left of its process
  group and starts it again after a back-off (1 s, doubling up to 30 s), at
  most ``restarts`` times within ten minutes; one more death in that window
  stops ``run`` with exit status 1 and says why;
- Ctrl-C or SIGTERM: a warm shutdown of the worker (running jobs finish or
  are re-delivered), then SIGKILL for anything still there after the grace
  period.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select

from scheduler.config import get_settings
from scheduler.lifeline import die_with_parent
from scheduler.redact import mask
from scheduler.store.db import init_db, session_scope
from scheduler.store.models import Job, SchedulingSession

SHUTDOWN_GRACE = 30.0
RESTARTS = 5
RESTART_WINDOW = 600.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
LOCK_FILE = "run.pid"
LOG_FILE = "run.log"


class HomeInUseError(RuntimeError):
    """Another ``dcm-scheduler run`` works on this ``DCM_HOME``."""


@contextlib.contextmanager
def holding_home(home: Path) -> Iterator[Path]:
    """Hold ``home/run.pid`` locked (with this process's PID in it) for the block.

    The lock is the kernel's: it goes with the process, however it dies, so
    a stale file never blocks the next ``run``. Raises :class:`HomeInUseError`.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCK_FILE
    # Not inherited by the worker (PEP 446): the lock ends with `run` itself.
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        raise HomeInUseError(
            f"another `dcm-scheduler run` (PID {holder}) is using {home}; "
            "stop it first, or give this one another DCM_HOME"
        ) from None
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.ftruncate(handle, 0)
        os.close(handle)


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


def kill_group(pgid: int, wait: float = 5.0) -> None:
    """SIGKILL a process group and wait (briefly) until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


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
    kill_group(pgid)
    if process.returncode is None:
        process.wait()
    return code


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class Supervisor:
    """Starts the worker, and starts it again when it dies, within limits."""

    command: list[str]
    log_file: Path
    verbose: bool = False
    restarts: int = RESTARTS
    window: float = RESTART_WINDOW
    process: subprocess.Popen[bytes] | None = None
    deaths: deque[float] = field(default_factory=deque)
    restarted: int = 0
    last_death: str = ""

    def start(self) -> subprocess.Popen[bytes]:
        output = None if self.verbose else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command,
            start_new_session=True,
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            # The worker dies with `run`, however `run` dies.
            preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
        )
        return self.process

    def note(self, message: str) -> None:
        """A line for the log, beside the worker's own."""
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        with contextlib.suppress(OSError), open(self.log_file, "a", encoding="utf-8") as log:
            log.write(f"[{stamp}] dcm-scheduler run: {message}\n")

    def died(self, code: int) -> float | None:
        """Record a death of the worker; the back-off before the restart, or
        None when the restart budget of the window is spent."""
        assert self.process is not None
        kill_group(self.process.pid)  # beat and pool processes left behind
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window:
            self.deaths.popleft()
        self.last_death = exit_description(code)
        if len(self.deaths) > self.restarts:
            return None
        return min(FIRST_BACKOFF * 2 ** (len(self.deaths) - 1), MAX_BACKOFF)

    def summary(self) -> str:
        if not self.restarted:
            return ""
        return f" | worker restarted {self.restarted}x (last: {self.last_death})"


def run(
    console: Console,
    *,
    concurrency: int | None = None,
    verbose: bool = False,
    restarts: int = RESTARTS,
) -> int:
    settings = get_settings()
    try:
        with holding_home(settings.home):
            return _run(console, concurrency=concurrency, verbose=verbose, restarts=restarts)
    except HomeInUseError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1


def _run(console: Console, *, concurrency: int | None, verbose: bool, restarts: int) -> int:
    settings = get_settings()
    init_db()
    log_file = settings.home / LOG_FILE
    queues = channels_to_consume()
    supervisor = Supervisor(
        worker_command(queues, log_file, concurrency), log_file, verbose, restarts
    )
    console.print(f"store:   {mask(settings.database_url)}", highlight=False)
    console.print(f"queues:  {', '.join(queues)}", highlight=False)
    console.print(f"log:     {log_file}  (Ctrl-C to stop)", highlight=False)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = supervisor.start()
    supervisor.note(f"started worker {process.pid}")
    interactive = console.is_terminal
    last = ""
    try:
        while not stop.wait(1.0):
            if process.poll() is not None:
                code = process.returncode
                backoff = supervisor.died(code)
                if backoff is None:
                    message = (
                        f"the worker {supervisor.last_death} and has died "
                        f"{len(supervisor.deaths)} times within {supervisor.window:g}s; "
                        f"stopping. See {log_file}"
                    )
                    supervisor.note(message)
                    console.print(f"\n[red]error:[/red] {message}", highlight=False)
                    return 1
                message = f"the worker {supervisor.last_death}; restarting it in {backoff:g}s"
                supervisor.note(message)
                console.print(f"\n{message}", highlight=False)
                if stop.wait(backoff):
                    break
                process = supervisor.start()
                supervisor.restarted += 1
                supervisor.note(f"restarted worker as {process.pid}")
                last = ""
            try:
                line = status_line() + supervisor.summary()
            except Exception as exc:  # noqa: BLE001 - the store may be briefly away
                line = f"store unavailable: {exc}"
            if interactive:
                console.print(f"\r{line}", end="", highlight=False, soft_wrap=True)
            elif line != last:
                console.print(line, highlight=False)
            last = line
        console.print("\nstopping: warm shutdown of the worker and beat…")
        code = stop_group(process) if process.poll() is None else process.returncode
        supervisor.note(f"stopped (worker exit status {code})")
        console.print(f"stopped (worker exit status {code})")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            stop_group(process, grace=5.0)
        else:
            kill_group(process.pid, wait=1.0)
