"""Planning rules (README, "Writing a service"): order, callbacks, dependencies, phases, added_params, trace."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from scheduler.planning import Plan, decide, evaluation_order, make_callback_runner
from scheduler.registry import load_registry

from .conftest import Define

ENTRY = "dcm_testjobs:work"
HEADERS = {"level": "study", "uid": "1.2.3", "patient": {"PatientID": "P"}, "series": []}


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"jobName": name, "workerEntry": ENTRY, **fields}


def make_plan(
    root: Path,
    *,
    event: str = "study.stable",
    revision: int = 1,
    headers: dict[str, Any] | None = None,
    timeout: float = 5.0,
    uid: str = "1.2.3",
) -> Plan:
    registry = load_registry([root])
    assert registry.ok, registry.problems
    return decide(
        registry.every_job(),
        headers or dict(HEADERS, uid=uid),
        event=event,
        revision=revision,
        context={"session_id": "s1", "level": "study", "uid": uid, "session_dir": "/tmp/s1"},
        run_callback=make_callback_runner(timeout),
    )


def reason(result: Plan, name: str) -> str:
    return str(result.trace["jobs"][name]["reason"])


def test_evaluation_order_is_phase_then_sort_position_then_name(
    define: Define, services_root: Path
) -> None:
    define(
        [
            job("post-a", phase="post", sortPosition=0),
            job("main-b", sortPosition=5),
            job("main-a", sortPosition=5),
            job("main-first", sortPosition=1),
            job("pre-z", phase="pre", sortPosition=100),
        ]
    )
    result = make_plan(services_root)
    assert result.job_names == ["pre-z", "main-first", "main-a", "main-b", "post-a"]


def test_a_dependency_is_evaluated_before_its_dependent_whatever_the_sort_position(
    define: Define, services_root: Path
) -> None:
    define([job("early", sortPosition=1, dependsOn="late"), job("late", sortPosition=50)])
    registry = load_registry([services_root])
    assert [j.job_name for j in evaluation_order(registry.jobs())] == ["late", "early"]


def test_callback_returning_false_is_not_scheduled_with_reason(
    define: Define, services_root: Path
) -> None:
    define([job("no", registryEntry="dcm_testjobs:decline")])
    result = make_plan(services_root)
    assert result.job_names == []
    assert reason(result, "no") == "callback returned False"


def test_callback_raising_is_not_scheduled_and_trace_keeps_traceback(
    define: Define, services_root: Path
) -> None:
    define([job("boom", registryEntry="dcm_testjobs:explode"), job("fine")])
    result = make_plan(services_root)
    assert result.job_names == ["fine"]
    assert reason(result, "boom") == "callback raised ValueError: callback exploded"
    assert "Traceback" in result.trace["jobs"]["boom"]["traceback"]


def test_callback_hanging_past_the_limit_is_not_scheduled(
    define: Define, services_root: Path
) -> None:
    define([job("stuck", registryEntry="dcm_testjobs:hang"), job("fine")])
    result = make_plan(services_root, timeout=0.3)
    assert result.job_names == ["fine"]
    assert "exceeded its time limit of 0.3s" in reason(result, "stuck")


def test_a_hung_callback_does_not_keep_the_planner_from_exiting(
    define: Define, services_root: Path
) -> None:
    # Python joins non-daemon threads at exit: a planner whose callback hangs
    # must still stop when Celery shuts it down.
    import subprocess
    import sys

    define([job("stuck", registryEntry="dcm_testjobs:hang"), job("fine")])
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.test_planning import make_plan\n"
        "print(make_plan(Path(sys.argv[1]), timeout=0.2).job_names, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(services_root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert (done.returncode, done.stdout.strip()) == (0, "['fine']"), done.stderr


def test_callback_returning_garbage_is_not_scheduled(define: Define, services_root: Path) -> None:
    define([job("odd", registryEntry="dcm_testjobs:garbage")])
    result = make_plan(services_root)
    assert result.job_names == []
    assert "returned 'yes please'; expected True, False or (bool, dict)" in reason(result, "odd")


def test_callback_parameters_no_store_keeps_leave_only_that_job_unscheduled(
    define: Define, services_root: Path
) -> None:
    # PostgreSQL refused the whole plan (NaN, infinity, NUL, a lone surrogate,
    # also in what a callback raised or returned as garbage) and the session
    # stayed planning; SQLite kept it: now no store gets them.
    from scheduler.jsonsafe import unstorable

    kinds = (
        *("nan", "inf", "nul", "surrogate", "deep", "nested"),
        *("raise-nul", "raise-surrogate", "shown"),
    )
    define(
        [
            job(kind, registryEntry="dcm_testjobs:unkeepable", params={"kind": kind})
            for kind in kinds
        ]
        + [job("fine")]
    )
    result = make_plan(services_root)
    assert result.job_names == ["fine"]
    assert "not JSON: Out of range float values" in reason(result, "nan")
    assert "not JSON: Out of range float values" in reason(result, "inf")
    assert "the store cannot keep: a string holds a NUL character" in reason(result, "nul")
    assert "not valid Unicode (a lone surrogate)" in reason(result, "surrogate")
    assert "nested too deep for JSON" in reason(result, "deep")
    assert "cannot keep: nested too deep: more than 100 levels" in reason(result, "nested")
    assert "callback raised ValueError: bad a\\x00b value" in reason(result, "raise-nul")
    assert "bad \\ud800 value" in reason(result, "raise-surrogate")
    assert "odd\\x00repr" in reason(result, "shown")
    assert unstorable(result.trace) is None  # reasons and tracebacks as the store keeps them


def test_dependency_on_an_unscheduled_job_cascades(define: Define, services_root: Path) -> None:
    define(
        [
            job("a", registryEntry="dcm_testjobs:decline"),
            job("b", dependsOn="a"),
            job("c", dependsOn=["b"]),
            job("d"),
        ]
    )
    result = make_plan(services_root)
    assert result.job_names == ["d"]
    assert reason(result, "b") == "depends on 'a', which is not scheduled in this session"
    assert reason(result, "c") == "depends on 'b', which is not scheduled in this session"


def test_main_jobs_need_every_pre_job_and_post_jobs_wait_for_all_to_end(
    define: Define, services_root: Path
) -> None:
    define(
        [
            job("anon", phase="pre"),
            job("seg"),
            job("report", dependsOn="seg"),
            job("store", phase="post"),
            job("clean", phase="post", dependsOn="store"),
        ]
    )
    result = make_plan(services_root)
    edges = {(e.job, e.depends_on): e.requires_success for e in result.edges}
    assert edges[("seg", "anon")] is True
    assert edges[("report", "anon")] is True
    assert edges[("report", "seg")] is True
    assert edges[("store", "anon")] is False  # post: waits for an end, not a success
    assert edges[("store", "seg")] is False
    assert edges[("store", "report")] is False
    assert edges[("clean", "store")] is True  # explicit dependsOn always needs success
    assert ("anon", "seg") not in edges and ("store", "clean") not in edges


def test_added_params_are_visible_to_later_callbacks_only(
    define: Define, services_root: Path
) -> None:
    define(
        [
            job("first", registryEntry="dcm_testjobs:inspect", sortPosition=1),
            job("second", registryEntry="dcm_testjobs:inspect", sortPosition=2),
        ]
    )
    result = make_plan(services_root)
    assert result.added_params["first"]["seen"] == []
    assert result.added_params["second"]["seen"] == ["first"]
    kwargs = result.added_params["first"]["kwargs"]
    assert {"event", "session_id", "level", "uid", "revision"} <= set(kwargs)


def test_a_callback_mutating_its_inputs_does_not_affect_other_callbacks(
    define: Define, services_root: Path
) -> None:
    define(
        [
            job("vandal", registryEntry="dcm_testjobs:vandal", sortPosition=1),
            job("victim", registryEntry="dcm_testjobs:inspect", sortPosition=2),
        ]
    )
    result = make_plan(services_root)
    assert result.added_params["victim"]["headers_uid"] == "1.2.3"
    assert result.added_params["victim"]["poisoned"] is False


def test_added_params_never_leak_between_sessions_planned_concurrently(
    define: Define, services_root: Path
) -> None:
    define(
        [
            job("first", registryEntry="dcm_testjobs:accept", sortPosition=1),
            job("second", registryEntry="dcm_testjobs:inspect", sortPosition=2),
        ]
    )
    plans: dict[str, Plan] = {}

    def run(uid: str) -> None:
        plans[uid] = make_plan(services_root, uid=uid)

    threads = [threading.Thread(target=run, args=(f"1.2.{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for uid, result in plans.items():
        assert result.added_params["first"]["uid"] == uid
        assert result.added_params["second"]["seen"] == ["first"]
        assert result.added_params["second"]["headers_uid"] == uid


@pytest.mark.parametrize(
    ("events", "event", "scheduled"),
    [
        ("study.stable", "study.stable", True),
        (["series.stable"], "study.stable", False),
        ("study.*", "study.stable", True),
        ("*", "reprocess", True),
        (["reprocess"], "study.stable", False),
    ],
)
def test_jobs_run_only_for_the_events_they_listen_to(
    define: Define, services_root: Path, events: Any, event: str, scheduled: bool
) -> None:
    define([job("listener", events=events)])
    result = make_plan(services_root, event=event)
    assert (result.job_names == ["listener"]) is scheduled
    if not scheduled:
        assert reason(result, "listener").startswith(f"does not listen to event '{event}'")


def test_on_new_data_ignore_runs_only_for_the_first_revision(
    define: Define, services_root: Path
) -> None:
    define([job("once", onNewData="ignore"), job("always")])
    assert make_plan(services_root, revision=1).job_names == ["always", "once"]
    second = make_plan(services_root, revision=2)
    assert second.job_names == ["always"]
    assert "revision 2" in reason(second, "once")


def test_every_definition_appears_in_the_trace(define: Define, services_root: Path) -> None:
    define([job("on"), job("off", disabled=True), job("other", events="series.stable")])
    result = make_plan(services_root)
    assert set(result.trace["jobs"]) == {"on", "off", "other"}
    assert reason(result, "off") == "job is disabled in its definition"
    assert reason(result, "on") == "no registryEntry: always scheduled"


def test_a_plan_interrupted_while_a_callback_runs_leaves_no_answer_for_the_next(
    define: Define, services_root: Path
) -> None:
    # A signal handler's exception (a task's soft time limit) stopped the
    # planner while its callback still ran; that callback's answer was read
    # as the answer to the next session's first call.
    import signal

    define([job("slow", registryEntry="dcm_testjobs:pause", params={"seconds": 0.5})])

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            make_plan(services_root, uid="1.2.1")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    define([job("quick", registryEntry="dcm_testjobs:accept")])
    result = make_plan(services_root, uid="1.2.2")
    assert result.job_names == ["quick"]
    assert result.added_params["quick"] == {"seen": [], "uid": "1.2.2", "job": "quick"}


def test_a_callback_whose_forked_child_returns_does_not_answer_for_other_jobs(
    define: Define, services_root: Path
) -> None:
    define(
        [job("forker", registryEntry="dcm_testjobs:fork_and_return", sortPosition=1)]
        + [job(f"then{n}", registryEntry="dcm_testjobs:accept", sortPosition=2) for n in range(3)]
    )
    for uid in ("1.2.1", "1.2.2"):
        result = make_plan(services_root, uid=uid)
        assert result.job_names == ["forker", "then0", "then1", "then2"]
        assert result.added_params["forker"] == {"child": False}
        for n in range(3):
            assert result.added_params[f"then{n}"]["job"] == f"then{n}"
            assert result.added_params[f"then{n}"]["uid"] == uid


def test_a_channel_without_a_worker_is_logged_once_until_a_worker_consumes_it(
    define: Define, services_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from scheduler import sessions

    define([job("seg", channel="gpu-once"), job("report", channel="gpu-once"), job("cpu")])
    caplog.set_level("WARNING", logger="scheduler.channels")

    def logged(live: set[str]) -> list[str]:
        caplog.clear()
        result = make_plan(services_root)
        sessions.warn_unconsumed_channels(result, live)
        # Every session's trace still names each job that waits.
        assert len(result.trace.get("warnings", [])) == (0 if "gpu-once" in live else 2)
        return [r.getMessage() for r in caplog.records if "gpu-once" in r.getMessage()]

    first = logged({"default"})
    assert len(first) == 1 and "no live worker consumes" in first[0]
    assert logged({"default"}) == []  # the next study: nothing new to say
    assert logged({"default", "gpu-once"}) == []  # a worker came
    again = logged({"default"})  # and went: said again
    assert len(again) == 1
