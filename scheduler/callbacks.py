"""Registry callbacks, run in a process of their own that can be killed.

A callback is service code: it may hang, spin in ``while True: pass``, leak
or crash. The planner hands each callback to a *callback host*, a child
process (this module run as a script) that imports the services' entries
and calls them one at a time. When a callback overruns its time limit, the
host is killed with everything it started (it leads its own process group)
and the next callback gets a fresh host: nothing of a timed-out callback
keeps running (README, "Failure modes"). When a service's code changes, the
host is replaced too, so callbacks always run the code on disk.

Each planning thread has its own host; a host dies with the process that
started it (:mod:`scheduler.lifeline`), and exits when that process closes
its end of the socket.

A request is two frames on a socket pair: the call (JSON) and the headers
document (JSON, encoded once per plan). The answer is one frame: the
decision as ``{"scheduled", "reason", "params", "traceback"}``. A host also
imports entries to check them when the registry is loaded (a request
``{"check": …}``, see :func:`check_imports`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.jsonsafe import unstorable
from scheduler.lifeline import guard, kill_tree, reassert
from scheduler.untrusted import described, flush_output, message, shown, traceback_text

_LENGTH = struct.Struct("!I")
# A fresh host imports the scheduler's registry before its first call; that
# time is not the callback's.
START_TIMEOUT = 120.0


class HostError(RuntimeError):
    """The callback host died, or could not be started."""


@dataclass
class CallbackOutcome:
    """What a callback decided for its job, and why."""

    scheduled: bool
    reason: str
    params: dict[str, Any] | None = None
    traceback: str | None = None


def interpret_return(value: Any) -> CallbackOutcome:
    """Map a callback's return value to a decision, never raising."""
    if value is True or value is False:
        return CallbackOutcome(value, f"callback returned {value}")
    if isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], bool):
        decision, params = value
        if params is not None and not isinstance(params, dict):
            return CallbackOutcome(
                False,
                f"callback returned ({decision}, {type(params).__name__}); "
                "the second item must be a dict of parameters",
            )
        try:
            # Read back, the parameters are plain data: answering with them
            # runs no service code again (a dict subclass's items()).
            params = json.loads(json.dumps(params, allow_nan=False))
        except RecursionError:
            return CallbackOutcome(False, "callback returned parameters nested too deep for JSON")
        except (TypeError, ValueError) as exc:
            reason = message(exc) or described(exc)
            return CallbackOutcome(
                False, f"callback returned parameters that are not JSON: {reason}"
            )
        flaw = unstorable(params)
        if flaw:
            return CallbackOutcome(
                False, f"callback returned parameters the store cannot keep: {flaw}"
            )
        verb = "returned" if decision else "declined with"
        return CallbackOutcome(decision, f"callback {verb} ({decision}, params)", params or {})
    text = shown(value)
    if len(text) > 200:
        text = text[:200] + "…"
    return CallbackOutcome(
        False, f"callback returned {text}; expected True, False or (bool, dict): not scheduled"
    )


def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LENGTH.pack(len(frame)) + frame for frame in frames))


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    return _receive_exactly(sock, size)


# --------------------------------------------------------------------------
# The planner's side


class CallbackHost:
    """One host process; :meth:`call` runs one callback in it."""

    def __init__(self, version: str) -> None:
        self.version = version
        ours, theirs = socket.socketpair()
        package_parent = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH", "")
        environment = {
            **os.environ,
            "PYTHONPATH": package_parent + (os.pathsep + path if path else ""),
        }
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "scheduler.callbacks",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # killed as a group, with what it started
                env=environment,
            )
        except OSError as exc:
            ours.close()
            raise HostError(f"cannot start the callback process: {exc}") from exc
        finally:
            theirs.close()
        self.sock = ours
        try:
            ready = self._receive_within(START_TIMEOUT)
        except (EOFError, OSError, TimeoutError) as exc:
            self.kill()
            raise HostError(f"the callback process did not start ({self._ending()})") from exc
        if ready != b"ready":
            self.kill()
            raise HostError(f"the callback process did not start: {ready[:200]!r}")

    def _receive_within(self, timeout: float) -> bytes:
        """The host's next frame, waiting at most ``timeout`` seconds for it
        to begin and as long again for each later part of it (the socket's
        timeout, raising :class:`TimeoutError`): a host that stops half way
        through a frame never holds the planner."""
        self.sock.settimeout(max(timeout, 0.001))
        return _receive(self.sock)

    def _ending(self) -> str:
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by signal {-code} ({signal.Signals(-code).name})"
            return f"killed by signal {-code}"
        return f"exit status {code}"

    def call(self, request: dict[str, Any], headers: bytes, timeout: float) -> dict[str, Any]:
        """The decision of one callback. Raises :class:`TimeoutError` when it
        overran ``timeout`` (the host is then killed) and :class:`HostError`
        when the host died under it. Whatever else interrupts the wait (an
        exception a signal handler raised: a task's soft time limit) kills
        the host too: the answer it still owes must never be read as the
        answer to another session's call."""
        try:
            _send(self.sock, json.dumps(request).encode(), headers)
            answer = self._receive_within(timeout)
        except TimeoutError:
            self.kill()
            raise
        except (EOFError, OSError) as exc:
            self.kill()
            raise HostError(f"the callback's process died ({self._ending()})") from exc
        except BaseException:
            self.kill()
            raise
        decision: dict[str, Any] = json.loads(answer)
        return decision

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        # With what the callback started; never again once reaped, when its
        # pid may be another process's.
        if self.process.returncode is None:
            kill_tree(self.process.pid)
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def close(self) -> None:
        """Let the host finish on its own (it exits when the socket closes)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.kill()


class Hosts:
    """The callback host of each planning thread, replaced when it died,
    timed out, or the services' code changed (``version``)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, version: str) -> CallbackHost:
        host: CallbackHost | None = getattr(self._local, "host", None)
        if host is not None and (host.version != version or not host.alive):
            host.close()
            host = None
        if host is None:
            self._local.host = None
            host = CallbackHost(version)
            self._local.host = host
        return host

    def discard(self) -> None:
        host: CallbackHost | None = getattr(self._local, "host", None)
        self._local.host = None
        if host is not None:
            host.kill()


hosts = Hosts()


def run_in_host(
    request: dict[str, Any], headers: bytes, timeout: float, version: str
) -> dict[str, Any]:
    """Run one callback (see :func:`call`) in this thread's host."""
    try:
        host = hosts.get(version)
    except HostError as exc:
        return {"scheduled": False, "reason": f"callback not run: {exc}"}
    started = time.monotonic()
    try:
        return host.call(request, headers, timeout)
    except TimeoutError:
        hosts.discard()
        return {
            "scheduled": False,
            "reason": f"callback exceeded its time limit of {timeout:g}s and was stopped: "
            "not scheduled",
        }
    except HostError as exc:
        hosts.discard()
        elapsed = time.monotonic() - started
        return {"scheduled": False, "reason": f"callback failed after {elapsed:.1f}s: {exc}"}


# --------------------------------------------------------------------------
# The host's side


def call(request: dict[str, Any], headers: Any, cache: dict[Any, Any]) -> dict[str, Any]:
    """Import and call one callback; its decision, never raising."""
    from scheduler.entries import EntryError, load_entry

    entry = request["entry"]
    key = (entry, tuple(request["roots"]))
    callback = cache.get(key)
    if callback is None:
        try:
            callback = load_entry(entry, [Path(root) for root in request["roots"]])
        except EntryError as exc:
            return {"scheduled": False, "reason": f"cannot import registryEntry {entry!r}: {exc}"}
        finally:
            reassert()  # before the callback runs, whatever its import did
        cache[key] = callback
    try:
        value = callback(
            request["job_name"],
            headers,
            request["params"],
            request["added_params"],
            **request["kwargs"],
        )
    except BaseException as error:  # noqa: BLE001 - the callback's failure is the decision
        return {
            "scheduled": False,
            "reason": f"callback raised {described(error)}",
            "traceback": traceback_text(error),
        }
    try:
        outcome = interpret_return(value)
    except BaseException as error:  # noqa: BLE001 - a value's __len__ or keys() is service code
        return {
            "scheduled": False,
            "reason": f"callback returned a value that raised while read: {described(error)}",
            "traceback": traceback_text(error),
        }
    return {
        "scheduled": outcome.scheduled,
        "reason": outcome.reason,
        "params": outcome.params,
        "traceback": outcome.traceback,
    }


def check_imports(entries: list[list[Any]]) -> dict[str, Any]:
    """Import each ``[entry, roots, package]`` (the registry's check,
    :mod:`scheduler.registry.importcheck`); never raising. The reason each
    one does not import (None when it does), and the top-level modules
    loaded so far with their locations."""
    from scheduler.entries import EntryError, load_entry, module_location

    errors: list[str | None] = []
    for entry, roots, package in entries:
        try:
            load_entry(entry, [Path(root) for root in roots], package=package)
        except EntryError as exc:
            errors.append(str(exc))
        else:
            errors.append(None)
    modules = {}
    for name, module in list(sys.modules.items()):
        location = module_location(module) if module is not None and "." not in name else None
        if location is not None:
            modules[name] = str(location)
    return {"errors": errors, "modules": modules}


def _reopen_output(saved: int | None) -> None:
    """Give a callback that closed the host's standard output or error
    (descriptors 1 and 2) them back, as ``saved``: the next callback's
    ``print`` must not fail for it."""
    if saved is None:
        return
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.dup2(saved, fd)


def serve(sock: socket.socket, output: int | None = None) -> None:
    """Answer the planner's requests until it closes ``sock``. ``output``:
    a copy of the descriptor callbacks print to, to put back when one closed
    it."""
    cache: dict[Any, Any] = {}
    host = os.getpid()
    _send(sock, b"ready")
    while True:
        try:
            request = json.loads(_receive(sock))
            headers = json.loads(_receive(sock))
        except EOFError:
            return  # the planner closed its end, or died
        if "check" in request:
            decision = check_imports(request["check"])
        else:
            decision = call(request, headers, cache)
        if os.getpid() != host:
            # A child the code forked came back here: only the host answers.
            os._exit(0)
        reassert()  # for the next call, whatever this one did
        try:
            answer = json.dumps(decision)
        except BaseException as exc:  # noqa: BLE001 - a reason or params that are not JSON
            answer = json.dumps(
                {"scheduled": False, "reason": f"callback result: {described(exc)}"}
            )
        _reopen_output(output)
        flush_output()
        _send(sock, answer.encode())


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    # When the planner dies, this host takes down everything its callbacks
    # started, then itself (whatever a callback did with signals).
    guard(parent)
    # Ctrl-C in a terminal reaches the planner, which stops this host.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What callbacks print goes to the planner's stderr, never into the
    # standard output of a command such as `plan --dry-run --json`.
    os.dup2(2, 1)
    with socket.socket(fileno=fd) as sock:
        serve(sock, os.dup(2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
