"""Planning: which jobs a session gets, with which parameters and edges (SPEC §8).

:func:`plan` is a pure function: job definitions, the headers document and a
way to run callbacks go in; a :class:`Plan` (jobs, dependency edges and a
decision trace for every definition) comes out. No database and no Celery
here, so the rules are tested directly and ``plan --dry-run`` shows exactly
what a real run would decide.

Evaluation order is phase (pre, main, post), then ``sortPosition``, then
``jobName``, adjusted so a job is always evaluated after the jobs it depends
on. A callback returns ``True``/``False`` or ``(bool, dict)``; the dict
becomes ``added_params[jobName]``, visible to later callbacks and to every
worker of the session. Anything else, an exception or a callback running
past its time limit means "not scheduled", with the reason in the trace.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.registry import EntryError, JobDefinition, load_entry

PHASE_ORDER = {"pre": 0, "main": 1, "post": 2}


@dataclass
class CallbackOutcome:
    scheduled: bool
    reason: str
    params: dict[str, Any] | None = None
    traceback: str | None = None


@dataclass
class Edge:
    job: str
    depends_on: str
    # False only for the implicit edges of post jobs: they wait for an end.
    requires_success: bool = True


@dataclass
class PlannedJob:
    definition: JobDefinition
    added_params: dict[str, Any] | None
    position: int


@dataclass
class Plan:
    event: str
    jobs: list[PlannedJob] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    added_params: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)

    @property
    def job_names(self) -> list[str]:
        return [job.definition.job_name for job in self.jobs]

    def dependencies_of(self, name: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.job == name]


CallbackRunner = Callable[
    [JobDefinition, dict[str, Any], dict[str, Any], dict[str, Any]], CallbackOutcome
]


def evaluation_order(definitions: Sequence[JobDefinition]) -> list[JobDefinition]:
    """Phase → sortPosition → jobName, but never before a dependency."""

    def key(d: JobDefinition) -> tuple[int, float, str]:
        return PHASE_ORDER.get(d.phase, 1), d.sort_position, d.job_name

    remaining = sorted(definitions, key=key)
    names = {d.job_name for d in remaining}
    done: set[str] = set()
    ordered: list[JobDefinition] = []
    while remaining:
        index = next(
            (
                i
                for i, candidate in enumerate(remaining)
                if all(d not in names or d in done for d in candidate.depends_on)
            ),
            0,  # a cycle: rejected at load, but never loop forever here
        )
        definition = remaining.pop(index)
        done.add(definition.job_name)
        ordered.append(definition)
    return ordered


def _decision(scheduled: bool, reason: str) -> dict[str, Any]:
    return {"scheduled": scheduled, "reason": reason}


def plan(
    definitions: Sequence[JobDefinition],
    headers: dict[str, Any],
    *,
    event: str,
    revision: int,
    context: dict[str, Any],
    run_callback: CallbackRunner,
) -> Plan:
    """Decide the jobs of one session; see the module docstring.

    ``context`` holds the callback kwargs (``session_id``, ``level``, ``uid``,
    ``session_dir`` …); ``event`` and ``revision`` are added to it.
    """
    result = Plan(event=event)
    jobs_trace: dict[str, Any] = {}
    scheduled: dict[str, JobDefinition] = {}
    for definition in evaluation_order(definitions):
        name = definition.job_name
        base = {"service": definition.service, "phase": definition.phase}
        if definition.disabled:
            jobs_trace[name] = base | _decision(False, "job is disabled in its definition")
            continue
        if not definition.matches(event):
            listens = ", ".join(definition.events) or "nothing"
            jobs_trace[name] = base | _decision(
                False, f"does not listen to event {event!r} (listens to {listens})"
            )
            continue
        if revision > 1 and definition.on_new_data == "ignore":
            jobs_trace[name] = base | _decision(
                False, f'onNewData is "ignore" and this is revision {revision} of the data'
            )
            continue
        missing = [d for d in definition.depends_on if d not in scheduled]
        if missing:
            jobs_trace[name] = base | _decision(
                False,
                "depends on "
                + ", ".join(repr(m) for m in missing)
                + ", which is not scheduled in this session",
            )
            continue
        if definition.registry_entry:
            kwargs = dict(context, event=event, revision=revision)
            if "session_dir" in context:
                kwargs["output_dir"] = os.path.join(context["session_dir"], name)
            outcome = run_callback(definition, headers, result.added_params, kwargs)
        else:
            outcome = CallbackOutcome(True, "no registryEntry: always scheduled")
        entry = base | _decision(outcome.scheduled, outcome.reason)
        if outcome.traceback:
            entry["traceback"] = outcome.traceback
        jobs_trace[name] = entry
        if not outcome.scheduled:
            continue
        if outcome.params is not None:
            result.added_params[name] = outcome.params
        scheduled[name] = definition
        result.jobs.append(PlannedJob(definition, outcome.params, len(result.jobs)))

    result.edges = _edges(list(scheduled.values()))
    result.trace = {"event": event, "revision": revision, "jobs": jobs_trace}
    return result


def _edges(jobs: list[JobDefinition]) -> list[Edge]:
    """Explicit dependsOn edges, plus the phase rules: main jobs need every pre
    job to succeed; post jobs wait for every pre and main job to end."""
    pre = [j.job_name for j in jobs if j.phase == "pre"]
    pre_and_main = [j.job_name for j in jobs if j.phase in ("pre", "main")]
    edges: list[Edge] = []
    for job in jobs:
        explicit = set(job.depends_on)
        edges.extend(Edge(job.job_name, d) for d in job.depends_on)
        if job.phase == "main":
            edges.extend(Edge(job.job_name, p) for p in pre if p not in explicit)
        elif job.phase == "post":
            edges.extend(
                Edge(job.job_name, p, requires_success=False)
                for p in pre_and_main
                if p not in explicit
            )
    return edges


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
            json.dumps(params)
        except (TypeError, ValueError) as exc:
            return CallbackOutcome(False, f"callback returned parameters that are not JSON: {exc}")
        verb = "returned" if decision else "declined with"
        return CallbackOutcome(decision, f"callback {verb} ({decision}, params)", params or {})
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "…"
    return CallbackOutcome(
        False, f"callback returned {shown}; expected True, False or (bool, dict): not scheduled"
    )


class _Call:
    """One callback handed to the callback thread, and what came of it."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.function()
        except BaseException as exc:  # noqa: BLE001 - reported to the planner, never raised here
            self.error = exc
        finally:
            self.done.set()


def _serve(inbox: queue.SimpleQueue[_Call | None]) -> None:
    while (call := inbox.get()) is not None:
        call.run()


class _CallbackThread:
    """A daemon thread per planning thread that runs callbacks one after
    another. A callback that overruns its time limit is abandoned with its
    thread (Python cannot kill a thread): that thread exits once the callback
    returns, if ever, and the next callback gets a fresh one. Daemon threads
    never hold up the interpreter's exit."""

    def __init__(self) -> None:
        self._local = threading.local()

    def run(self, function: Callable[[], Any], timeout: float) -> _Call | None:
        """The finished call, or None when ``function()`` overran ``timeout``."""
        inbox, thread = getattr(self._local, "worker", None) or (None, None)
        if inbox is None or thread is None or not thread.is_alive():  # none, hung, or forked
            inbox = queue.SimpleQueue()
            thread = threading.Thread(target=_serve, args=(inbox,), name="callback", daemon=True)
            thread.start()
            self._local.worker = (inbox, thread)
        call = _Call(function)
        inbox.put(call)
        if call.done.wait(timeout):
            return call
        inbox.put(None)  # the thread ends after the hung callback, if it ever returns
        self._local.worker = None
        return None


_callback_thread = _CallbackThread()


def _private(value: Any) -> Any:
    """A copy the callback may change freely: headers and params are JSON, and
    a JSON round trip copies them several times faster than ``deepcopy``."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return copy.deepcopy(value)


def make_callback_runner(
    timeout: float, entries: dict[tuple[str, tuple[Any, ...]], Any] | None = None
) -> CallbackRunner:
    """Run callbacks on private copies of their inputs, within ``timeout`` seconds.

    A callback gets deep copies, so one that mutates the headers or params it
    was given cannot affect any other. It runs in a daemon thread: a hanging
    callback is abandoned (Python cannot kill a thread) and the planner moves on.
    ``entries`` caches imported callbacks for as long as the caller's registry.
    """

    def run(
        definition: JobDefinition,
        headers: dict[str, Any],
        added_params: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> CallbackOutcome:
        entry = definition.registry_entry or ""
        key = (entry, tuple(definition.entry_roots))
        callback = entries.get(key) if entries is not None else None
        if callback is None:
            try:
                callback = load_entry(entry, definition.entry_roots)
            except EntryError as exc:
                return CallbackOutcome(False, f"cannot import registryEntry {entry!r}: {exc}")
            if entries is not None:
                entries[key] = callback

        def call() -> Any:
            return callback(
                definition.job_name,
                _private(headers),
                _private(definition.params),
                _private(added_params),
                **kwargs,
            )

        done = _callback_thread.run(call, timeout)
        if done is None:
            return CallbackOutcome(
                False, f"callback exceeded its time limit of {timeout:g}s: not scheduled"
            )
        error = done.error
        if error is not None:
            trace = "".join(traceback.format_exception(error))
            return CallbackOutcome(
                False,
                f"callback raised {type(error).__name__}: {error}",
                traceback=trace,
            )
        return interpret_return(done.value)

    return run
