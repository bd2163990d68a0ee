"""Running one attempt of a job in a process of its own (docs/architecture.md).

Every attempt runs in a child process forked from a fork server
(:mod:`workers_bridge.forkserver`): a small interpreter — the worker's own,
or the service's ``python`` — that this worker process starts once per
service and that keeps the service's modules imported. The child has its own
process group, so a timeout kills the attempt and anything it started; a
worker that calls ``sys.exit``, crashes or leaks memory cannot take the
Celery worker, or the fork server, with it; its stdout and stderr go to a
file whose tail is kept with the job error. While the child runs, this
process heart-beats the job row so the re-sender can tell a long job from a
lost one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.lifeline import die_with_parent, exit_description, kill_tree
from workers_bridge import forkserver

OUTPUT_TAIL_BYTES = 8192
# Fork servers one worker process keeps (one per service and interpreter);
# the least recently used one is closed beyond this.
MAX_SERVERS = 8
# After the attempt's tree was killed, how long its fork server may take to report it.
REAP_PATIENCE = 10.0
# Each fork server's folder (output tail, response): this, the worker process's pid, a suffix.
FOLDER_PREFIX = "dcm-attempt-"


@dataclass
class AttemptOutcome:
    ok: bool
    result: Any = None
    error: str | None = None
    timed_out: bool = False
    # Killed by SIGKILL from outside the scheduler (the kernel's out-of-memory
    # killer, an operator): not the job's fault, so the job is re-queued.
    killed: bool = False
    # time.perf_counter() when the attempt's process was forked, if it was.
    forked_at: float | None = None
    # The interpreter the attempt ran in: "<version> <executable>".
    interpreter: str | None = None


@dataclass
class Ended:
    """How the attempt's process ended."""

    code: int  # exit status, or minus the signal that killed it
    how: str  # "exited", "timeout", or "stopped" (cancelled, taken over)
    peak_kib: int = 0  # peak resident memory of the process, in KiB
    # What the attempt answered, when it came with the fork server's reply
    # (else it is in the folder's response file, if the attempt wrote one).
    response: dict[str, Any] | None = None


class ServerGone(Exception):
    """The fork server ended; ``code`` is its exit status (minus a signal)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the fork server ended ({code})")
        self.code = code


class ForkServer:
    """One :mod:`workers_bridge.forkserver` process of this worker process."""

    def __init__(self, python: str) -> None:
        self.owner = os.getpid()
        _sweep_folders()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        self.process = subprocess.Popen(
            [python, forkserver.__file__, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            # Until the server guards itself: killed if this process dies first.
            preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests = self.process.stdin
        self.replies = self.process.stdout.fileno()
        self.buffer = b""
        self.broken = False  # killed or ended: closed once the outcome is read
        self.forked_at: float | None = None  # the current attempt's
        self.forks = 0  # attempts it forked
        self.interpreter: str | None = None  # "<version> <executable>", once it forked

    @property
    def output_path(self) -> Path:
        return self.folder / "output.log"

    @property
    def response_path(self) -> Path:
        return self.folder / "response.json"

    def send(self, request: dict[str, Any]) -> None:
        self.forked_at = None
        for stale in (self.output_path, self.response_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        roots = request.get("roots", [])
        head = {"entry": request["entry"], "roots": roots, "folder": str(self.folder)}
        lines = f"{json.dumps(head)}\n{json.dumps(request)}\n"
        try:
            self.requests.write(lines.encode("utf-8"))
            self.requests.flush()
        except (BrokenPipeError, ValueError):
            raise ServerGone(self._exit_code()) from None

    def read(self, wait: float) -> dict[str, Any] | None:
        """The next reply, or None if none came within ``wait`` seconds."""
        until = time.monotonic() + wait
        while b"\n" not in self.buffer:
            left = until - time.monotonic()
            ready, _, _ = select.select([self.replies], [], [], max(left, 0.0))
            if not ready:
                return None
            data = os.read(self.replies, 65536)
            if not data:
                raise ServerGone(self._exit_code())
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _exit_code(self) -> int:
        try:
            return self.process.wait(REAP_PATIENCE)
        except subprocess.TimeoutExpired:
            self.kill()
            return -signal.SIGKILL

    def kill(self) -> None:
        kill_tree(self.process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(REAP_PATIENCE)

    def close(self) -> None:
        if self.owner == os.getpid():
            with contextlib.suppress(OSError, ValueError):
                self.requests.close()  # the server's signal to end
            try:
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                self.kill()
            with contextlib.suppress(OSError, ValueError):
                self.process.stdout.close()  # type: ignore[union-attr]
        shutil.rmtree(self.folder, ignore_errors=True)


_swept: set[int] = set()


def _sweep_folders() -> None:
    """Remove the attempt folders of worker processes that no longer exist
    (killed, or ended without closing their fork servers); once per process."""
    if os.getpid() in _swept:
        return
    _swept.add(os.getpid())
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        owner = folder.name.removeprefix(FOLDER_PREFIX).partition("-")[0]
        if owner.isdigit() and not alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (perhaps another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_servers: OrderedDict[tuple[str, tuple[str, ...], int], ForkServer] = OrderedDict()
_servers_lock = threading.Lock()


def fork_server(python: str, roots: list[str]) -> ForkServer:
    """This thread's fork server for the service in ``roots`` under ``python``."""
    key = (python, tuple(roots), threading.get_ident())
    with _servers_lock:
        server = _servers.pop(key, None)
        if server is not None and (
            server.owner != os.getpid() or server.process.poll() is not None
        ):
            server.close()
            server = None
        if server is None:
            server = ForkServer(python)
        _servers[key] = server
        while len(_servers) > MAX_SERVERS:
            _key, oldest = _servers.popitem(last=False)
            oldest.close()
        return server


def _discard(server: ForkServer) -> None:
    with _servers_lock:
        for key, known in list(_servers.items()):
            if known is server:
                del _servers[key]
    server.close()


@atexit.register
def close_servers() -> None:
    """End every fork server of this process (worker shutdown, tests)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()


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
    for last_try in (False, True):
        server = fork_server(python or sys.executable, list(request.get("roots", [])))
        ooms = oom_kills()
        try:
            server.send(request)
            ended = _wait(server, timeout, heartbeat, heartbeat_interval)
            if server.forked_at is None:
                server.broken = True  # it answered without forking: it is ending
        except ServerGone as gone:
            server.broken = True
            ended = Ended(gone.code, "exited")
        if not (server.broken and server.forked_at is None and server.forks and not last_try):
            break
        # A server that had run attempts ended before forking this one (killed
        # while idle, by an operator or the out-of-memory killer): not this
        # attempt's doing, and nothing of it ran. A fresh server takes it.
        _discard(server)
    try:
        if ended.how == "exited" and ended.code == -signal.SIGKILL:
            outcome = _killed(ended, ooms, server.output_path)
        else:
            outcome = _outcome(ended, timeout, server.response_path, server.output_path)
            if server.forked_at is None and not outcome.ok and ended.response is None:
                outcome.error = _before_fork(ended, timeout)
        outcome.forked_at, outcome.interpreter = server.forked_at, server.interpreter
        return outcome
    finally:
        if server.broken:
            _discard(server)


@functools.cache
def _memory_events() -> Path | None:
    """This process's cgroup v2 ``memory.events`` file (read once: a process
    stays in its cgroup)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            line = next(line for line in handle if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    return Path("/sys/fs/cgroup", line[3:].strip().lstrip("/"), "memory.events")


def oom_kills() -> int | None:
    """Processes the out-of-memory killer ended in this process's cgroup so
    far (cgroup v2), or None where that cannot be read."""
    events = _memory_events()
    if events is None:
        return None
    try:
        for entry in events.read_text(encoding="utf-8").splitlines():
            name, _, value = entry.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _wait(
    server: ForkServer,
    timeout: float,
    heartbeat: Callable[[], bool] | None,
    heartbeat_interval: float,
) -> Ended:
    """Wait for the attempt to end; kill its tree at the deadline, or when
    the heartbeat says the attempt is no longer wanted."""
    deadline = time.monotonic() + timeout
    next_beat = time.monotonic() + heartbeat_interval
    pid: int | None = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            return _stop(server, pid, "timeout")
        try:
            reply = server.read(min(deadline, next_beat) - now)
        except ServerGone:
            if pid is not None:
                # Its server's parent-death signal may be ignored by service code.
                kill_tree(pid)
            raise
        if reply is not None:
            if "pid" in reply:
                pid = int(reply["pid"])
                server.forked_at = time.perf_counter()
                server.forks += 1
                server.interpreter = reply.get("python")
                continue
            response = reply.get("response")
            return Ended(
                int(reply["code"]),
                "exited",
                int(reply.get("peak_kib") or 0),
                response if isinstance(response, dict) else None,
            )
        if heartbeat and time.monotonic() >= next_beat:
            if not heartbeat():  # the job was cancelled or taken over: stop
                return _stop(server, pid, "stopped")
            next_beat = time.monotonic() + heartbeat_interval


def _stop(server: ForkServer, pid: int | None, how: str) -> Ended:
    """Kill the attempt and everything it started; before it was forked (the
    service's modules still importing), the fork server itself."""
    if pid is not None:
        kill_tree(pid)
        try:
            reply = server.read(REAP_PATIENCE)
        except ServerGone:
            reply = None
        if reply is not None and "code" in reply:
            return Ended(int(reply["code"]), how, int(reply.get("peak_kib") or 0))
    server.kill()
    server.broken = True
    return Ended(-signal.SIGKILL, how)


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
    response = None
    if ended.how == "exited":
        response = ended.response or _response(response_path)
    if response is not None and response.get("ok"):
        return AttemptOutcome(True, result=response.get("result"))
    suffix = _output_suffix(output_path)  # read only when something went wrong
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
    if response is None:
        how = exit_description(ended.code)
        return AttemptOutcome(False, error=f"the worker process {how} without a result{suffix}")
    error = str(response.get("error") or "worker failed")
    trace = response.get("traceback") or ""
    if trace:
        error = f"{error}\n{trace.rstrip()}"
    return AttemptOutcome(False, error=error + suffix)


def _before_fork(ended: Ended, timeout: float) -> str:
    """Why an attempt never started: its fork server was still importing the
    service's modules, and ended or ran out of time."""
    if ended.how == "timeout":
        return (
            f"timeout: the service's modules were still being imported when the "
            f"attempt's timeout of {timeout:g}s ran out"
        )
    if ended.how == "stopped":
        return "stopped: the job was cancelled while the service's modules were being imported"
    return (
        f"the service's fork server {exit_description(ended.code)} while importing the "
        "service's modules, before the attempt started (what it printed is in the worker's log)"
    )


def _response(path: Path) -> dict[str, Any] | None:
    try:
        response = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return response if isinstance(response, dict) else None
