"""Attempts are forked from a per-service fork server: clean, fresh, isolated."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler.testing import wait_until
from workers_bridge.process import close_servers, execute

from .conftest import FIXTURES
from .support import DISGUISED_EXCEPTION, ODD_OBJECTS


@pytest.fixture(autouse=True)
def _no_servers_left() -> Any:
    yield
    close_servers()


def service(root: Path, source: str) -> dict[str, Any]:
    package = root / "dcm_forked"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(source)
    return {
        "entry": "dcm_forked:work",
        "roots": [str(root)],
        "job_name": "forked",
        "headers": {},
        "params": {},
        "added_params": {},
        "kwargs": {},
    }


COUNTING = """
import os
CALLS = []

def work(*args, **kwargs):
    CALLS.append(1)
    return {"calls": len(CALLS), "server": os.getppid(), "pid": os.getpid(), "version": 1}
"""


def test_attempts_fork_from_one_server_and_never_see_each_other_s_state(tmp_path: Path) -> None:
    request = service(tmp_path, COUNTING)
    first, second = (execute(request, timeout=30) for _ in range(2))
    assert first.ok and second.ok, (first, second)
    assert first.result["calls"] == second.result["calls"] == 1
    assert first.result["server"] == second.result["server"]
    assert first.result["pid"] != second.result["pid"]


LEAN = """
import sys

def work(*args, **kwargs):
    return {"modules": sorted(sys.modules)}
"""


def test_an_attempt_holds_no_module_its_service_did_not_ask_for(tmp_path: Path) -> None:
    # Every module an attempt holds is copied page by page as it runs, and
    # some reseed or reset themselves after each fork (random, threading):
    # the fork server imports none the service did not ask for.
    outcome = execute(service(tmp_path, LEAN), timeout=30)
    assert outcome.ok, outcome
    unasked = {"subprocess", "tempfile", "random", "shutil", "threading"}
    assert not unasked & set(outcome.result["modules"])


GARBAGE = """
import gc

class Big:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it

KEPT = Big()

def work(*args, **kwargs):
    global KEPT
    seen = sum(isinstance(o, Big) for o in gc.get_objects())
    KEPT = None
    return {"seen": seen, "collected": gc.collect() > 0}
"""


def test_what_a_service_made_at_import_stays_visible_to_and_freed_by_its_collector(
    tmp_path: Path,
) -> None:
    # Introspection (leak checkers) and a service that drops what it loaded
    # at import both need the collector to see the imported objects.
    outcome = execute(service(tmp_path, GARBAGE), timeout=30)
    assert outcome.ok, outcome
    assert outcome.result == {"seen": 1, "collected": True}


DEEP = """
def work(*args, **kwargs):
    value = []
    for _ in range(100_000):
        value = [value]
    return value
"""


def test_a_result_nested_too_deep_for_json_fails_its_attempt_with_that_reason(
    tmp_path: Path,
) -> None:
    outcome = execute(service(tmp_path, DEEP), timeout=30)
    assert not outcome.ok
    assert outcome.error == "worker returned a value nested too deep for JSON"


def test_a_result_nested_deeper_than_the_store_keeps_fails_its_attempt(tmp_path: Path) -> None:
    # JSON, but storing it deep in a task's stack would not be.
    outcome = execute(service(tmp_path, DEEP.replace("100_000", "200")), timeout=30)
    assert not outcome.ok
    assert outcome.error == (
        "worker returned a value the store cannot keep: "
        "nested too deep: more than 100 levels of objects and lists"
    )


LARGE_RESULT = """
def work(jobName, headers, params, *args, **kwargs):
    return {"blob": "y" * params["characters"]}
"""


def test_a_result_larger_than_a_store_should_keep_fails_its_attempt_with_that_reason(
    tmp_path: Path,
) -> None:
    # 200 MB results were stored and made every listing of the job slow.
    from workers_bridge.child import LARGEST_RESULT

    request = service(tmp_path, LARGE_RESULT)
    fits = LARGEST_RESULT - len('{"blob": ""}')
    outcome = execute(dict(request, params={"characters": fits}), timeout=60)
    assert outcome.ok and len(outcome.result["blob"]) == fits
    outcome = execute(dict(request, params={"characters": fits + 1}), timeout=60)
    assert not outcome.ok
    assert outcome.error.startswith(
        f"worker returned a result of {LARGEST_RESULT + 1:,} characters as JSON; "
        f"a result holds at most {LARGEST_RESULT:,} (4 MiB)"
    )


def test_a_service_python_older_than_supported_fails_each_attempt_saying_so(
    tmp_path: Path,
) -> None:
    import stat
    import sys

    # This interpreter, reporting itself as 3.8.18 to the fork server it runs.
    old = tmp_path / "python3.8"
    pretend = (
        "import runpy, sys; sys.version_info = (3, 8, 18, 'final', 0); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    old.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{pretend}" "$@"\n')
    old.chmod(old.stat().st_mode | stat.S_IEXEC)
    request = service(tmp_path / "code", COUNTING)
    for _ in range(2):  # also once its first fork server has gone
        outcome = execute(request, timeout=30, python=str(old))
        assert not outcome.ok
        assert outcome.error == (
            f"the job's python ({sys.executable}) is Python 3.8.18; "
            "a service's interpreter must be Python 3.9 or newer"
        )


def test_a_service_edited_between_attempts_runs_its_new_code_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # the fork server writes .pyc
    request = service(tmp_path, COUNTING)
    module = tmp_path / "dcm_forked" / "__init__.py"
    second = 1_700_000_000 * 10**9
    os.utime(module, ns=(second, second + 100))
    assert execute(request, timeout=30).result["version"] == 1
    # Same size and the same second: Python would trust the old bytecode.
    service(tmp_path, COUNTING.replace('"version": 1', '"version": 2'))
    os.utime(module, ns=(second, second + 200))
    assert execute(request, timeout=30).result["version"] == 2


def test_a_service_whose_import_ends_the_process_fails_and_the_next_attempt_works(
    tmp_path: Path,
) -> None:
    request = service(tmp_path, "import os\nos._exit(3)\n")
    outcome = execute(request, timeout=30)
    assert not outcome.ok
    assert outcome.error.startswith(
        "the service's fork server exited with status 3 while importing the service's modules"
    )
    service(tmp_path, COUNTING)
    assert execute(request, timeout=30).ok


def test_a_service_whose_import_hangs_times_out_and_the_next_attempt_works(
    tmp_path: Path,
) -> None:
    request = service(tmp_path, "import time\ntime.sleep(3600)\n")
    outcome = execute(request, timeout=1)
    assert (outcome.ok, outcome.timed_out) == (False, True)
    assert "the service's modules were still being imported" in outcome.error
    service(tmp_path, COUNTING)
    assert execute(request, timeout=30).ok


SPAWNING = """
import subprocess

def work(*args, **kwargs):
    return {"pid": subprocess.Popen(["sleep", "300"]).pid}
"""


def test_what_an_attempt_left_running_ends_with_its_fork_server(tmp_path: Path) -> None:
    from .test_callbacks import ended

    outcome = execute(service(tmp_path, SPAWNING), timeout=30)
    assert outcome.ok, outcome
    left = outcome.result["pid"]
    assert not ended(left)  # kept: the service may want it while the server lives
    close_servers()  # what evicting the least recently used server does too
    wait_until(lambda: ended(left), timeout=10, what=f"process {left} to end")


def test_attempt_folders_of_worker_processes_that_died_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import tempfile

    from workers_bridge import process

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = Path(tempfile.gettempdir()) / f"{process.FOLDER_PREFIX}{gone.pid}-x1"
    stale.mkdir()
    (stale / "response.json").write_text("{}")
    mine = Path(tempfile.mkdtemp(prefix=f"{process.FOLDER_PREFIX}{os.getpid()}-"))
    monkeypatch.setattr(process, "_swept", set())  # as in a newly started worker process
    try:
        assert execute(service(tmp_path, COUNTING), timeout=30).ok
        assert not stale.exists()
        assert mine.exists()  # this process is alive: its folders stay
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


MIXED = """
import os, sys

def work(job_name, headers, params, added_params, **kwargs):
    how = params["how"]
    if how == "raise":
        raise ValueError("asked to fail")
    if how == "exit":
        sys.exit(4)
    if how == "crash":
        os._exit(9)
    return {"how": how, "pid": os.getpid()}
"""


def test_alternating_successes_and_failures_keep_every_outcome_its_own(tmp_path: Path) -> None:
    request = service(tmp_path, MIXED)
    outcomes = []
    for how in ("ok", "ok", "raise", "ok", "exit", "ok", "crash", "ok", "ok"):
        outcomes.append(execute({**request, "params": {"how": how}}, timeout=30))
    assert [(o.ok, (o.result or {}).get("how")) for o in outcomes] == [
        (True, "ok"),
        (True, "ok"),
        (False, None),
        (True, "ok"),
        (False, None),
        (True, "ok"),
        (False, None),
        (True, "ok"),
        (True, "ok"),
    ]
    assert "ValueError: asked to fail" in outcomes[2].error
    assert "sys.exit(4)" in outcomes[4].error
    assert "exited with status 9" in outcomes[6].error
    assert len({o.result["pid"] for o in outcomes if o.ok}) == 6  # a process each


def _state(pid: int) -> str:
    """The process's state letter (Z: ended, not yet reaped), or "" once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _server() -> Any:
    from workers_bridge import process

    (server,) = process._servers.values()
    return server


def test_a_waiting_child_killed_before_its_request_leaves_the_next_attempt_unharmed(
    tmp_path: Path,
) -> None:
    import signal

    from scheduler.lifeline import descendants

    request = service(tmp_path, COUNTING)
    assert execute(request, timeout=30).ok
    server = _server()
    # Forked for the next attempt once the last one was reported.
    (standby,) = wait_until(
        lambda: descendants(server.process.pid), timeout=10, what="the waiting child"
    )
    os.kill(standby, signal.SIGKILL)
    wait_until(lambda: _state(standby) in ("Z", ""), timeout=10, what="the child to die")
    outcome = execute(request, timeout=30)
    assert outcome.ok, outcome
    assert outcome.result["server"] == server.process.pid  # the same server, a fresh child


def test_a_fork_server_that_died_between_attempts_is_replaced_without_failing_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    request = service(tmp_path, COUNTING)
    assert execute(request, timeout=30).ok
    server = _server()
    os.kill(server.process.pid, signal.SIGKILL)
    wait_until(lambda: _state(server.process.pid) in ("Z", ""), timeout=10, what="its end")
    # As when it dies just after the check that it is alive: its pipe is found broken.
    monkeypatch.setattr(server.process, "poll", lambda: None)
    outcome = execute(request, timeout=30)
    assert outcome.ok, outcome
    assert outcome.result["server"] != server.process.pid


SIZED = """
import os, sys

def work(job_name, headers, params, added_params, **kwargs):
    if params["how"] == "crash":
        os._exit(9)
    return {"text": "x" * params["size"], "pid": os.getpid()}
"""


def test_results_small_and_large_arrive_whole_and_a_crash_never_gets_another_s(
    tmp_path: Path,
) -> None:
    # A small response comes with the fork server's reply, a large one in a file.
    request = service(tmp_path, SIZED)
    sizes = [10, 200_000, None, 20_000, None, 3, 70_000, 10]
    outcomes = [
        execute(
            {**request, "params": {"how": "crash" if size is None else "ok", "size": size}},
            timeout=30,
        )
        for size in sizes
    ]
    for size, outcome in zip(sizes, outcomes, strict=True):
        if size is None:
            assert not outcome.ok and "exited with status 9" in (outcome.error or "")
        else:
            assert outcome.ok and outcome.result["text"] == "x" * size, (size, outcome.error)


HOLDING = """
import os, time

def work(*args, **kwargs):
    if os.fork() == 0:  # a copy of the attempt's process, with its open pipes
        time.sleep(300)
        os._exit(0)
    return {"pid": os.getpid()}
"""


def test_a_process_the_attempt_forked_and_left_running_does_not_hold_its_answer(
    tmp_path: Path,
) -> None:
    request = service(tmp_path, HOLDING)
    first, second = execute(request, timeout=30), execute(request, timeout=30)
    assert first.ok and second.ok, (first.error, second.error)
    assert first.result["pid"] != second.result["pid"]


FORKING = """
import os, time

def work(job_name, headers, params, added_params, **kwargs):
    copy = os.fork() == 0  # both processes return from here
    if copy == (params["slower"] == "copy"):
        time.sleep(0.3)
    return {"who": "copy" if copy else "attempt"}
"""


@pytest.mark.parametrize("slower", ["copy", "attempt"])
def test_a_copy_of_the_attempt_returning_too_never_answers_for_it(
    tmp_path: Path, slower: str
) -> None:
    outcome = execute({**service(tmp_path, FORKING), "params": {"slower": slower}}, timeout=30)
    assert outcome.ok and outcome.result == {"who": "attempt"}, outcome.error


def test_an_answer_the_pipe_cannot_take_at_once_goes_to_the_file(tmp_path: Path) -> None:
    # Linux gives a user's new pipes one page once they hold 64 MiB of buffers.
    import fcntl
    import json

    from workers_bridge import forkserver

    readable, writable = os.pipe()
    fcntl.fcntl(writable, fcntl.F_SETPIPE_SZ, 4096)
    response = {"ok": True, "result": {"text": "x" * 10_000}}
    pipe = forkserver._identity(writable)
    forkserver._respond(writable, str(tmp_path), response, os.getpid(), pipe)  # does not block
    os.close(writable)
    assert forkserver._piped_response(readable) is None  # cut short: not an answer
    assert json.loads((tmp_path / "response.json").read_text()) == response


CLOSING = """
import os

def work(job_name, headers, params, added_params, **kwargs):
    os.closerange(3, 1000)  # the attempt's pipe too
    files = [open(os.path.join(params["folder"], f"data{n}"), "ab") for n in range(6)]
    for handle in files:
        handle.close()
    if params["reopen"]:
        global KEPT
        KEPT = [open(os.path.join(params["folder"], f"kept{n}"), "ab") for n in range(6)]
    return {"wrote": "nothing"}
"""


@pytest.mark.parametrize("reopen", [False, True])
def test_a_service_that_closes_inherited_descriptors_still_answers_and_keeps_its_files(
    tmp_path: Path, reopen: bool
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    request = service(tmp_path, CLOSING)
    outcome = execute({**request, "params": {"folder": str(folder), "reopen": reopen}}, timeout=30)
    assert outcome.ok and outcome.result == {"wrote": "nothing"}, outcome.error
    assert all(path.read_bytes() == b"" for path in folder.iterdir())


def test_a_killed_worker_takes_down_an_attempt_whose_service_reset_the_parent_death_signal(
    tmp_path: Path,
) -> None:
    # The service's import puts the signal a fork server gets when its
    # worker dies back to its default action, which would end the server
    # at once, leaving the attempt and its daemon behind.
    import psutil

    from .test_callbacks import ended

    shutil.copytree(FIXTURES / "dcm_testjobs", tmp_path / "dcm_testjobs")
    daemon, pidfile = tmp_path / "daemon", tmp_path / "pid"
    request = service(tmp_path, "")
    request["entry"] = "dcm_testjobs.resetting:work"
    request["params"] = {"daemon": str(daemon), "pidfile": str(pidfile)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "from workers_bridge.process import execute\n"
            "execute(json.loads(sys.argv[1]), timeout=600)\n",
            json.dumps(request),
        ]
    )
    started: list[int] = []
    try:
        wait_until(pidfile.exists, timeout=60, what="the attempt to start")
        attempt = psutil.Process(int(pidfile.read_text()))
        started = [attempt.pid, int(daemon.read_text()), attempt.ppid()]
        worker.kill()
        worker.wait(30)
        for pid in started:
            wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to end")
    finally:
        worker.kill()
        for pid in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


UNSHOWABLE = """
class Unshowable(Exception):
    def __str__(self):
        raise ValueError("no message")

    @property
    def __notes__(self):  # the traceback module raises on it
        raise ValueError("no notes")


def work(job_name, headers, params, added_params, **kwargs):
    if params["notes"]:
        raise Unshowable()

    class Plain(Exception):
        def __str__(self):
            raise ValueError("no message")

    raise Plain()
"""


@pytest.mark.parametrize("notes", [False, True])
def test_an_exception_whose_message_raises_is_named_with_what_traceback_can_be_shown(
    tmp_path: Path, notes: bool
) -> None:
    request = service(tmp_path, UNSHOWABLE)
    outcome = execute({**request, "params": {"notes": notes}}, timeout=30)
    assert not outcome.ok
    kind = "Unshowable" if notes else "Plain"
    assert outcome.error.startswith(f"{kind} (its message could not be shown: its __str__ raised)")
    assert "Traceback (most recent call last)" in outcome.error
    assert "in work" in outcome.error  # the worker's frame


ODD_VALUES = (
    ODD_OBJECTS
    + """
import sys


def work(job_name, headers, params, added_params, **kwargs):
    if params["odd"] == "exit":
        sys.exit(Unrepresentable())
    return Unreadable(a=1)
"""
)


def test_an_exit_code_or_result_that_raises_when_read_fails_its_attempt_saying_so(
    tmp_path: Path,
) -> None:
    request = service(tmp_path, ODD_VALUES)
    outcome = execute({**request, "params": {"odd": "exit"}}, timeout=30)
    assert outcome.error == "worker called sys.exit(<Unrepresentable object whose repr raised>)"
    outcome = execute({**request, "params": {"odd": "result"}}, timeout=30)
    assert outcome.error.startswith(
        "worker returned a value that raised while encoded as JSON (Unreadable): "
        "KeyError: 'no items'"
    )


CLOSING_OUTPUT = """
import os


def work(job_name, headers, params, added_params, **kwargs):
    print("before", flush=True)
    os.close(1)
    os.close(2)
    print("unfinished", end="")  # buffered: written when the attempt flushes
    if params["raise"]:
        raise RuntimeError("after closing its output")
    return {"closed": True}
"""


@pytest.mark.parametrize("fails", [False, True])
def test_a_worker_that_closed_its_output_still_has_its_return_or_exception_recorded(
    tmp_path: Path, fails: bool
) -> None:
    request = service(tmp_path, CLOSING_OUTPUT)
    outcome = execute({**request, "params": {"raise": fails}}, timeout=30)
    if fails:
        assert outcome.error.startswith("RuntimeError: after closing its output"), outcome.error
        assert "before" in outcome.error  # the output tail
    else:
        assert outcome.ok and outcome.result == {"closed": True}, outcome.error


DISGUISED = (
    DISGUISED_EXCEPTION
    + """

if __name__ != "__main__" and "broken" in __name__:
    raise Disguised()


def work(job_name, headers, params, added_params, **kwargs):
    raise Disguised()
"""
)


def test_an_exception_with_a_metaclass_name_and_an_unformattable_message_is_recorded(
    tmp_path: Path,
) -> None:
    outcome = execute(service(tmp_path, DISGUISED), timeout=30)
    assert outcome.error.startswith("Disguised: formats badly"), outcome.error
    # Raised while the service's module is imported: the loader names it too.
    broken = tmp_path / "broken"
    (broken / "dcm_broken").mkdir(parents=True)
    (broken / "dcm_broken" / "__init__.py").write_text(DISGUISED)
    request = {**service(tmp_path, DISGUISED), "entry": "dcm_broken:work", "roots": [str(broken)]}
    outcome = execute(request, timeout=30)
    assert outcome.error.startswith("cannot import workerEntry 'dcm_broken:work': "), outcome.error
    assert "Disguised: formats badly" in outcome.error.splitlines()[0]
