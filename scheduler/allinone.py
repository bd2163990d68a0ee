"""``dcm-scheduler run``: the whole scheduler as one supervised process tree.

It starts a ``celery -A scheduler worker`` consuming every channel of the
loaded services, a second one, the planner, consuming the planning queue
alone (so a backlog of jobs never holds up planning: an urgent study is
planned while the jobs before it run), and ``celery -A scheduler beat``,
and watches them (README, "Failure modes"):

- ``run`` holds ``$DCM_HOME/run.pid`` locked while it lives: a second ``run``
  on the same home refuses to start and names the process that holds it;
- its children die with ``run`` whatever kills ``run``, SIGKILL included, and
  a worker's pool processes and job attempts die with the worker
  (:mod:`scheduler.lifeline`): nothing of a killed ``run`` keeps working;
- when a child dies on its own, or stops answering (a worker's heartbeat or
  beat's lease not renewed for three rounds), ``run`` kills what is left of
  its process group and starts it again after a back-off (1 s, doubling up
  to 30 s); each child has ``restarts`` restarts within ten minutes, one
  more death stops ``run`` with exit status 1 and says why;
- a service that brings a new channel while ``run`` runs gets a worker for
  that channel at once;
- Ctrl-C or SIGTERM: a warm shutdown (running jobs finish or are
  re-delivered), then SIGKILL for anything still there after the grace
  period. The children's output goes to ``$DCM_HOME/run.log``.
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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select

from scheduler.config import get_settings
from scheduler.lifeline import die_with_parent, exit_description
from scheduler.redact import mask
from scheduler.store.db import init_db, transaction
from scheduler.store.models import Job, Lease, SchedulingSession, Worker, utcnow
from scheduler.vocabulary import PLANNING_QUEUE, JobStatus, SessionStatus

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


# Planning runs callbacks in a host process of its own; two slots keep one
# free for plans while the other delivers webhooks or opens a cohort's sessions.
PLANNER_CONCURRENCY = 2


def channels_to_consume() -> list[str]:
    from scheduler.registry import current_registry
    from scheduler.vocabulary import DEFAULT_CHANNEL, PLANNING_QUEUE

    channels = {job.channel for job in current_registry().jobs()}
    return [PLANNING_QUEUE, DEFAULT_CHANNEL, *sorted(channels - {DEFAULT_CHANNEL})]


def celery_command(*args: str, log_file: Path) -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", "scheduler", *args]
    return [*command, "--loglevel", "INFO", "--logfile", str(log_file)]


def worker_command(queues: Sequence[str], log_file: Path, concurrency: int | None) -> list[str]:
    command = celery_command("worker", "-Q", ",".join(queues), log_file=log_file)
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    return command


def beat_command(log_file: Path) -> list[str]:
    return celery_command("beat", log_file=log_file)


def status_line() -> str:
    with transaction() as db:
        sessions = dict(
            db.execute(
                select(SchedulingSession.status, func.count()).group_by(SchedulingSession.status)
            ).all()
        )
        jobs = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    def part(counts: dict[str, int], statuses: Sequence[str], always: int) -> str:
        # The first `always` statuses every time, the others when there are any.
        shown = [s for n, s in enumerate(statuses) if n < always or counts.get(s)]
        return ", ".join(f"{counts.get(s, 0)} {s}" for s in shown)

    return (
        "sessions: "
        + part(sessions, list(SessionStatus), always=5)
        + " | jobs: "
        + part(jobs, list(JobStatus), always=4)
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


# Exit statuses of a command that refused its options: starting it again
# cannot help (click's usage error, and EX_USAGE).
USAGE_ERRORS = (2, 64)


@dataclass
class Child:
    """One supervised process: a worker or beat, in a process group of its own."""

    name: str
    command: list[str]
    queues: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None  # waiting out a back-off since it died
    deaths: deque[float] = field(default_factory=deque)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def silence(self) -> str | None:
        """Why this child, though running, has stopped answering (stopped with
        SIGSTOP, hung): a worker's heartbeat or beat's lease is too old."""
        from scheduler.beat import ALIVE_EVERY, ALIVE_FOR, BEAT_LEASE

        assert self.process is not None
        interval = get_settings().heartbeat_interval
        if self.queues:  # a worker
            limit = 3 * interval
            with transaction() as db:
                heard = db.scalar(
                    select(Worker.last_heartbeat).where(Worker.pid == self.process.pid)
                )
        else:  # beat
            limit = 3 * ALIVE_EVERY
            with transaction() as db:
                expires = db.scalar(select(Lease.expires_at).where(Lease.name == BEAT_LEASE))
            heard = expires - timedelta(seconds=ALIVE_FOR) if expires is not None else None
        # Starting up takes a while: judge only after it had time to speak.
        if time.monotonic() - self.started < limit + max(limit, STARTUP_GRACE):
            return None
        age = (utcnow() - heard).total_seconds() if heard is not None else None
        if age is None or age > limit + 2.0:
            said = "has not been heard from" if age is None else f"has been silent for {age:.0f}s"
            return f"the {self.name} {said}"
        return None


@dataclass
class Supervisor:
    """Starts its children and starts them again when they die, within limits."""

    log_file: Path
    verbose: bool = False
    restarts: int = RESTARTS
    window: float = RESTART_WINDOW
    children: list[Child] = field(default_factory=list)
    restarted: int = 0
    last_death: str = ""

    def start(self, child: Child) -> None:
        child.started = time.monotonic()
        if self.verbose:
            output: Any = None
        else:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps its copy
        try:
            child.process = subprocess.Popen(
                child.command,
                start_new_session=True,
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                # It dies with `run`, however `run` dies.
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
            )
        finally:
            if output is not None:
                output.close()
        child.restart_at = None
        self.note(f"started {child.name} as process {child.process.pid}")

    def add(self, child: Child) -> Child:
        self.children.append(child)
        self.start(child)
        return child

    def note(self, message: str) -> None:
        """A line for the log, beside the children's own."""
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        with contextlib.suppress(OSError), open(self.log_file, "a", encoding="utf-8") as log:
            log.write(f"[{stamp}] dcm-scheduler run: {message}\n")

    def check(self, say: Any, liveness: bool = False) -> str | None:
        """Notice deaths (and, with ``liveness``, children that stopped
        answering, which are killed), restart what is due; the reason to
        stop, if any."""
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if liveness and process is not None and child.restart_at is None and child.running:
                try:
                    silent = child.silence()
                except Exception:  # noqa: BLE001 - the store may be briefly away
                    silent = None
                if silent is not None:
                    self.note(f"{silent}; killing it")
                    say(f"{silent}; killing it")
                    kill_group(process.pid)
                    process.wait()
            if process is not None and child.restart_at is None and not child.running:
                code = process.returncode
                kill_group(process.pid)  # pool processes or helpers left behind
                self.last_death = f"the {child.name} {exit_description(code)}"
                if code in USAGE_ERRORS:
                    return f"{self.last_death}: it refused its options"
                # Each child has its own budget: a crashing beat does not use
                # up the worker's restarts, nor the other way round.
                child.deaths.append(now)
                while child.deaths and child.deaths[0] < now - self.window:
                    child.deaths.popleft()
                if len(child.deaths) > self.restarts:
                    return (
                        f"{self.last_death}; {len(child.deaths)} deaths within "
                        f"{self.window:g}s, stopping"
                    )
                backoff = min(FIRST_BACKOFF * 2 ** (len(child.deaths) - 1), MAX_BACKOFF)
                child.restart_at = now + backoff
                message = f"{self.last_death}; restarting it in {backoff:g}s"
                self.note(message)
                say(message)
            if child.restart_at is not None and now >= child.restart_at:
                self.start(child)
                self.restarted += 1
        return None

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Warm shutdown: SIGTERM to every child (a worker stops consuming and
        lets running tasks finish), then SIGKILL whatever of their process
        groups is still there after the grace period."""
        running = [child.process for child in self.children if child.running]
        for process in running:
            assert process is not None
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            assert process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.1))
        for child in self.children:
            if child.process is not None:
                kill_group(child.process.pid, wait=1.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(5)

    def summary(self) -> str:
        if not self.restarted:
            return ""
        return f" | restarts: {self.restarted} (last: {self.last_death})"


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


# How often `run` looks for channels that a new or changed service brought,
# and for children that stopped answering.
CHANNEL_CHECK_EVERY = 5.0
LIVENESS_CHECK_EVERY = 5.0
# A child is judged silent only after it had its silence limit twice (and at
# least this long beyond it) to start up.
STARTUP_GRACE = 10.0


def log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of the log, where a child says why it died."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _run(console: Console, *, concurrency: int | None, verbose: bool, restarts: int) -> int:
    settings = get_settings()
    init_db()
    log_file = settings.home / LOG_FILE
    queues = channels_to_consume()
    supervisor = Supervisor(log_file, verbose, restarts)
    console.print(f"store:   {mask(settings.database_url)}", highlight=False)
    console.print(f"queues:  {', '.join(queues)}", highlight=False)
    console.print(f"log:     {log_file}  (Ctrl-C to stop)", highlight=False)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    def say(message: str) -> None:
        console.print(f"\n{message}", highlight=False)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        channels = tuple(queue for queue in queues if queue != PLANNING_QUEUE)
        supervisor.add(Child("worker", worker_command(channels, log_file, concurrency), channels))
        supervisor.add(
            Child(
                "planner",
                worker_command([PLANNING_QUEUE], log_file, PLANNER_CONCURRENCY),
                (PLANNING_QUEUE,),
            )
        )
        supervisor.add(Child("beat", beat_command(log_file)))
        interactive = console.is_terminal
        last, channels_checked = "", time.monotonic()
        liveness_checked = time.monotonic()
        while not stop.wait(1.0):
            due = time.monotonic() - liveness_checked >= LIVENESS_CHECK_EVERY
            if due:
                liveness_checked = time.monotonic()
            fatal = supervisor.check(say, liveness=due)
            if fatal is not None:
                supervisor.note(fatal)
                console.print(f"\n[red]error:[/red] {fatal}; see {log_file}", highlight=False)
                tail = log_tail(log_file)
                if tail:
                    console.print("the log ends with:\n" + tail, highlight=False, markup=False)
                return 1
            if time.monotonic() - channels_checked >= CHANNEL_CHECK_EVERY:
                channels_checked = time.monotonic()
                added = _worker_for_new_channels(supervisor, log_file, concurrency)
                if added:
                    say(f"new channel(s) {', '.join(added)}: started a worker for them")
            try:
                line = status_line() + supervisor.summary()
            except Exception as exc:  # noqa: BLE001 - the store may be briefly away
                line = f"store unavailable: {exc}"
            if interactive:
                console.print(f"\r{line}", end="", highlight=False, soft_wrap=True)
            elif line != last:
                console.print(line, highlight=False)
            last = line
        console.print("\nstopping: warm shutdown of the workers and beat…")
        supervisor.stop()
        supervisor.note("stopped")
        console.print("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        supervisor.stop(grace=5.0)


def _worker_for_new_channels(
    supervisor: Supervisor, log_file: Path, concurrency: int | None
) -> list[str]:
    """Start a worker for channels no child consumes yet; the new ones."""
    try:
        wanted = channels_to_consume()
    except Exception as exc:  # noqa: BLE001 - a broken registry must not stop `run`
        supervisor.note(f"cannot read the services: {exc}")
        return []
    consumed = {queue for child in supervisor.children for queue in child.queues}
    new = [channel for channel in wanted if channel not in consumed]
    if new:
        name = f"worker for {', '.join(new)}"
        supervisor.add(Child(name, worker_command(new, log_file, concurrency), tuple(new)))
    return new
