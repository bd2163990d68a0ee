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

A whole decision can run in the host ahead of the planner (:class:`Ahead`):
a request ``{"ahead": stream}`` whose third frame is a pickled callable that
makes the same calls the planner is about to ask for. The host streams each
decision as it is made, ``{"stream", "job", "decision", "seconds"}``, then
``{"stream", "end": true}``; the planner answers its own calls from that stream, one
round trip per plan instead of one per callback, and still enforces each
callback's time limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.jsonsafe import unstorable
from scheduler.lifeline import guard, kill_tree

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
    # How long the callback ran, measured where it ran (None: not known).
    seconds: float | None = None


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
            json.dumps(params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return CallbackOutcome(False, f"callback returned parameters that are not JSON: {exc}")
        except RecursionError:
            return CallbackOutcome(False, "callback returned parameters nested too deep for JSON")
        flaw = unstorable(params)
        if flaw:
            return CallbackOutcome(
                False, f"callback returned parameters the store cannot keep: {flaw}"
            )
        verb = "returned" if decision else "declined with"
        return CallbackOutcome(decision, f"callback {verb} ({decision}, params)", params or {})
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "…"
    return CallbackOutcome(
        False, f"callback returned {shown}; expected True, False or (bool, dict): not scheduled"
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
            self._wait_readable(START_TIMEOUT)
            ready = _receive(self.sock)
        except (EOFError, OSError, TimeoutError) as exc:
            self.kill()
            raise HostError(f"the callback process did not start ({self._ending()})") from exc
        if ready != b"ready":
            self.kill()
            raise HostError(f"the callback process did not start: {ready[:200]!r}")

    def _wait_readable(self, timeout: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        if not readable:
            raise TimeoutError

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
        when the host died under it."""
        try:
            _send(self.sock, json.dumps(request).encode(), headers)
            self._wait_readable(timeout)
            answer = _receive(self.sock)
        except TimeoutError:
            self.kill()
            raise
        except (EOFError, OSError) as exc:
            self.kill()
            raise HostError(f"the callback's process died ({self._ending()})") from exc
        decision: dict[str, Any] = json.loads(answer)
        return decision

    def send_ahead(self, stream: str, target: bytes, headers: bytes) -> None:
        """Start a decision ahead of the planner (:class:`Ahead`)."""
        try:
            _send(self.sock, json.dumps({"ahead": stream}).encode(), headers, target)
        except OSError as exc:
            self.kill()
            raise HostError(f"the callback's process died ({self._ending()})") from exc

    def next_frame(self, timeout: float) -> dict[str, Any]:
        """The next frame the host streams, within ``timeout`` seconds."""
        try:
            self._wait_readable(timeout)
            frame: dict[str, Any] = json.loads(_receive(self.sock))
        except TimeoutError:
            self.kill()
            raise
        except (EOFError, OSError) as exc:
            self.kill()
            raise HostError(f"the callback's process died ({self._ending()})") from exc
        return frame

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        kill_tree(self.process.pid)  # with what the callback started
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


def _timed_out(timeout: float) -> dict[str, Any]:
    return {
        "scheduled": False,
        "reason": f"callback exceeded its time limit of {timeout:g}s and was stopped: "
        "not scheduled",
    }


def _failed(started: float, error: HostError) -> dict[str, Any]:
    elapsed = time.monotonic() - started
    return {"scheduled": False, "reason": f"callback failed after {elapsed:.1f}s: {error}"}


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
        return _timed_out(timeout)
    except HostError as exc:
        hosts.discard()
        return _failed(started, exc)


class Ahead:
    """The callbacks of one decision, run by this thread's host ahead of
    the planner.

    ``target`` is a picklable callable the host calls with the headers
    document and a ``call(request, headers)`` of its own; it must make the
    calls the planner's decision makes, in the same order (the same
    decision, run on the same inputs). The host sends each decision back as
    soon as it is made, so the planner waits for one round trip per plan,
    not one per callback. :meth:`call` answers the planner's next call from
    that stream, each within ``timeout`` seconds as :func:`run_in_host`
    would. When the stream breaks (a time limit, the host died, a call the
    host did not make, a target that cannot cross) the host is discarded
    and the remaining calls run one at a time with :func:`run_in_host`.
    :meth:`close` after the planner's decision; :meth:`abandon` when it
    did not finish.
    """

    def __init__(self, target: Any, timeout: float, version: str) -> None:
        self._target = target
        self._timeout = timeout
        self._version = version
        self._started = False
        self._host: CallbackHost | None = None  # while its stream is open
        # Frames of another plan's stream (one the planner gave up) never pass.
        self._stream = os.urandom(8).hex()

    def _start(self, headers: bytes) -> None:
        self._started = True
        try:
            target = pickle.dumps(self._target)
            host = hosts.get(self._version)
            host.send_ahead(self._stream, target, headers)
        except HostError:
            hosts.discard()  # the calls one at a time say why
            return
        except Exception:  # noqa: BLE001 - a target that does not pickle: one at a time
            return
        self._host = host

    def call(self, request: dict[str, Any], headers: bytes) -> dict[str, Any]:
        if not self._started:
            self._start(headers)
        if self._host is None:
            return run_in_host(request, headers, self._timeout, self._version)
        started = time.monotonic()
        try:
            frame = self._host.next_frame(self._timeout)
        except TimeoutError:
            self._host = None
            hosts.discard()
            return _timed_out(self._timeout)
        except HostError as exc:
            self._host = None
            hosts.discard()
            return _failed(started, exc)
        if frame.get("stream") != self._stream or frame.get("job") != request["job_name"]:
            self.abandon()
            return run_in_host(request, headers, self._timeout, self._version)
        decision: dict[str, Any] = frame["decision"]
        decision["seconds"] = frame.get("seconds")
        return decision

    def close(self) -> None:
        """The planner's decision ended: so must the host's."""
        host, self._host = self._host, None
        if host is None:
            return
        try:
            frame = host.next_frame(self._timeout)
        except (TimeoutError, HostError):
            hosts.discard()
            return
        if frame.get("stream") != self._stream or frame.get("end") is not True:
            hosts.discard()  # out of step: never reuse its stream

    def abandon(self) -> None:
        """Stop following the host: it is discarded, with what it still runs."""
        if self._host is not None:
            self._host = None
            hosts.discard()


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
            "reason": f"callback raised {type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
        }
    outcome = interpret_return(value)
    return {
        "scheduled": outcome.scheduled,
        "reason": outcome.reason,
        "params": outcome.params,
        "traceback": outcome.traceback,
    }


def _answer(decision: dict[str, Any]) -> bytes:
    try:
        return json.dumps(decision).encode()
    except (TypeError, ValueError) as exc:  # a reason or params that are not JSON
        return json.dumps({"scheduled": False, "reason": f"callback result: {exc}"}).encode()


def _flushed() -> None:
    """What a callback printed reaches the planner's stderr before its decision."""
    sys.stdout.flush()
    sys.stderr.flush()


def run_ahead(
    sock: socket.socket, stream: str, target: bytes, headers: bytes, cache: dict[Any, Any]
) -> None:
    """Run ``target`` (:class:`Ahead`), streaming each call's decision."""

    def local(request: dict[str, Any], _encoded: bytes) -> dict[str, Any]:
        # Each callback gets its own copies, as across the socket.
        copied = json.loads(json.dumps(request))
        started = time.perf_counter()
        decision = call(copied, json.loads(headers), cache)
        seconds = round(time.perf_counter() - started, 6)
        answer = json.loads(_answer(decision))
        _flushed()
        frame = {
            "stream": stream,
            "job": request["job_name"],
            "decision": answer,
            "seconds": seconds,
        }
        _send(sock, json.dumps(frame).encode())
        return answer

    try:
        decide: Callable[[dict[str, Any], Callable[..., Any]], Any] = pickle.loads(target)
        decide(json.loads(headers), local)
    except Exception as exc:  # noqa: BLE001 - the planner sees it out of step
        failed = {"stream": stream, "error": f"{type(exc).__name__}: {exc}"}
        _send(sock, json.dumps(failed).encode())
        return
    _send(sock, json.dumps({"stream": stream, "end": True}).encode())


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


def serve(sock: socket.socket) -> None:
    cache: dict[Any, Any] = {}
    _send(sock, b"ready")
    while True:
        try:
            request = json.loads(_receive(sock))
            headers = _receive(sock)
            if "ahead" in request:
                run_ahead(sock, str(request["ahead"]), _receive(sock), headers, cache)
                continue
        except EOFError:
            return  # the planner closed its end, or died
        if "check" in request:
            decision = check_imports(request["check"])
        else:
            decision = call(request, json.loads(headers), cache)
        answer = _answer(decision)
        _flushed()
        _send(sock, answer)


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
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
