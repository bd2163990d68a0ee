"""Registry callbacks run where they can be stopped, and always run the code on disk.

A callback past its time limit leaves nothing running; a service edited while
the planner runs is planned with its new code; a service left out of a
session is named in the session's trace and in `show`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.testing import detect_and_send, record_study, wait_session, wait_until

from .conftest import Define
from .support import DISGUISED_EXCEPTION, ODD_OBJECTS
from .test_planning import job, make_plan


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def cpu_settles(window: float = 1.0, budget: float = 0.3) -> bool:
    """Whether this process and its descendants used less than ``budget``
    seconds of CPU over ``window`` seconds (a spinning process uses ~window)."""
    me = psutil.Process()
    tree = [me, *me.children(recursive=True)]
    before = cpu_seconds(tree)
    time.sleep(window)  # a rate needs an interval
    return cpu_seconds(tree) - before < budget


def test_a_spinning_callback_is_stopped_at_its_time_limit(
    define: Define, services_root: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "callback.pid"
    define(
        [
            job("spinner", registryEntry="dcm_testjobs:spin", params={"pidfile": str(pidfile)}),
            job("fine", registryEntry="dcm_testjobs:accept"),
        ]
    )
    result = make_plan(services_root, timeout=1.0)
    assert result.job_names == ["fine"]  # the next callback ran in a fresh process
    assert "exceeded its time limit of 1s" in str(result.trace["jobs"]["spinner"]["reason"])
    spinner = int(pidfile.read_text())
    assert spinner != os.getpid()
    assert not psutil.pid_exists(spinner)  # killed and reaped, not left spinning
    wait_until(cpu_settles, timeout=10, what="CPU use to stop growing")


def test_a_spinning_callback_under_a_real_worker_leaves_no_process_behind(
    live: Settings, define: Define, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.testing import use_environment

    monkeypatch.setenv("DCM_CALLBACK_TIMEOUT", "1")
    use_environment({})
    pidfile = tmp_path / "callback.pid"
    define(
        [
            job("spinner", registryEntry="dcm_testjobs:spin", params={"pidfile": str(pidfile)}),
            job("after"),
        ]
    )
    record_study("61.1")
    [session_id] = detect_and_send()
    doc = wait_session(session_id)
    assert [j["job_name"] for j in doc["jobs"]] == ["after"]
    assert "exceeded its time limit" in doc["trace"]["jobs"]["spinner"]["reason"]
    assert not psutil.pid_exists(int(pidfile.read_text()))
    wait_until(cpu_settles, timeout=10, what="CPU use to stop growing")


@pytest.fixture
def editable(services_root: Path) -> Iterator[Path]:
    """A service of its own on the services path, with a module name used
    nowhere else, removed afterwards."""
    module = f"editable_{uuid.uuid4().hex[:8]}"
    folder = services_root / module
    (folder / module).mkdir(parents=True)
    yield folder
    shutil.rmtree(folder)


WORKER = "def work(*a, **k):\n    return {}\n\n\n"


def write_service(folder: Path, callback: str, source: str, version: str = "") -> None:
    module = folder.name
    (folder / module / "__init__.py").write_text(WORKER + source)
    definition = {
        "name": module,
        **({"version": version} if version else {}),
        "jobs": [
            {
                "jobName": f"{module}-job",
                "workerEntry": f"{module}:work",
                "registryEntry": f"{module}:{callback}",
            }
        ],
    }
    (folder / "dcm-processor.json").write_text(json.dumps(definition))
    # A new mtime for sure: some filesystems keep whole seconds.
    for path in (folder / "dcm-processor.json", folder / module / "__init__.py"):
        stamp = time.time() + 2
        os.utime(path, (stamp, stamp))


def test_a_service_edited_while_the_worker_runs_is_planned_with_its_new_code(
    live: Settings, define: Define, editable: Path
) -> None:
    define([job("base")])
    name = f"{editable.name}-job"
    write_service(editable, "decide", "def decide(*a, **k):\n    return True, {'version': 1}\n")
    record_study("62.1")
    [first] = detect_and_send()
    assert wait_session(first)["added_params"][name] == {"version": 1}

    # Renamed callback, new behaviour: the planner must import the new code.
    write_service(editable, "choose", "def choose(*a, **k):\n    return True, {'version': 2}\n")
    record_study("62.2")
    [second] = detect_and_send()
    doc = wait_session(second)
    assert "services_left_out" not in doc["trace"], doc["trace"]
    assert doc["added_params"][name] == {"version": 2}

    # Only the body changes now, the definition file stays as it is.
    (editable / editable.name / "__init__.py").write_text(
        WORKER + "def choose(*a, **k):\n    return True, {'version': 3}\n"
    )
    stamp = time.time() + 4
    os.utime(editable / editable.name / "__init__.py", (stamp, stamp))
    record_study("62.3")
    [third] = detect_and_send()
    assert wait_session(third)["added_params"][name] == {"version": 3}


def test_jobs_keep_the_service_version_they_were_planned_with_and_each_load_is_recorded(
    live: Settings, define: Define, editable: Path
) -> None:
    from sqlalchemy import select

    from scheduler.store.db import transaction
    from scheduler.store.models import Service

    def recorded() -> tuple[str, str, bool, str | None]:
        with transaction() as db:
            row = db.scalars(select(Service).where(Service.name == editable.name)).one()
            return row.version, row.content_hash, row.enabled, row.error

    define([job("base")])
    name = f"{editable.name}-job"
    accept = "def decide(*a, **k):\n    return True\n"
    write_service(editable, "decide", accept, version="1.0")
    record_study("65.1")
    [first] = detect_and_send()
    [old] = [j for j in wait_session(first)["jobs"] if j["job_name"] == name]
    assert old["service_version"] == "1.0" and len(old["service_hash"]) == 64
    assert recorded() == ("1.0", old["service_hash"], True, None)

    write_service(editable, "decide", accept + "# a fix\n", version="1.1")
    stamp = time.time() + 2
    for path in (editable / "dcm-processor.json", editable / editable.name / "__init__.py"):
        os.utime(path, (stamp, stamp))
    record_study("65.2")
    [second] = detect_and_send()
    [new] = [j for j in wait_session(second)["jobs"] if j["job_name"] == name]
    assert new["service_version"] == "1.1" and new["service_hash"] != old["service_hash"]
    assert recorded() == ("1.1", new["service_hash"], True, None)
    result = CliRunner().invoke(cli, ["jobs", "--session", first, "--json"])
    [kept] = [j for j in json.loads(result.stdout) if j["job_name"] == name]
    assert (kept["service_version"], kept["service_hash"]) == ("1.0", old["service_hash"])

    shutil.rmtree(editable)
    editable.mkdir()  # the fixture removes it again
    record_study("65.3")
    [third] = detect_and_send()
    assert name not in [j["job_name"] for j in wait_session(third)["jobs"]]
    assert recorded()[2:] == (False, "no longer found on the services path")


def test_a_service_left_out_is_in_the_trace_and_show_prints_why(
    live: Settings, define: Define, editable: Path
) -> None:
    define([job("base")])
    write_service(editable, "decide", "def decide(*a, **k):\n    return True\n")
    # Its callback now names a function that does not exist.
    definition = json.loads((editable / "dcm-processor.json").read_text())
    definition["jobs"][0]["registryEntry"] = f"{editable.name}:missing"
    (editable / "dcm-processor.json").write_text(json.dumps(definition))
    record_study("63.1")
    [session_id] = detect_and_send()
    doc = wait_session(session_id)
    [left_out] = doc["trace"]["services_left_out"]
    assert left_out["service"] == editable.name
    assert "has no attribute 'missing'" in left_out["problems"][0]
    reason = doc["trace"]["jobs"][f"{editable.name}-job"]["reason"]
    assert reason.startswith(f"service {editable.name!r} is left out")

    shown = CliRunner().invoke(cli, ["show", session_id])
    assert shown.exit_code == 0, shown.output
    assert f"service '{editable.name}' left out" in shown.output
    assert "has no attribute 'missing'" in shown.output
    assert f"{editable.name}-job: service" in shown.output


def test_show_prints_the_first_line_of_a_callback_exception_and_json_keeps_the_traceback(
    live: Settings, define: Define
) -> None:
    define([job("boom", registryEntry="dcm_testjobs:explode"), job("fine")])
    record_study("64.1")
    [session_id] = detect_and_send()
    wait_session(session_id)
    shown = CliRunner().invoke(cli, ["show", session_id])
    assert shown.exit_code == 0, shown.output
    assert "boom: callback raised ValueError: callback exploded" in shown.output
    assert "Traceback" not in shown.output
    document = json.loads(CliRunner().invoke(cli, ["show", session_id, "--json"]).stdout)
    assert "Traceback" in document["trace"]["jobs"]["boom"]["traceback"]


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (PID 1 in a container may not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sleepers(path: Path) -> list[int]:
    wait_until(path.exists, timeout=60, what="the callback to start its programs")
    return [int(pid) for pid in path.read_text().split()]


def test_what_a_timed_out_callback_started_is_killed_with_it(
    define: Define, services_root: Path, tmp_path: Path
) -> None:
    path = tmp_path / "sleepers"
    params = {"sleepers": str(path)}
    define([job("greedy", registryEntry="dcm_testjobs:spawn_and_hang", params=params)])
    result = make_plan(services_root, timeout=1.0)
    assert "exceeded its time limit" in str(result.trace["jobs"]["greedy"]["reason"])
    for pid in sleepers(path):  # its own session included
        wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to be killed")


def start_planner(services_root: Path) -> subprocess.Popen[bytes]:
    """A process planning one session with the services in ``services_root``."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.test_planning import make_plan\n"
        "make_plan(Path(sys.argv[1]), timeout=600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, str(services_root)], cwd=Path(__file__).parents[1]
    )


def test_a_killed_planner_takes_down_what_its_callbacks_started(
    define: Define, services_root: Path, tmp_path: Path
) -> None:
    import signal

    path = tmp_path / "sleepers"
    params = {"sleepers": str(path)}
    define([job("greedy", registryEntry="dcm_testjobs:spawn_and_hang", params=params)])
    planner = start_planner(services_root)
    try:
        pids = sleepers(path)
        host = [p for p in psutil.Process(planner.pid).children() if p.pid not in pids]
        planner.send_signal(signal.SIGKILL)
        planner.wait(30)
        for pid in [*pids, *(p.pid for p in host)]:
            wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to die")
    finally:
        if planner.poll() is None:
            planner.kill()


def test_a_callback_that_ignores_signals_and_daemonizes_is_killed_at_its_limit(
    define: Define, services_root: Path, tmp_path: Path
) -> None:
    daemon = tmp_path / "daemon"
    params = {"daemon": str(daemon), "sleepers": str(tmp_path / "sleepers")}
    define([job("stubborn", registryEntry="dcm_testjobs:stubborn", params=params)])
    result = make_plan(services_root, timeout=1.0)
    assert "exceeded its time limit" in str(result.trace["jobs"]["stubborn"]["reason"])
    for pid in [int(daemon.read_text()), *sleepers(tmp_path / "sleepers")]:
        wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to be killed")


@pytest.mark.parametrize("entry", ["dcm_testjobs:stubborn", "dcm_testjobs.resetting:work"])
def test_a_killed_planner_takes_down_a_callback_that_ignores_or_resets_signals(
    define: Define, services_root: Path, tmp_path: Path, entry: str
) -> None:
    # Also when the callback's module, at import, put the signal the host
    # gets at the planner's death back to its default action (ending the
    # host at once, its daemon left behind) and blocked it.
    import signal

    daemon, pidfile = tmp_path / "daemon", tmp_path / "pid"
    params = {"daemon": str(daemon), "pidfile": str(pidfile)}
    define([job("stubborn", registryEntry=entry, params=params)])
    planner = start_planner(services_root)
    try:
        wait_until(pidfile.exists, timeout=60, what="the callback to start")
        host = int(pidfile.read_text())
        planner.send_signal(signal.SIGKILL)
        planner.wait(30)
        for pid in (host, int(daemon.read_text())):
            wait_until(lambda pid=pid: ended(pid), timeout=10, what=f"process {pid} to die")
    finally:
        if planner.poll() is None:
            planner.kill()


def test_a_host_killed_twice_signals_its_pid_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed call kills the host, then the planner discards it: the
    # second kill must not signal a pid that another process may now have.
    from scheduler import callbacks

    host = callbacks.CallbackHost("v")
    killed: list[int] = []
    kill_tree = callbacks.kill_tree

    def recorded(pid: int) -> None:
        killed.append(pid)
        kill_tree(pid)

    monkeypatch.setattr(callbacks, "kill_tree", recorded)
    host.kill()
    assert not host.alive
    host.kill()
    assert killed == [host.process.pid]


def test_a_host_stopping_half_way_through_an_answer_is_a_timeout() -> None:
    import socket
    import threading

    from scheduler import callbacks

    host = callbacks.CallbackHost("v")
    planner_end, host_end = socket.socketpair()
    real, host.sock = host.sock, planner_end
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            host.call({"job_name": "j"}, b"null", 0.3)
        except BaseException as error:  # noqa: BLE001 - the test reads it
            outcome.append(error)

    try:
        host_end.sendall(callbacks._LENGTH.pack(100) + b'{"sched')  # and no more
        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(30)
        assert not asking.is_alive(), "the planner still waits for the rest of the answer"
        assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
        assert not host.alive  # killed, as at any time limit
    finally:
        host_end.close()
        real.close()


UNRULY_CALLBACKS = """
import os
import sys


class Unshowable(Exception):
    def __str__(self):
        raise ValueError("no message")


def unshowable(*args, **kwargs):
    raise Unshowable()


def unrepresentable(*args, **kwargs):
    return Unrepresentable()


def unreadable(*args, **kwargs):
    return True, Unreadable(a=1)


def closing(*args, **kwargs):
    sys.stdout = open(1, "w", buffering=65536, closefd=False)  # flushed by the host
    os.close(1)
    os.close(2)
    print("unwritten")
    return True


def closing_then_failing(*args, **kwargs):
    os.close(1)
    os.close(2)
    os.write(1, b"nowhere")
    return True


def printing(*args, **kwargs):
    print("still here")
    return True


def disguised(*args, **kwargs):
    raise Disguised()
"""


def test_a_callback_that_raises_when_shown_or_closes_its_output_still_decides_in_the_same_host(
    tmp_path: Path,
) -> None:
    from scheduler.callbacks import hosts, run_in_host

    (tmp_path / "dcm_unruly").mkdir()
    (tmp_path / "dcm_unruly" / "__init__.py").write_text(
        UNRULY_CALLBACKS + ODD_OBJECTS + DISGUISED_EXCEPTION
    )

    def decide(name: str) -> dict[str, object]:
        request = {
            "entry": f"dcm_unruly:{name}",
            "roots": [str(tmp_path)],
            "job_name": "unruly",
            "params": {},
            "added_params": {},
            "kwargs": {},
        }
        return run_in_host(request, b"{}", 30, "unruly")

    try:
        first = decide("unshowable")
        host = hosts.get("unruly").process.pid
        assert not first["scheduled"]
        assert first["reason"] == (
            "callback raised Unshowable (its message could not be shown: its __str__ raised)"
        )
        assert "raise Unshowable()" in str(first["traceback"])
        second = decide("unrepresentable")
        assert second["reason"].startswith(
            "callback returned <Unrepresentable object whose repr raised>; expected"
        )
        third = decide("unreadable")
        assert not third["scheduled"]
        assert (
            third["reason"]
            == "callback returned a value that raised while read: KeyError: 'no items'"
        )
        # Closing its output loses what it printed, not its decision, and the
        # next callback prints as usual, in the same host.
        closing = decide("closing")
        assert closing["scheduled"] is True, closing
        failing = decide("closing_then_failing")
        assert failing["reason"] == "callback raised OSError: [Errno 9] Bad file descriptor"
        assert decide("printing") == {
            "scheduled": True,
            "reason": "callback returned True",
            "params": None,
            "traceback": None,
        }
        # A metaclass's __name__ and a message that raises when formatted.
        assert decide("disguised")["reason"] == "callback raised Disguised: formats badly"
        assert hosts.get("unruly").process.pid == host
    finally:
        hosts.discard()
