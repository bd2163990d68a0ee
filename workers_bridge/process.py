"""Running one attempt of a job in a process of its own (SPEC §10).

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

import contextlib
import ctypes
import ctypes.util
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

from workers_bridge import child

OUTPUT_TAIL_BYTES = 8192
PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not Linux: attempts then outlive a killed worker
    _libc = None


@dataclass
class AttemptOutcome:
    ok: bool
    result: Any = None
    error: str | None = None
    timed_out: bool = False


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
        reap: Callable[[], int]
        if python:
            process = _spawn(python, request, work, response_path, output_path)
            pid, reap = process.pid, process.wait
        else:
            pid = _fork(request, response_path, output_path)
            reap = functools.partial(_reap, pid)

        code, timed_out = _wait(pid, reap, timeout, heartbeat, heartbeat_interval)
        return _outcome(code, timed_out, timeout, response_path, output_path)


def _fork(request: dict[str, Any], response_path: Path, output_path: Path) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    loaded = child.service_modules(str(request.get("entry", "")))
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.setsid()
            signal.signal(signal.SIGUSR2, child.stop_group)
            _die_with_parent(parent)
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


def _die_with_parent(parent: int) -> None:
    """Have the kernel signal this attempt if the worker process that runs it
    dies (SIGKILL, OOM): a re-delivered job must not run twice at once. The
    signal is SIGUSR2, whose handler (:func:`workers_bridge.child.stop_group`)
    kills the attempt's whole process group, programs it started included."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR2)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _reap(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _spawn(
    python: str, request: dict[str, Any], work: Path, response_path: Path, output_path: Path
) -> subprocess.Popen[bytes]:
    request_path = work / "request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            [python, child.__file__, str(request_path), str(response_path)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
    return process


def _wait(
    pid: int,
    reap: Callable[[], int],
    timeout: float,
    heartbeat: Callable[[], bool] | None,
    heartbeat_interval: float,
) -> tuple[int, bool]:
    """Wait for the child; kill its process group at the deadline.
    Returns (exit code, negative for a signal; timed out)."""
    deadline = time.monotonic() + timeout
    next_beat = time.monotonic() + heartbeat_interval
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                _kill_group(pid)
                return reap(), True
            wait = min(deadline, next_beat) - now
            ready, _, _ = select.select([pidfd], [], [], max(wait, 0.0))
            if ready:
                return reap(), False
            if heartbeat and time.monotonic() >= next_beat:
                if not heartbeat():  # the job was cancelled or taken over: stop
                    _kill_group(pid)
                    return reap(), False
                next_beat = time.monotonic() + heartbeat_interval
    finally:
        os.close(pidfd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


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


def _outcome(
    code: int, timed_out: bool, timeout: float, response_path: Path, output_path: Path
) -> AttemptOutcome:
    output = _tail(output_path)
    suffix = f"\n--- output (stdout/stderr tail) ---\n{output}" if output.strip() else ""
    if timed_out:
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
