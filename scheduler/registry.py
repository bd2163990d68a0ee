"""The service registry: finds, reads and validates service definitions (SPEC §7).

A service is a folder on the services path holding ``dcm-processor.json``
(or a legacy dcm-processor registry folder with ``settings.json``), a
package registered under the entry-point group ``dcm_processor.services``,
or the legacy system settings file with its ``preServices``/``postServices``.
:func:`load_registry` reads them all, checks every job field, the entries
(importable, callable, inside their service folder), job names across
services, ``dependsOn`` and cycles, and returns a :class:`Registry`: the
services that load, and every :class:`Problem` found. A service with a problem
is left out on its own; every other service keeps working.
:func:`load_entry` is the one way entries are imported, here, by the planner
and by the workers; :func:`sync_services` records the outcome in the store.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.config import ConfigError, parse_duration
from scheduler.entries import (
    EntryError,
    inside,
    load_entry,
    locate,
    module_location,
    same_path,
    spec_location,
)
from scheduler.store.models import PHASES, Service, utcnow

DEFINITION_FILE = "dcm-processor.json"
LEGACY_DEFINITION_FILE = "settings.json"
ENTRY_POINT_GROUP = "dcm_processor.services"
SYSTEM_SERVICE = "system"

DEFAULT_SORT_POSITION = 999.0
# dcm-processor gave pre/post services of the system settings file this default.
SYSTEM_SORT_POSITION = 1.0
DEFAULT_CHANNEL = "default"
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_RETRY_DELAY_S = 30.0
DEFAULT_PRIORITY = 5
ON_NEW_DATA = ("rerun", "ignore")

JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")
JOB_NAME_MAX = 128  # jobs.job_name column width

# Job fields in the order of the SPEC §7 table, and the legacy names they replace.
JOB_FIELDS = (
    "jobName",
    "workerEntry",
    "registryEntry",
    "events",
    "dependsOn",
    "sortPosition",
    "phase",
    "channel",
    "timeout",
    "retries",
    "retryDelay",
    "priority",
    "params",
    "python",
    "onNewData",
    "disabled",
    "description",
)
LEGACY_FIELDS = {"worker": "workerEntry", "callback": "registryEntry"}
SERVICE_FIELDS = ("name", "version", "jobs")

# Folders whose *.py files are not the service's code: caches, VCS data and
# virtualenvs (a job's `python` may live inside its service folder).
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})


@dataclass(frozen=True)
class JobDefinition:
    """One job of a service, validated, with every default applied."""

    job_name: str
    service: str
    worker_entry: str
    registry_entry: str | None
    events: tuple[str, ...]
    depends_on: tuple[str, ...]
    sort_position: float
    phase: str
    channel: str
    timeout_s: float
    retries: int
    retry_delay_s: float
    priority: int
    params: dict[str, Any] = field(compare=False)
    python: str | None
    on_new_data: str
    disabled: bool
    description: str
    entry_roots: tuple[Path, ...]
    source: Path
    # The installed package an entry-point service's entries must stay in.
    package: str | None = None

    def matches(self, event: str) -> bool:
        """Whether ``event`` starts this job (``*`` and ``study.*`` patterns)."""
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.events)


@dataclass
class ServiceDefinition:
    """A service as read from its definition file."""

    name: str
    version: str
    source: Path
    content_hash: str
    definition: Any
    legacy: bool
    jobs: list[JobDefinition] = field(default_factory=list)
    # sha256 of the *.py files alone, and where they are.
    code_hash: str = ""
    code: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Problem:
    """Something wrong in a definition, located as precisely as possible."""

    service: str
    file: str
    job: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        parts = [self.file]
        if self.job is not None:
            parts.append(f"job {self.job!r}")
        # "unknown field 'x'" already names its field.
        if self.field is not None and f"field {self.field!r}" not in self.message:
            parts.append(f"field {self.field!r}")
        parts.append(self.message)
        return ": ".join(parts)


@dataclass
class Registry:
    """The outcome of a load: services that work, and everything wrong."""

    services: list[ServiceDefinition]
    problems: list[Problem]
    broken: dict[str, list[Problem]]
    header_fields: tuple[str, ...] | None
    # What could be read of each broken service, so the store can show it.
    rejected: dict[str, ServiceDefinition] = field(default_factory=dict)

    def jobs(self) -> list[JobDefinition]:
        """Enabled jobs of the loaded services, by phase, sortPosition, jobName."""
        jobs = [job for s in self.services for job in s.jobs if not job.disabled]
        return sorted(jobs, key=lambda j: (PHASES.index(j.phase), j.sort_position, j.job_name))

    def job(self, name: str) -> JobDefinition:
        """The job called ``name`` (disabled ones too); ``KeyError`` if unknown."""
        for service in self.services:
            for job in service.jobs:
                if job.job_name == name:
                    return job
        raise KeyError(name)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def code_version(self) -> str:
        """One hash over the code of every loaded service."""
        digest = hashlib.sha256()
        for service in sorted(self.services, key=lambda s: s.name):
            digest.update(f"{service.name}\0{service.code_hash}\0".encode())
        return digest.hexdigest()

    def code_locations(self) -> list[Path]:
        """Where the code of every service read lives, broken ones included."""
        services = [*self.services, *self.rejected.values()]
        return list(dict.fromkeys(path for s in services for path in s.code))


# --------------------------------------------------------------------------
# Reading definition files


@dataclass(eq=False)  # identity: drafts are compared with `is` and kept in sets
class _Draft:
    """A service as read, before the cross-service checks decide whether it loads."""

    service: ServiceDefinition
    label: str  # the definition file as problems show it
    definition_file: Path | None
    roots: tuple[Path, ...]
    package: str | None = None
    # A folder that only this service imports from (new-format services).
    own_root: Path | None = None
    # Where the code hashed with the definition lives; the system service has
    # no folder of its own, so its code is wherever its entries were found.
    code: list[Path] = field(default_factory=list)
    code_from_entries: bool = False
    job_names: list[str] = field(default_factory=list)  # every jobName written, valid or not
    # jobName -> canonical field -> the field name as written (legacy or new).
    written: dict[str, dict[str, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.service.name

    def report(self, job: str | None, field_name: str | None, message: str) -> None:
        self.problems.append(Problem(self.name, self.label, job, field_name, message))


def _show(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_json(path: Path, draft: _Draft) -> Any:
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

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        draft.report(None, None, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
        return None
    for key in duplicates:
        # json keeps the last value silently; the first one was surely meant too.
        draft.report(None, key, f"key {key!r} appears twice in one object")
    return data


class _Invalid(Exception):
    """A field value that does not fit; the message says what was expected."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _non_empty(value: Any) -> str:
    if not _text(value).strip():
        raise _Invalid("expected a non-empty string")
    return str(value)


def _job_name(value: Any) -> str:
    name = _text(value)
    if not JOB_NAME.fullmatch(name):
        raise _Invalid(f"expected letters, digits, '_', '.' or '-' only, got {_show(value)}")
    if len(name) > JOB_NAME_MAX:
        raise _Invalid(f"expected at most {JOB_NAME_MAX} characters")
    return name


def _names(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise _Invalid(f"expected a string or a list of strings, got {_show(value)}")
    return tuple(dict.fromkeys(items))  # drop repeats, keep order


def _number(value: Any) -> float:
    # bool is an int in Python; `true` is never a sort position.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Invalid(f"expected a number, got {_show(value)}")
    return float(value)


def _duration(what: str, *, positive: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            seconds = parse_duration(value, what=what)
        except ConfigError as exc:
            raise _Invalid(str(exc).removeprefix(f"{what}: ")) from exc
        if positive and seconds <= 0:
            raise _Invalid("expected a duration greater than 0")
        return seconds

    return parse


def _integer(low: int, high: int | None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        span = f"from {low} to {high}" if high is not None else f"{low} or more"
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer {span}, got {_show(value)}")
        if value < low or (high is not None and value > high):
            raise _Invalid(f"expected an integer {span}, got {value}")
        return value

    return parse


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(map(repr, options))}, got {_show(value)}")
        return str(value)

    return parse


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected an object, got {_show(value)}")
    copy: dict[str, Any] = json.loads(json.dumps(value))  # the definition stays untouched
    return copy


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "jobName": _job_name,
    "workerEntry": _non_empty,
    "registryEntry": _non_empty,
    "events": _names,
    "dependsOn": _names,
    "sortPosition": _number,
    "phase": _choice(PHASES),
    "channel": _non_empty,
    "timeout": _duration("timeout", positive=True),
    "retries": _integer(0, None),
    "retryDelay": _duration("retryDelay", positive=False),
    "priority": _integer(0, 9),
    "params": _object,
    "python": _non_empty,
    "onNewData": _choice(ON_NEW_DATA),
    "disabled": _boolean,
    "description": _text,
}
_REQUIRED = {
    "jobName": "the job's unique name",
    "workerEntry": "the worker function, like 'package.module:worker'",
}


def _suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class _JobContext:
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


def _read_job(draft: _Draft, raw: Any, index: int, ctx: _JobContext) -> None:
    """Validate one job and add it to ``draft`` (its name even when invalid)."""
    if not isinstance(raw, dict):
        draft.report(f"#{index}", None, f"expected a job object, got {_show(raw)}")
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
            draft.report(label, key, f"unknown field {key!r}{_suggestion(key, known)}")
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
        except _Invalid as exc:
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


def _job_definition(draft: _Draft, values: dict[str, Any], ctx: _JobContext) -> JobDefinition:
    python = values.get("python")
    return JobDefinition(
        job_name=values["jobName"],
        service=draft.name,
        worker_entry=values["workerEntry"],
        registry_entry=values.get("registryEntry"),
        events=values.get("events", ctx.default_events),
        depends_on=values.get("dependsOn", ()),
        sort_position=values.get("sortPosition", ctx.default_sort),
        phase=values.get("phase", "main"),
        channel=values.get("channel", DEFAULT_CHANNEL),
        timeout_s=values.get("timeout", DEFAULT_TIMEOUT_S),
        retries=values.get("retries", 0),
        retry_delay_s=values.get("retryDelay", DEFAULT_RETRY_DELAY_S),
        priority=values.get("priority", DEFAULT_PRIORITY),
        params=values.get("params", {}),
        python=_python_path(python, ctx.folder) if python else None,
        on_new_data=values.get("onNewData", ON_NEW_DATA[0]),
        disabled=values.get("disabled", False),
        description=values.get("description", ""),
        entry_roots=draft.roots,
        source=draft.definition_file or draft.service.source,
        package=draft.package,
    )


def _read_jobs(draft: _Draft, jobs: Any, ctx: _JobContext, where: str = "jobs") -> None:
    if not isinstance(jobs, list):
        draft.report(None, where, f"expected a list of jobs, got {_show(jobs)}")
        return
    for index, raw in enumerate(jobs, start=1):
        _read_job(draft, raw, index, ctx)


def _new_draft(
    name: str,
    folder: Path,
    definition_file: Path | None,
    label: str,
    roots: tuple[Path, ...],
    *,
    legacy: bool,
) -> _Draft:
    service = ServiceDefinition(name, "", folder, "", None, legacy)
    return _Draft(service, label, definition_file, roots)


def _read_service_object(draft: _Draft, data: dict[str, Any]) -> Any:
    """Name and version of ``{"name", "version", "jobs"}``; returns the jobs."""
    for key in data:
        if key not in SERVICE_FIELDS:
            draft.report(None, key, f"unknown field {key!r}{_suggestion(key, SERVICE_FIELDS)}")
    try:
        if data.get("name") is not None:
            draft.service.name = _job_name(data["name"])
    except _Invalid as exc:
        draft.report(None, "name", str(exc))
    try:
        draft.service.version = _text(data.get("version", ""))
    except _Invalid as exc:
        draft.report(None, "version", str(exc))
    if "jobs" not in data:
        draft.report(None, "jobs", "missing (the list of the service's jobs)")
        return []
    return data["jobs"]


def _read_definition(
    draft: _Draft, path: Path, default_events: tuple[str, ...], *, legacy: bool
) -> None:
    data = _read_json(path, draft)
    draft.service.definition = data
    if data is None:
        return
    ctx = _JobContext(draft.service.source, default_events)
    if isinstance(data, list):
        _read_jobs(draft, data, ctx)
    elif legacy and isinstance(data, dict) and "jobName" in data:
        _read_jobs(draft, [data], ctx)  # dcm-processor also took a single job object
    elif isinstance(data, dict) and not legacy:
        _read_jobs(draft, _read_service_object(draft, data), ctx)
    else:
        shape = (
            "a list of jobs"
            if legacy
            else "an object with 'name', 'version', 'jobs' or a list of jobs"
        )
        draft.report(None, None, f"expected {shape}, got {_show(data)}")


def _read_folder_service(
    folder: Path, registry_root: Path, default_events: tuple[str, ...], *, legacy: bool
) -> _Draft:
    path = folder / (LEGACY_DEFINITION_FILE if legacy else DEFINITION_FILE)
    absolute = folder.absolute()
    # dcm-processor resolved legacy entries such as `dcm2nii.worker` from the
    # registry root, the folder that holds the service folders.
    roots = (registry_root.absolute(),) if legacy else (absolute,)
    draft = _new_draft(folder.name, absolute, path.absolute(), str(path), roots, legacy=legacy)
    draft.own_root = None if legacy else absolute
    draft.code.append(absolute)
    _read_definition(draft, path, default_events, legacy=legacy)
    return draft


def _discover_folders(paths: Sequence[Path]) -> Iterator[tuple[Path, Path, bool]]:
    """(service folder, registry root, legacy) for every service on the path."""
    for root in paths:
        root = Path(root)
        if not root.is_dir():
            continue  # a missing folder on the path is not an error
        if (root / DEFINITION_FILE).is_file():
            yield root, root, False
            continue
        for child in sorted(root.iterdir(), key=lambda p: p.name):
            if (child / DEFINITION_FILE).is_file():
                yield child, root, False
            elif (child / LEGACY_DEFINITION_FILE).is_file():
                yield child, root, True


def _header_fields(draft: _Draft, data: dict[str, Any]) -> tuple[str, ...] | None:
    full = data.get("fullTags")
    if full is not None and not isinstance(full, bool):
        draft.report(None, "fullTags", f"expected true or false, got {_show(full)}")
    fields = data.get("headerFields")
    if fields is None or full is True:
        return None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        draft.report(None, "headerFields", f"expected a list of strings, got {_show(fields)}")
        return None
    return tuple(fields)


def _read_system_settings(
    settings_file: Path, paths: Sequence[Path], default_events: tuple[str, ...]
) -> tuple[_Draft, tuple[str, ...] | None]:
    """The legacy system settings file: its pre/post jobs form service ``system``."""
    folder = settings_file.absolute().parent
    roots = tuple(dict.fromkeys([*(Path(p).absolute() for p in paths if Path(p).is_dir()), folder]))
    label = str(settings_file)
    draft = _new_draft(SYSTEM_SERVICE, folder, settings_file.absolute(), label, roots, legacy=True)
    draft.code_from_entries = True
    if not settings_file.is_file():
        draft.report(None, None, "settings file not found")
        return draft, None
    data = _read_json(settings_file, draft)
    if not isinstance(data, dict):
        if data is not None:
            draft.report(None, None, f"expected a settings object, got {_show(data)}")
        return draft, None
    # The file holds many other dcm-processor settings; only these are ours.
    keys = ("preServices", "postServices", "headerFields", "fullTags")
    draft.service.definition = {key: data[key] for key in keys if key in data}
    for list_name, phase in (("preServices", "pre"), ("postServices", "post")):
        if data.get(list_name) is not None:
            ctx = _JobContext(folder, default_events, SYSTEM_SORT_POSITION, phase, list_name)
            _read_jobs(draft, data[list_name], ctx, list_name)
    return draft, _header_fields(draft, data)


def _read_entry_point(ep: importlib.metadata.EntryPoint, default_events: tuple[str, ...]) -> _Draft:
    package = ep.module
    label = f"entry point {ep.name!r} ({ep.value})"
    draft = _new_draft(ep.name, Path(), None, label, (), legacy=False)
    draft.package = package
    try:
        spec = importlib.util.find_spec(package)
    except (Exception, SystemExit) as exc:  # parents of a dotted package run code
        draft.report(None, None, f"cannot find package {package!r}: {exc}")
        return draft
    folder = spec_location(spec) if spec and spec.submodule_search_locations else None
    if folder is None:
        draft.report(None, None, f"{package!r} is not an installed package")
        return draft
    path = folder / DEFINITION_FILE
    draft.service.source, draft.definition_file, draft.label = folder, path, str(path)
    draft.roots = (folder.parent,)
    draft.code.append(folder)
    if not path.is_file():
        draft.report(None, None, f"package {package!r} has no {DEFINITION_FILE}")
        return draft
    _read_definition(draft, path, default_events, legacy=False)
    return draft


def _read_entry_points(default_events: tuple[str, ...]) -> list[_Draft]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [_read_entry_point(ep, default_events) for ep in sorted(found, key=lambda e: e.name)]


# --------------------------------------------------------------------------
# Checks across services


def _check_service_names(drafts: list[_Draft]) -> None:
    first: dict[str, _Draft] = {}
    for draft in drafts:
        other = first.setdefault(draft.name, draft)
        if other is not draft:
            draft.report(None, None, f"duplicate service name {draft.name!r} (also {other.label})")


def _top_level_modules(folder: Path) -> dict[str, Path]:
    """Modules a service folder provides at the top level (entries or not)."""
    modules = {}
    for child in sorted(folder.iterdir()):
        if child.suffix == ".py" and child.is_file():
            modules[child.stem] = child
        elif (child / "__init__.py").is_file():
            modules[child.name] = child
    return modules


@dataclass
class _ModuleClaims:
    """Which service provides each top-level module, so two services never
    silently share one entry in sys.modules."""

    owners: dict[str, tuple[_Draft, Path]] = field(default_factory=dict)

    def conflict(self, draft: _Draft, top: str, location: Path) -> bool:
        owner = self.owners.get(top)
        if owner is None or owner[0] is draft or same_path(owner[1], location):
            return False
        draft.report(
            None,
            None,
            f"module {top!r} of service {draft.name!r} is also provided by service"
            f" {owner[0].name!r} ({owner[1]}); rename one of them",
        )
        return True

    def claim(self, draft: _Draft, top: str, location: Path) -> None:
        self.owners.setdefault(top, (draft, location))


def _entries(draft: _Draft, job: JobDefinition) -> Iterator[tuple[str, str, str]]:
    """(canonical field, field as written, entry) of a job."""
    written = draft.written.get(job.job_name, {})
    for canonical, entry in (
        ("workerEntry", job.worker_entry),
        ("registryEntry", job.registry_entry),
    ):
        if entry:
            yield canonical, written.get(canonical, canonical), entry


def _check_entries(draft: _Draft, claims: _ModuleClaims, check_imports: bool) -> None:
    """Entries inside the service, not shared with another service, importable.

    A service already left out for another problem is only checked for where
    its entries point: its code is not run, and its modules claim nothing,
    so it cannot knock out a working service that uses the same names.
    """
    healthy = not draft.problems
    own_root = draft.own_root
    own = _top_level_modules(own_root) if own_root and healthy else {}
    clashes = [top for top, location in own.items() if claims.conflict(draft, top, location)]
    to_import: list[tuple[str, str, str, str]] = []
    for job in draft.service.jobs:
        for canonical, written, entry in _entries(draft, job):
            try:
                target = locate(entry, draft.roots, draft.package)
            except EntryError as exc:
                draft.report(job.job_name, written, f"cannot import {canonical} {entry!r}: {exc}")
                continue
            if draft.code_from_entries:
                draft.code.append(target.location)
            if not healthy:
                continue
            if target.top in clashes or claims.conflict(draft, target.top, target.location):
                clashes.append(target.top)
                continue
            claims.claim(draft, target.top, target.location)
            if canonical == "workerEntry" and job.python:
                # It runs under its own interpreter, with dependencies this
                # process may lack: check where it is, never import it here.
                continue
            to_import.append((job.job_name, canonical, written, entry))
    if not check_imports or clashes or not healthy:
        return  # never run code that would share another service's modules
    for job_name, canonical, written, entry in to_import:
        try:
            load_entry(entry, draft.roots, package=draft.package)
        except EntryError as exc:
            draft.report(job_name, written, f"cannot import {canonical} {entry!r}: {exc}")
    for top in own:
        # Modules the entries imported in turn (a `utils` of the service) are
        # claimed too, so another service with its own `utils` is reported.
        module = sys.modules.get(top)
        location = module_location(module) if module else None
        if own_root and location is not None and inside(location, [own_root]):
            claims.claim(draft, top, location)


def _check_job_names(drafts: list[_Draft]) -> dict[str, _Draft]:
    """Report repeated jobNames; returns name -> owner. Of two services with
    one name the one found first keeps it, unless it already has a problem
    and the other has none: a broken service never knocks out a working one."""
    owners: dict[str, _Draft] = {}
    for draft in [d for d in drafts if not d.problems] + [d for d in drafts if d.problems]:
        seen: set[str] = set()
        for name in draft.job_names:
            owner = owners.setdefault(name, draft)
            if name in seen:
                draft.report(name, "jobName", f"duplicate jobName {name!r} (twice in this file)")
            elif owner is not draft:
                draft.report(
                    name,
                    "jobName",
                    f"duplicate jobName {name!r} (also in service {owner.name!r}, {owner.label})",
                )
            seen.add(name)
    return owners


def _valid_jobs(drafts: list[_Draft], owners: dict[str, _Draft]) -> dict[str, JobDefinition]:
    return {
        job.job_name: job
        for draft in drafts
        for job in draft.service.jobs
        if owners.get(job.job_name) is draft
    }


def _check_dependencies(drafts: list[_Draft], owners: dict[str, _Draft]) -> None:
    """Every dependsOn names a known job of the same or an earlier phase."""
    jobs = _valid_jobs(drafts, owners)
    order = {phase: index for index, phase in enumerate(PHASES)}
    for draft in drafts:
        for job in draft.service.jobs:
            for name in job.depends_on:
                target = jobs.get(name)
                if name not in owners:
                    draft.report(job.job_name, "dependsOn", f"unresolved dependsOn {name!r}")
                elif target is not None and order[target.phase] > order[job.phase]:
                    # Main jobs wait for every pre job and post jobs for every
                    # pre and main job: depending on a later phase deadlocks.
                    draft.report(
                        job.job_name,
                        "dependsOn",
                        f"dependsOn {name!r} is a {target.phase} job, and {target.phase} jobs"
                        f" wait for every {job.phase} job (a dependency cycle through phases)",
                    )


def _reachable(graph: dict[str, list[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = list(graph[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(graph[node])
    return seen


def _cycle_through(start: str, graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside one component."""
    parents: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for successor in sorted(graph[node]):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if successor in members and successor not in parents:
                parents[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start!r} is on no cycle")


def _check_cycles(drafts: list[_Draft], owners: dict[str, _Draft]) -> None:
    """Report each dependency cycle to every service with a job on it."""
    jobs = _valid_jobs(drafts, owners)
    graph = {name: [d for d in job.depends_on if d in jobs] for name, job in sorted(jobs.items())}
    reach = {name: _reachable(graph, name) for name in graph}
    reported: set[str] = set()
    for name in graph:
        if name in reported or name not in reach[name]:
            continue
        members = {other for other in reach[name] if name in reach[other]}
        reported |= members
        for draft in dict.fromkeys(owners[member] for member in sorted(members)):
            start = min(member for member in members if owners[member] is draft)
            cycle = " -> ".join(_cycle_through(start, graph, members))
            draft.report(start, "dependsOn", f"dependency cycle: {cycle}")


def _cascade(drafts: list[_Draft], owners: dict[str, _Draft]) -> None:
    """A service needing a job of a broken service is broken too, until stable."""
    changed = True
    while changed:
        changed = False
        for draft in drafts:
            if draft.problems:
                continue
            for job in draft.service.jobs:
                for name in job.depends_on:
                    owner = owners.get(name)
                    if owner is not None and owner is not draft and owner.problems:
                        message = f"dependsOn {name!r} is a job of broken service {owner.name!r}"
                        draft.report(job.job_name, "dependsOn", message)
                        changed = True


# --------------------------------------------------------------------------
# Content hash, loading, store


def _code_files(location: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    if location.is_file():
        yield prefix + location.name, location
        return
    for folder, dirs, files in os.walk(location):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d not in _SKIPPED_DIRS
            and not Path(folder, d, "pyvenv.cfg").exists()
        )
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                yield prefix + path.relative_to(location).as_posix(), path


def _code_of(draft: _Draft) -> dict[str, Path]:
    """The service's *.py files by relative path."""
    files: dict[str, Path] = {}
    for location in draft.code:
        # Code found through entries sits in shared roots: keep its folder name.
        prefix = f"{location.name}/" if draft.code_from_entries and location.is_dir() else ""
        files.update(_code_files(location, prefix))
    return files


def _digest(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for relative, path in sorted(files.items()):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _hash(draft: _Draft) -> None:
    """The content hash (definition file and *.py files, in the order of their
    relative paths, so a change to either is noticed) and the code hash."""
    files = _code_of(draft)
    draft.service.code = tuple(draft.code)
    draft.service.code_hash = _digest(files)
    if draft.definition_file is not None and draft.definition_file.is_file():
        files[draft.definition_file.name] = draft.definition_file
    draft.service.content_hash = _digest(files)


def code_stamp(locations: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Modification times and sizes of the *.py files under ``locations``:
    cheap to take, and it changes when the code does."""
    stamp = []
    for location in locations:
        for _relative, path in _code_files(location, ""):
            try:
                status = path.stat()
            except OSError:
                continue
            stamp.append((str(path), status.st_mtime_ns, status.st_size))
    return tuple(stamp)


# Code hash of each service's code locations when this process last imported
# it: a long-running planner re-imports a service whose code changed.
_imported_code: dict[tuple[Path, ...], str] = {}


def _forget_changed_code(draft: _Draft) -> None:
    """Drop the modules of a service whose code changed since this process
    imported it, so checking its entries imports the code on disk."""
    locations = tuple(draft.code)
    if not locations:
        return
    current = _digest(_code_of(draft))
    previous = _imported_code.get(locations)
    _imported_code[locations] = current
    if previous is None or previous == current:
        return
    for name, module in list(sys.modules.items()):
        location = module_location(module) if module is not None else None
        if location is not None and inside(location, locations):
            sys.modules.pop(name, None)


def _registry(drafts: list[_Draft], header_fields: tuple[str, ...] | None) -> Registry:
    broken: dict[str, list[Problem]] = {}
    rejected: dict[str, ServiceDefinition] = {}
    for draft in drafts:
        # Problems found before the file named its service carry the folder name.
        draft.problems = [replace(p, service=draft.name) for p in draft.problems]
        if draft.problems:
            broken.setdefault(draft.name, []).extend(draft.problems)
            rejected.setdefault(draft.name, draft.service)
    return Registry(
        services=[draft.service for draft in drafts if not draft.problems],
        problems=[problem for draft in drafts for problem in draft.problems],
        broken=broken,
        header_fields=header_fields,
        rejected=rejected,
    )


def load_registry(
    paths: Sequence[Path],
    settings_file: Path | None = None,
    *,
    default_events: Sequence[str] = ("study.stable",),
    entry_points: bool = True,
    check_imports: bool = True,
) -> Registry:
    """Find, read and check every service (SPEC §7).

    ``paths`` are the folders of ``DCM_SERVICES_PATH``; ``settings_file`` the
    legacy system settings (``DCM_SETTINGS``). ``check_imports=False`` skips
    importing entries, for a fast listing; everything else is still checked.
    """
    events = tuple(default_events)
    # Definitions and code may have changed on disk since the last load.
    importlib.invalidate_caches()
    drafts: list[_Draft] = []
    header_fields = None
    if settings_file is not None:
        system, header_fields = _read_system_settings(Path(settings_file), paths, events)
        drafts.append(system)
    for folder, root, legacy in _discover_folders(paths):
        drafts.append(_read_folder_service(folder, root, events, legacy=legacy))
    if entry_points:
        drafts.extend(_read_entry_points(events))
    _check_service_names(drafts)
    # Names and the dependency graph first: a service they leave out is then
    # never imported, and claims no module name (see _check_entries).
    owners = _check_job_names(drafts)
    _check_dependencies(drafts, owners)
    _check_cycles(drafts, owners)
    claims = _ModuleClaims()
    for draft in drafts:
        if check_imports:
            _forget_changed_code(draft)
        _check_entries(draft, claims, check_imports)
    _cascade(drafts, owners)
    for draft in drafts:
        _hash(draft)
    return _registry(drafts, header_fields)


def sync_services(db: Session, registry: Registry) -> None:
    """Record a load in ``services``: loaded services enabled, broken ones
    disabled with their problems, services no longer found disabled."""
    now = utcnow()
    rows = {row.name: row for row in db.scalars(select(Service))}

    def upsert(service: ServiceDefinition, error: str | None) -> None:
        row = rows.get(service.name)
        if row is None:
            row = rows[service.name] = Service(name=service.name)
            db.add(row)
        row.version = service.version
        row.source = str(service.source) if service.source != Path() else ""
        row.content_hash = service.content_hash
        definition: Any = service.definition if service.definition is not None else {}
        row.definition = definition
        row.enabled = error is None
        row.error = error
        row.loaded_at = now

    seen: set[str] = set()
    for service in registry.services:
        upsert(service, None)
        seen.add(service.name)
    for name, problems in registry.broken.items():
        if name in seen:
            continue  # a duplicate name: the service that loaded owns the row
        service = registry.rejected.get(name) or ServiceDefinition(
            name, "", Path(), "", None, False
        )
        upsert(service, "\n".join(str(problem) for problem in problems))
        seen.add(name)
    for name, row in rows.items():
        if name not in seen:
            row.enabled = False
            row.error = "no longer found on the services path"
    db.flush()
