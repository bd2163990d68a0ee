"""A fork server: the small process every attempt of one service is forked from.

Forking the Celery worker itself for each attempt costs ~20 ms in a real
worker (its memory and threads are copied on write; docs/architecture.md),
and a fresh interpreter per attempt costs more. Instead each pool process
starts, per service, one of these: a plain interpreter (the worker's, or the
service's own ``python``) that imports the service's modules once and forks
a small, clean child per attempt. The child is what today's attempt always
was: its own process group, its stdout and stderr in an output file, the
worker call of :mod:`workers_bridge.child`, a JSON response (below).

Standard library only, run as a script under any interpreter:
``python forkserver.py PARENT_PID``. Protocol, JSON lines on stdin and
stdout: the parent sends ``{"entry": …, "roots": …, "folder": …}`` and the
request on the next line (passed to a waiting child unread: only the child
needs its headers and arguments); the server answers ``{"pid": …}`` when
the attempt's process exists, then ``{"code": …, "peak_kib": …,
"response": …}`` when it has ended (``code`` as
:func:`os.waitstatus_to_exitcode`). The child writes a small response to a
pipe the server reads once it has exited (without waiting on either side:
what the pipe's buffer cannot take at once goes to the file instead), a
larger one to ``response.json`` in the folder, and then the reply has no
``response``.
Killing the attempt (timeout, cancellation) is the parent's: it has the pid.

Before each fork the server checks the files of the service's modules it
imported; when one changed, it forgets them and imports the new code, so an
edited service runs its new code from the next attempt on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any


def _sibling(name: str) -> Any:
    """A module of this folder: imported as usual inside the package, loaded
    from its file when this runs as a script (its folder is not on
    ``sys.path``: a service's ``child`` module must not find ours)."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_dcm_bridge_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


child = _sibling("child")
untrusted = child.scheduler_module("untrusted")
# A response up to this size goes through the attempt's pipe, if the pipe's
# buffer holds it (64 KiB on Linux, unless its user has many); larger ones,
# or ones the pipe cannot take at once, through the response file.
PIPED_RESPONSE = 16384
# Which interpreter runs the attempts: their job's provenance records it.
INTERPRETER = f"{sys.version.split()[0]} {sys.executable}"


class Preloaded:
    """The workers of one service this process imported (entry -> function),
    and the state of their modules' files when they were imported."""

    def __init__(self) -> None:
        self.roots: list[str] = []
        self.workers: dict[str, Any] = {}
        self.files: dict[str, tuple[int, int]] = {}
        self.version = 0  # changes whenever the imported modules do

    def worker(self, entry: str, roots: list[str]) -> Any | None:
        """The worker function of ``entry``, imported from the current files;
        None when it cannot be imported: the attempt imports it again and
        reports why."""
        changed = [path for path, state in self.files.items() if _state(path) != state]
        if roots != self.roots or changed:
            for path in changed:
                # Python trusts bytecode whose source has the same mtime
                # (in seconds) and size: an edit within a second would not be seen.
                with contextlib.suppress(OSError, ValueError):
                    os.unlink(importlib.util.cache_from_source(path))
            self.forget()
            self.roots = roots
        worker = self.workers.get(entry)
        if worker is not None:
            return worker
        try:
            worker = child.resolve(entry, roots)
        except BaseException:  # noqa: BLE001 - service code may raise anything
            child.fresh_imports(entry, roots)
            return None
        finally:
            child.scheduler_module("lifeline").reassert()
        self.workers[entry] = worker
        self.version += 1
        for name in child.service_modules(entry, roots):
            source = getattr(sys.modules.get(name), "__file__", None)
            if source:
                self.files[source] = _state(source)
        return worker

    def forget(self) -> None:
        for entry in self.workers:
            child.fresh_imports(entry, self.roots)
        self.workers, self.files = {}, {}
        self.version += 1


def _state(path: str) -> tuple[int, int]:
    try:
        status = os.stat(path)
    except OSError:
        return (-1, -1)
    return (status.st_mtime_ns, status.st_size)


def _detach(server: int, replies: int) -> None:
    """In a forked child, before its request: a process group and session of
    its own, tied to the server's life."""
    # Only the server answers its parent: the pipe's end must close when it dies.
    os.close(replies)
    os.setsid()
    # The server dies: the attempt's tree goes too. The server watches its
    # own parent and takes its whole tree down, so no watchdog here.
    child.scheduler_module("lifeline").guard(server, watchdog=False)


def _fork(replies: int, then: Any, *args: Any) -> int:
    """Fork a child detached from the server (:func:`_detach`) that runs
    ``then(*args)`` and exits (status 70 if anything in it raised); its pid."""
    server = os.getpid()
    untrusted.flush_output()  # a service's import may have closed them
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            _detach(server, replies)
            then(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def attempt(request: dict[str, Any], worker: Any | None, folder: str, responses: int) -> None:
    """In the forked child: run the attempt, write its response (to the pipe
    ``responses``, or a file when large); never returns."""
    code, me, pipe = 0, os.getpid(), _identity(responses)
    try:
        output = os.open(
            os.path.join(folder, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        response = child.run(request, worker=worker)
        untrusted.flush_output()
        _respond(responses, folder, response, me, pipe)
    except BaseException:  # noqa: BLE001 - the parent reports a missing response
        code = 70
    finally:
        os._exit(code)


def _identity(fd: int) -> tuple[int, int] | None:
    """The pipe open as ``fd`` (device, inode), or None if it is no pipe."""
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISFIFO(status.st_mode) else None


def _respond(
    responses: int,
    folder: str,
    response: dict[str, Any],
    attempt: int,
    pipe: tuple[int, int] | None,
) -> None:
    """Answer for the attempt's process ``attempt``: through the pipe when
    the answer fits in it, else in the folder's response file. A copy of it
    that the service forked and that returned from the worker function too
    does not answer: its result is not the attempt's. Service code may have
    closed the pipe (and opened a file under its number): the answer then
    goes to the file."""
    if os.getpid() != attempt:
        return
    data = json.dumps(response, allow_nan=False).encode("utf-8")
    if len(data) <= PIPED_RESPONSE and pipe is not None and _identity(responses) == pipe:
        # Never waits: Linux gives a user's new pipes one page once they
        # hold 64 MiB of pipe buffers (fs.pipe-user-pages-soft). Cut short,
        # what the pipe holds is no JSON document and the file is read.
        with contextlib.suppress(OSError):
            os.set_blocking(responses, False)
            if os.write(responses, data) == len(data):
                return
    child.write_response(os.path.join(folder, "response.json"), response)


def _piped_response(responses: int) -> bytes | None:
    """What the ended attempt wrote to its pipe: a JSON document, or None
    (nothing, or cut short by a kill). Read without waiting: a process the
    attempt left behind may hold the pipe open."""
    os.set_blocking(responses, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while True:  # no assignment expression: the file parses on Python 3.7
            chunk = os.read(responses, 65536)
            if not chunk:
                break
            data += chunk
    os.close(responses)
    if not data:
        return None
    try:
        json.loads(data)
    except ValueError:
        return None
    return data


class Standby:
    """A child forked ahead of the next attempt, waiting for its request on a
    pipe: the fork and the child's set-up happen while the worker records
    the previous attempt, not while the next one waits. Valid only while the
    server's modules are those it was forked with."""

    def __init__(self, preloaded: Preloaded, replies: int) -> None:
        self.version = preloaded.version
        self.workers = dict(preloaded.workers)
        readable, self.writable = os.pipe()
        self.responses, responses = os.pipe()
        self.pid = _fork(replies, self._wait, readable, responses)
        os.close(readable)
        os.close(responses)

    def _wait(self, readable: int, responses: int) -> None:
        """In the child: run the request the server writes, if it writes one."""
        os.close(self.writable)
        os.close(self.responses)
        with os.fdopen(readable, "rb") as pipe:
            line = pipe.read()
        if line:
            message = json.loads(line)
            request = message["request"]
            attempt(request, self.workers.get(request["entry"]), message["folder"], responses)
        # No request: the server let it go.

    def take(self, request: bytes, folder: str) -> int | None:
        """Hand the child its request (a JSON document, as the parent sent it);
        its pid, or None if it died waiting (the out-of-memory killer, an
        operator): then the attempt gets a fresh child."""
        message = b'{"folder": %s, "request": %s}' % (json.dumps(folder).encode(), request)
        try:
            with os.fdopen(self.writable, "wb") as pipe:
                pipe.write(message)
        except BrokenPipeError:
            os.close(self.responses)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            return None
        return self.pid

    def discard(self) -> None:
        os.close(self.writable)  # it reads no request and exits
        os.close(self.responses)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _reap_orphans() -> None:
    """Reap descendants an attempt left behind that ended since (this process
    keeps them in its tree, see :func:`scheduler.lifeline.keep_descendants`)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(parent: int) -> int:
    # Interrupting the worker's terminal must not end an attempt half way:
    # the worker decides (warm shutdown waits for it, a kill takes all).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child.scheduler_module("lifeline").guard(parent)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    # Whatever service code prints while being imported goes to the worker's log.
    os.dup2(2, 1)
    preloaded = Preloaded()
    standby: Standby | None = None
    requests = sys.stdin.buffer
    try:
        while True:
            line = requests.readline()
            if not line:
                return 0  # the parent closed the pipe: done
            head, body = json.loads(line), requests.readline()
            entry, roots, folder = head["entry"], head["roots"], head["folder"]
            _reap_orphans()
            worker = preloaded.worker(entry, roots)
            if standby is not None and (
                standby.version != preloaded.version or entry not in standby.workers
            ):
                standby.discard()
                standby = None
            pid = None
            if standby is not None:
                pid = standby.take(body, folder)
                responses = standby.responses
                standby = None
            if pid is None:
                responses, written = os.pipe()
                pid = _fork(replies.fileno(), attempt, json.loads(body), worker, folder, written)
                os.close(written)
            replies.write(json.dumps({"pid": pid, "python": INTERPRETER}) + "\n")
            _pid, status, usage = os.wait4(pid, 0)
            # ru_maxrss is in KiB on Linux.
            ended = json.dumps(
                {"code": os.waitstatus_to_exitcode(status), "peak_kib": int(usage.ru_maxrss)}
            )
            response = _piped_response(responses)
            if response is not None:
                ended = f'{ended[:-1]}, "response": {response.decode("utf-8")}}}'
            replies.write(ended + "\n")
            if worker is not None:
                standby = Standby(preloaded, replies.fileno())
    finally:
        # However the server ends (the parent closed the pipe, or something
        # raised here: a handler service code installed at import, a full
        # disk), what attempts left running (kept in this tree) does not
        # outlive it.
        lifeline = child.scheduler_module("lifeline")
        for leftover in reversed(lifeline.descendants(os.getpid())):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(leftover, signal.SIGKILL)


# The oldest Python a service's own interpreter may be (README, "Services").
OLDEST = (3, 9)


def refuse_old_python() -> int:
    """Answer the first request with why no attempt runs here: this
    interpreter is older than :data:`OLDEST`."""
    sys.stdin.buffer.readline()
    sys.stdin.buffer.readline()
    version = ".".join(str(part) for part in sys.version_info[:3])
    error = (
        f"the job's python ({sys.executable}) is Python {version}; "
        f"a service's interpreter must be Python {OLDEST[0]}.{OLDEST[1]} or newer"
    )
    ended = {"code": 1, "peak_kib": 0, "response": {"ok": False, "error": error, "traceback": ""}}
    sys.stdout.write(json.dumps(ended) + "\n")
    sys.stdout.flush()
    return 1


def main(argv: list[str]) -> int:
    here = str(Path(__file__).resolve().parent)
    # Run as a script, this folder heads sys.path: service imports must not see it.
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]
    if sys.version_info < OLDEST:
        return refuse_old_python()
    return serve(int(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
