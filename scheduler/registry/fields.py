"""Reading one job's fields: types, defaults, legacy names, suggestions.

Every problem is reported on the service's draft with the file, the job and
the field, so ``services validate`` can say exactly what to fix.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.config import LONGEST_DURATION, ConfigError, parse_duration
from scheduler.jsonsafe import TOO_DEEP, unstorable
from scheduler.registry.definitions import (
    CHANNEL,
    DEFAULT_PRIORITY,
    DEFAULT_RETRY_DELAY_S,
    DEFAULT_SORT_POSITION,
    DEFAULT_TIMEOUT_S,
    JOB_FIELDS,
    JOB_NAME,
    JOB_NAME_MAX,
    LEGACY_FIELDS,
    ON_NEW_DATA,
    VERSION,
    Draft,
    JobDefinition,
    show,
)
from scheduler.registry.positions import line_in_job
from scheduler.rules import Condition, RuleError, compile_condition, render
from scheduler.vocabulary import DEFAULT_CHANNEL, Phase
from scheduler.windows import WindowError, parse_window


def read_json(path: Path, draft: Draft) -> Any:
    """The JSON document at ``path``; ``None`` after reporting why it is unusable."""
    try:
        # utf-8-sig: editors on Windows like to start files with a BOM.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        draft.report(None, None, f"cannot read the file: {exc}")
        return None
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                duplicates.append(key)
            result[key] = value
        return result

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        draft.report(None, None, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
        return None
    except ValueError as exc:  # NaN, Infinity: Python reads them, no JSON has them
        draft.report(None, None, f"invalid JSON: {exc}")
        return None
    except RecursionError:  # the reader recurses once per level of nesting
        draft.report(None, None, TOO_DEEP)
        return None
    flaw = unstorable(data)
    if flaw == TOO_DEEP:
        draft.report(None, None, TOO_DEEP)
        return None
    if flaw:
        draft.report(None, None, f"the store cannot keep this file's values: {flaw}")
        return None
    for key in duplicates:
        # json keeps the last value silently; the first one was surely meant too.
        draft.report(None, key, f"key {key!r} appears twice in one object")
    return data


class Invalid(Exception):
    """A field value that does not fit; the message says what was expected."""


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {show(value)}")
    return value


def _non_empty(value: Any) -> str:
    if not text(value).strip():
        raise Invalid("expected a non-empty string")
    return str(value)


def job_name(value: Any) -> str:
    name = text(value)
    if not JOB_NAME.fullmatch(name):
        raise Invalid(f"expected letters, digits, '_', '.' or '-' only, got {show(value)}")
    if len(name) > JOB_NAME_MAX:
        raise Invalid(f"expected at most {JOB_NAME_MAX} characters")
    return name


def service_version(value: Any) -> str:
    """A version is printed in tables and searched for in a recall
    (``jobs --service --version``): one short line, like ``2.3.0`` or
    ``2024.1-rc1+build5``; empty for none."""
    version = text(value)
    if version and not VERSION.fullmatch(version):
        raise Invalid(
            "expected a version of letters, digits, '.', '_', '+' or '-' "
            f"(64 characters at most), got {show(value)}"
        )
    return version


def _channel(value: Any) -> str:
    """A channel is a broker queue and a ``-Q`` argument: no commas, spaces
    or other characters a queue list or a shell would split."""
    name = text(value)
    if not CHANNEL.fullmatch(name):
        raise Invalid(
            "expected a queue name: a letter or digit, then letters, digits, '_', '.', ':' "
            f"or '-', got {show(value)}"
        )
    return name


def _names(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise Invalid(f"expected a string or a list of strings, got {show(value)}")
    return tuple(dict.fromkeys(items))  # drop repeats, keep order


def _number(value: Any) -> float:
    # bool is an int in Python; `true` is never a sort position.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Invalid(f"expected a number, got {show(value)}")
    return float(value)


# More retries than this is a typo; the attempt counters are 32-bit integers.
MOST_RETRIES = 1000


def _duration(what: str, *, positive: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            seconds = parse_duration(value, what=what)
        except ConfigError as exc:
            raise Invalid(str(exc).removeprefix(f"{what}: ")) from exc
        if positive and seconds <= 0:
            raise Invalid("expected a duration greater than 0")
        if seconds > LONGEST_DURATION:
            raise Invalid(f"expected a duration of at most 366 days, got {show(value)}")
        return seconds

    return parse


def _integer(low: int, high: int | None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        span = f"from {low} to {high}" if high is not None else f"{low} or more"
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer {span}, got {show(value)}")
        if value < low or (high is not None and value > high):
            raise Invalid(f"expected an integer {span}, got {value}")
        return value

    return parse


def _window(value: Any) -> str:
    try:
        return str(parse_window(text(value)))
    except WindowError as exc:
        # Reported like a rule: with the line it is written on.
        raise InvalidRule(RuleError(("window",), str(exc))) from exc


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise Invalid(f"expected one of {', '.join(map(repr, options))}, got {show(value)}")
        return str(value)

    return parse


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"expected an object, got {show(value)}")
    copy: dict[str, Any] = json.loads(json.dumps(value))  # the definition stays untouched
    return copy


class InvalidRule(Invalid):
    """A ``when`` or ``urgent`` condition that cannot be used, with where inside it."""

    def __init__(self, error: RuleError) -> None:
        super().__init__(error.message)
        self.error = error


def _when(value: Any) -> Condition:
    try:
        return compile_condition(value, ("when",))
    except RuleError as exc:
        raise InvalidRule(exc) from exc


def _urgent(value: Any) -> Condition | bool:
    if isinstance(value, bool):
        return value
    try:
        if not isinstance(value, dict):
            raise RuleError(
                ("urgent",), f"expected true, false or an object of conditions, got {show(value)}"
            )
        return compile_condition(value, ("urgent",))
    except RuleError as exc:
        raise InvalidRule(exc) from exc


def _report_rule(draft: Draft, label: str, name: Any, error: RuleError) -> None:
    """Report a wrong condition at the exact place inside it, with its line."""
    line = line_in_job(draft.definition_file, name, error.path) if isinstance(name, str) else None
    where = f"line {line}: " if line is not None else ""
    draft.report(label, render(error.path), where + error.message)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {show(value)}")
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "jobName": job_name,
    "workerEntry": _non_empty,
    "registryEntry": _non_empty,
    "when": _when,
    "urgent": _urgent,
    "events": _names,
    "dependsOn": _names,
    "sortPosition": _number,
    "phase": _choice([phase.value for phase in Phase]),
    "channel": _channel,
    "timeout": _duration("timeout", positive=True),
    "retries": _integer(0, MOST_RETRIES),
    "retryDelay": _duration("retryDelay", positive=False),
    "priority": _integer(0, 9),
    "window": _window,
    "params": _object,
    "python": _non_empty,
    "onNewData": _choice(ON_NEW_DATA),
    "disabled": _boolean,
    "description": text,
}
_REQUIRED = {
    "jobName": "the job's unique name",
    "workerEntry": "the worker function, like 'package.module:worker'",
}


def suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class JobContext:
    """What a job inherits from where it is written."""

    folder: Path  # relative `python` paths start here
    default_events: tuple[str, ...]
    default_sort: float = DEFAULT_SORT_POSITION
    phase: str | None = None  # fixed by the system settings list holding the job
    list_name: str | None = None


def _python_path(value: str, folder: Path) -> str:
    # A bare name ("python3.10") is looked up on PATH by the worker; a relative
    # path is relative to the service, not to wherever the scheduler started.
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if "/" not in value and os.sep not in value:
        return value
    return str(folder / path)


def _read_job(draft: Draft, raw: Any, index: int, ctx: JobContext) -> None:
    """Validate one job and add it to ``draft`` (its name even when invalid)."""
    if not isinstance(raw, dict):
        draft.report(f"#{index}", None, f"expected a job object, got {show(raw)}")
        return
    name = raw.get("jobName")
    label = name if isinstance(name, str) and name else f"#{index}"
    before = len(draft.problems)
    written: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        canonical = LEGACY_FIELDS.get(key, key)
        if canonical not in _PARSERS:
            known = (*JOB_FIELDS, *LEGACY_FIELDS)
            draft.report(label, key, f"unknown field {key!r}{suggestion(key, known)}")
            continue
        if canonical in written:
            draft.report(label, key, f"use either {written[canonical]!r} or {key!r}, not both")
            continue
        written[canonical] = key
        if value is None:
            # null means "the default", as in dcm-processor's `"dependsOn": null`;
            # a required field is reported missing below.
            continue
        try:
            values[canonical] = _PARSERS[canonical](value)
        except InvalidRule as exc:
            _report_rule(draft, label, name, exc.error)
        except Invalid as exc:
            draft.report(label, key, str(exc))
    for canonical, meaning in _REQUIRED.items():
        key = written.get(canonical, canonical)
        if raw.get(key) is None:
            draft.report(label, key, f"missing ({meaning})")
    if ctx.phase is not None and values.setdefault("phase", ctx.phase) != ctx.phase:
        draft.report(
            label,
            written["phase"],
            f"jobs of {ctx.list_name} are phase {ctx.phase!r}; remove this field",
        )
    if isinstance(name, str) and name:
        draft.job_names.append(name)
        draft.written[name] = written
    if len(draft.problems) == before:
        draft.service.jobs.append(_job_definition(draft, values, ctx))


def _job_definition(draft: Draft, values: dict[str, Any], ctx: JobContext) -> JobDefinition:
    python = values.get("python")
    return JobDefinition(
        job_name=values["jobName"],
        service=draft.name,
        worker_entry=values["workerEntry"],
        registry_entry=values.get("registryEntry"),
        when=values.get("when"),
        urgent=values.get("urgent", False),
        events=values.get("events", ctx.default_events),
        depends_on=values.get("dependsOn", ()),
        sort_position=values.get("sortPosition", ctx.default_sort),
        phase=values.get("phase", Phase.MAIN.value),
        channel=values.get("channel", DEFAULT_CHANNEL),
        timeout_s=values.get("timeout", DEFAULT_TIMEOUT_S),
        retries=values.get("retries", 0),
        retry_delay_s=values.get("retryDelay", DEFAULT_RETRY_DELAY_S),
        priority=values.get("priority", DEFAULT_PRIORITY),
        window=values.get("window"),
        params=values.get("params", {}),
        python=_python_path(python, ctx.folder) if python else None,
        on_new_data=values.get("onNewData", ON_NEW_DATA[0]),
        disabled=values.get("disabled", False),
        description=values.get("description", ""),
        entry_roots=draft.roots,
        source=draft.definition_file or draft.service.source,
        package=draft.package,
    )


def read_jobs(draft: Draft, jobs: Any, ctx: JobContext, where: str = "jobs") -> None:
    if not isinstance(jobs, list):
        draft.report(None, where, f"expected a list of jobs, got {show(jobs)}")
        return
    for index, raw in enumerate(jobs, start=1):
        _read_job(draft, raw, index, ctx)
