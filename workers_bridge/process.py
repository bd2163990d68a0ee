"""Running one attempt of a job in a process of its own (docs/architecture.md).

Every attempt runs in a child process: forked from the Celery worker, or,
for a job with a ``python`` interpreter, a subprocess of that interpreter
running :mod:`workers_bridge.child`. The child has its own process group, so
a timeout kills the attempt and anything it started; a worker that calls
``sys.exit``, crashes or leaks memory cannot take the Celery worker with it;
its stdout and stderr go to a file whose tail is kept with the job error.
While the child runs, the parent heart-beats the job row so the re-sender can
tell a long job from a lost one.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.lifeline import die_with_parent, guard, kill_tree
from workers_bridge import child

OUTPUT_TAIL_BYTES = 8192


@dataclass
class AttemptOutcome:
    ok: bool
    result: Any = None
    error: str | None = None
    timed_out: bool = False
    # Killed by SIGKILL from outside the scheduler (the kernel's out-of-memory
    # killer, an operator): not the job's fault, so the job is re-queued.
    killed: bool = False


@dataclass
class Ended:
    """How the attempt's process ended."""

    code: int  # exit status, or minus the signal that killed it
    how: str  # "exited", "timeout", or "stopped" (cancelled, taken over)
    peak_kib: int = 0  # peak resident memory of the process, in KiB


def execute(
    request: dict[str, Any],
    *,
    timeout: float,
    python: str | None = None,
    heartbeat: Callable[[], bool] | None = None,
    heartbeat_interval: float = 10.0,
) -> AttemptOutcome:
    """Run ``request`` (see :mod:`workers_bridge.child`) within ``timeout`` seconds.

    ``heartbeat`` is called every ``heartbeat_interval`` seconds while the
    attempt runs; when it returns False the attempt is killed.
    """
    with tempfile.TemporaryDirectory(prefix="dcm-attempt-") as folder:
        work = Path(folder)
        response_path = work / "response.json"
        output_path = work / "output.log"
        ooms = oom_kills()
        if python:
            process = _spawn(python, request, work, response_path, output_path)
            pid = process.pid
            process.returncode = 0  # reaped here (with its memory use), not by Popen
        else:
            pid = _fork(request, response_path, output_path)
        ended = _wait(pid, timeout, heartbeat, heartbeat_interval)
        if ended.how == "exited" and ended.code == -signal.SIGKILL:
            return _killed(ended, ooms, output_path)
        return _outcome(ended, timeout, response_path, output_path)


def _fork(request: dict[str, Any], response_path: Path, output_path: Path) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    loaded = child.service_modules(str(request.get("entry", "")), request.get("roots", []))
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.setsid()
            guard(parent)  # the worker process dies: the attempt's tree goes too
            output = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(output, 1)
            os.dup2(output, 2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # Celery (and pytest) replace sys.stdout with proxies that do not
            # write to fd 1: give the worker plain line-buffered streams on the
            # output file, so even a killed attempt leaves its tail there.
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            response = child.run(request, loaded)
            sys.stdout.flush()
            sys.stderr.flush()
            child.write_response(str(response_path), response)
        except BaseException:  # noqa: BLE001 - the parent reports a missing response
            code = 70
        finally:
            os._exit(code)
    return pid


def _reap(pid: int, how: str) -> Ended:
    _pid, status, usage = os.wait4(pid, 0)
    # ru_maxrss is in KiB on Linux.
    return Ended(os.waitstatus_to_exitcode(status), how, int(usage.ru_maxrss))


def oom_kills() -> int | None:
    """Processes the out-of-memory killer ended in this process's cgroup so
    far (cgroup v2), or None where that cannot be read."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            line = next(line for line in handle if line.startswith("0::"))
        events = Path("/sys/fs/cgroup", line[3:].strip().lstrip("/"), "memory.events")
        for entry in events.read_text(encoding="utf-8").splitlines():
            name, _, value = entry.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, StopIteration, ValueError):
        return None
    return None


def _spawn(
    python: str, request: dict[str, Any], work: Path, response_path: Path, output_path: Path
) -> subprocess.Popen[bytes]:
    request_path = work / "request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            [python, child.__file__, str(request_path), str(response_path), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Until child.main guards itself: killed if the worker dies first.
            preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
        )
    return process


def _wait(
    pid: int,
    timeout: float,
    heartbeat: Callable[[], bool] | None,
    heartbeat_interval: float,
) -> Ended:
    """Wait for the child; kill its process group at the deadline, or when
    the heartbeat says the attempt is no longer wanted."""
    deadline = time.monotonic() + timeout
    next_beat = time.monotonic() + heartbeat_interval
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                _kill_group(pid)
                return _reap(pid, "timeout")
            wait = min(deadline, next_beat) - now
            ready, _, _ = select.select([pidfd], [], [], max(wait, 0.0))
            if ready:
                return _reap(pid, "exited")
            if heartbeat and time.monotonic() >= next_beat:
                if not heartbeat():  # the job was cancelled or taken over: stop
                    _kill_group(pid)
                    return _reap(pid, "stopped")
                next_beat = time.monotonic() + heartbeat_interval
    finally:
        os.close(pidfd)


def _kill_group(pid: int) -> None:
    kill_tree(pid)  # the group, and what left it with setsid


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - OUTPUT_TAIL_BYTES))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > OUTPUT_TAIL_BYTES:
        text = f"[… {size - OUTPUT_TAIL_BYTES} earlier bytes cut]\n" + text
    return text


def _output_suffix(output_path: Path) -> str:
    output = _tail(output_path)
    return f"\n--- output (stdout/stderr tail) ---\n{output}" if output.strip() else ""


def _killed(ended: Ended, ooms_before: int | None, output_path: Path) -> AttemptOutcome:
    """The attempt's process was SIGKILLed by someone other than the scheduler."""
    ooms_after = oom_kills()
    if ooms_before is not None and ooms_after is not None and ooms_after > ooms_before:
        who = "the kernel's out-of-memory killer ended a process of this worker's cgroup"
    else:
        who = "as the kernel's out-of-memory killer or `kill -9` do"
    peak = f"; its peak memory was {ended.peak_kib / 1024:.0f} MiB" if ended.peak_kib else ""
    return AttemptOutcome(
        False,
        error=f"killed: the attempt's process was killed by signal {signal.SIGKILL.value} "
        f"(SIGKILL; {who}){peak}{_output_suffix(output_path)}",
        killed=True,
    )


def _outcome(
    ended: Ended, timeout: float, response_path: Path, output_path: Path
) -> AttemptOutcome:
    code = ended.code
    suffix = _output_suffix(output_path)
    if ended.how == "stopped":
        return AttemptOutcome(
            False, error=f"stopped: the job was cancelled or taken over by another worker{suffix}"
        )
    if ended.how == "timeout":
        return AttemptOutcome(
            False,
            error=f"timeout: the attempt ran longer than its timeout of {timeout:g}s "
            f"and was killed{suffix}",
            timed_out=True,
        )
    try:
        response = json.loads(response_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown signal"
            how = f"was killed by signal {-code} ({name})"
        else:
            how = f"exited with status {code}"
        return AttemptOutcome(False, error=f"the worker process {how} without a result{suffix}")
    if response.get("ok"):
        return AttemptOutcome(True, result=response.get("result"))
    error = str(response.get("error") or "worker failed")
    trace = response.get("traceback") or ""
    if trace:
        error = f"{error}\n{trace.rstrip()}"
    return AttemptOutcome(False, error=error + suffix)
