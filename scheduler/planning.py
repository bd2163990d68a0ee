"""Planning: which jobs a session gets, with which parameters and edges.

:func:`decide` is a pure function: job definitions, the headers document and a
way to run callbacks go in; a :class:`Plan` (jobs, dependency edges and a
decision trace for every definition) comes out. No database and no Celery
here, so the rules are tested directly and ``plan --dry-run`` shows exactly
what a real run would decide.

Evaluation order is phase (pre, main, post), then ``sortPosition``, then
``jobName``, adjusted so a job is always evaluated after the jobs it depends
on. A callback returns ``True``/``False`` or ``(bool, dict)``; the dict
becomes ``added_params[jobName]``, visible to later callbacks and to every
worker of the session. Anything else, an exception or a callback running
past its time limit means "not scheduled", with the reason in the trace
(README, "Writing a service").

A job's ``when`` condition (:mod:`scheduler.rules`) is tested first, on each
series: when no series matches, the job is not scheduled and its callback is
not run; otherwise the matching series are ``added_params[jobName]["series"]``,
which the callback sees and may narrow. A scheduled job whose ``urgent``
condition holds, or whose callback returned ``"urgent": true`` in its dict,
makes the session urgent; the trace's ``urgent`` says why (README, "Rules
without code" and "Urgent studies first").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.callbacks import CallbackOutcome, run_in_host
from scheduler.jsonsafe import escaped
from scheduler.registry.definitions import JobDefinition
from scheduler.rules import Condition, evaluate, series_records
from scheduler.vocabulary import Phase


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
    urgent: bool = False

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
        return Phase(d.phase).order, d.sort_position, d.job_name

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


def decide(
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
    # Seconds each callback took (README, "Metrics"): observed, not decided on.
    callback_s: dict[str, float] = {}
    scheduled: dict[str, JobDefinition] = {}
    urgent: list[str] = []
    # Read the series once, and only when a rule needs them (large studies).
    rules = any(d.when is not None or isinstance(d.urgent, Condition) for d in definitions)
    records = series_records(headers) if rules else []
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
        matched: list[str] | None = None
        when = ""
        if definition.when is not None:
            tested = evaluate(definition.when, records)
            when = "when: " + tested.summary()
            if not tested.holds:
                jobs_trace[name] = base | _decision(False, when)
                continue
            matched = tested.matched
            # The callback sees the matching series where it would put its own.
            result.added_params[name] = {"series": matched}
        if definition.registry_entry:
            kwargs = dict(context, event=event, revision=revision)
            if "session_dir" in context:
                kwargs["output_dir"] = os.path.join(context["session_dir"], name)
            started = time.perf_counter()
            outcome = run_callback(definition, headers, result.added_params, kwargs)
            callback_s[name] = round(time.perf_counter() - started, 6)
            if matched is not None:
                outcome.reason = f"{when}; {outcome.reason}"
                if outcome.scheduled:
                    outcome.params = {"series": matched, **(outcome.params or {})}
        elif matched is not None:
            outcome = CallbackOutcome(True, when, {"series": matched})
        else:
            outcome = CallbackOutcome(True, "no registryEntry: always scheduled")
        entry = base | _decision(outcome.scheduled, outcome.reason)
        if outcome.traceback:
            entry["traceback"] = outcome.traceback
        jobs_trace[name] = entry
        if not outcome.scheduled:
            result.added_params.pop(name, None)
            continue
        if outcome.params is not None:
            result.added_params[name] = outcome.params
        why = _urgency(definition, outcome.params, records, matched)
        if why:
            entry["urgent"] = why
            urgent.append(f"job {name!r}: {why}")
        scheduled[name] = definition
        result.jobs.append(PlannedJob(definition, outcome.params, len(result.jobs)))

    result.edges = _edges(list(scheduled.values()))
    result.trace = {
        "event": event,
        "revision": revision,
        "jobs": jobs_trace,
        "callback_s": callback_s,
    }
    if urgent:
        result.urgent = True
        result.trace["urgent"] = urgent
    return result


def _urgency(
    definition: JobDefinition,
    params: dict[str, Any] | None,
    records: list[tuple[str, dict[str, list[Any]]]],
    matched: list[str] | None,
) -> str:
    """Why this scheduled job makes its session urgent; "" when it does not.
    An ``urgent`` condition is tested on the series the job's ``when``
    matched (every series without ``when``)."""
    if params is not None and params.get("urgent") is True:
        return 'its callback returned "urgent": true'
    if definition.urgent is True:
        return '"urgent": true in its definition'
    if isinstance(definition.urgent, Condition):
        tested = evaluate(definition.urgent, records, only=matched)
        if tested.holds:
            return "urgent: " + tested.summary()
    return ""


def _edges(jobs: list[JobDefinition]) -> list[Edge]:
    """Explicit dependsOn edges, plus the phase rules: main jobs need every pre
    job to succeed; post jobs wait for every pre and main job to end."""
    pre = [j.job_name for j in jobs if j.phase == Phase.PRE]
    pre_and_main = [j.job_name for j in jobs if j.phase in (Phase.PRE, Phase.MAIN)]
    edges: list[Edge] = []
    for job in jobs:
        explicit = set(job.depends_on)
        edges.extend(Edge(job.job_name, d) for d in job.depends_on)
        if job.phase == Phase.MAIN:
            edges.extend(Edge(job.job_name, p) for p in pre if p not in explicit)
        elif job.phase == Phase.POST:
            edges.extend(
                Edge(job.job_name, p, requires_success=False)
                for p in pre_and_main
                if p not in explicit
            )
    return edges


def make_callback_runner(timeout: float, version: str = "") -> CallbackRunner:
    """Run callbacks in this thread's callback host (:mod:`scheduler.callbacks`),
    within ``timeout`` seconds each.

    Each callback gets its own copy of the headers, params and added_params
    (they cross a process boundary as JSON), so one that mutates its inputs
    cannot affect any other. ``version`` identifies the services' code: a
    host that imported another version is replaced first. One runner serves
    one plan: the headers document is encoded once for all its callbacks.
    """
    encoded: list[tuple[dict[str, Any], bytes]] = []

    def run(
        definition: JobDefinition,
        headers: dict[str, Any],
        added_params: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> CallbackOutcome:
        if not encoded or encoded[0][0] is not headers:
            encoded[:] = [(headers, json.dumps(headers).encode())]
        request = {
            "entry": definition.registry_entry or "",
            "roots": [str(root) for root in definition.entry_roots],
            "job_name": definition.job_name,
            "params": definition.params,
            "added_params": added_params,
            "kwargs": kwargs,
        }
        decision = run_in_host(request, encoded[0][1], timeout, version)
        # What the callback raised or returned may hold text no store keeps.
        shown = decision.get("traceback")
        return CallbackOutcome(
            bool(decision.get("scheduled")),
            escaped(str(decision.get("reason", ""))),
            decision.get("params"),
            None if shown is None else escaped(str(shown)),
        )

    return run
