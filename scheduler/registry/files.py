"""Finding and reading service definitions: folders on the services path
(``dcm-processor.json``, or a legacy registry folder with ``settings.json``),
the legacy system settings file (``preServices``/``postServices``) and
packages registered under the ``dcm_processor.services`` entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scheduler.entries import (
    spec_location,
)
from scheduler.registry.definitions import (
    DEFINITION_FILE,
    ENTRY_POINT_GROUP,
    LEGACY_DEFINITION_FILE,
    SERVICE_FIELDS,
    SYSTEM_SERVICE,
    SYSTEM_SORT_POSITION,
    Draft,
    ServiceDefinition,
    show,
)
from scheduler.registry.fields import (
    Invalid,
    JobContext,
    job_name,
    read_jobs,
    read_json,
    service_version,
    suggestion,
)
from scheduler.vocabulary import Phase


def _new_draft(
    name: str,
    folder: Path,
    definition_file: Path | None,
    label: str,
    roots: tuple[Path, ...],
    *,
    legacy: bool,
) -> Draft:
    service = ServiceDefinition(name, "", folder, "", None, legacy)
    return Draft(service, label, definition_file, roots)


def _read_service_object(draft: Draft, data: dict[str, Any]) -> Any:
    """Name and version of ``{"name", "version", "jobs"}``; returns the jobs."""
    for key in data:
        if key not in SERVICE_FIELDS:
            draft.report(None, key, f"unknown field {key!r}{suggestion(key, SERVICE_FIELDS)}")
    try:
        if data.get("name") is not None:
            draft.service.name = job_name(data["name"])
    except Invalid as exc:
        draft.report(None, "name", str(exc))
    try:
        draft.service.version = service_version(data.get("version", ""))
    except Invalid as exc:
        draft.report(None, "version", str(exc))
    if "jobs" not in data:
        draft.report(None, "jobs", "missing (the list of the service's jobs)")
        return []
    return data["jobs"]


def _read_definition(
    draft: Draft, path: Path, default_events: tuple[str, ...], *, legacy: bool
) -> None:
    data = read_json(path, draft)
    draft.service.definition = data
    if data is None:
        return
    ctx = JobContext(draft.service.source, default_events)
    if isinstance(data, list):
        read_jobs(draft, data, ctx)
    elif legacy and isinstance(data, dict) and "jobName" in data:
        read_jobs(draft, [data], ctx)  # dcm-processor also took a single job object
    elif isinstance(data, dict) and not legacy:
        read_jobs(draft, _read_service_object(draft, data), ctx)
    else:
        shape = (
            "a list of jobs"
            if legacy
            else "an object with 'name', 'version', 'jobs' or a list of jobs"
        )
        draft.report(None, None, f"expected {shape}, got {show(data)}")


def read_folder_service(
    folder: Path, registry_root: Path, default_events: tuple[str, ...], *, legacy: bool
) -> Draft:
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


def folder_problems(paths: Sequence[Path], where: str) -> tuple[list[Path], list[str]]:
    """The folders to read among ``paths`` (a definition file named stands
    for its folder), and a problem for each path that is not one; ``where``
    says where the paths came from ("given", "on DCM_SERVICES_PATH")."""
    folders: list[Path] = []
    problems: list[str] = []
    for path in paths:
        if path.is_file() and path.name in (DEFINITION_FILE, LEGACY_DEFINITION_FILE):
            path = path.parent
        if path.is_dir():
            folders.append(path)
        elif path.exists():
            problems.append(f"{path}: not a folder ({where})")
        else:
            problems.append(f"{path}: no such folder ({where})")
    return folders, problems


def discover_folders(paths: Sequence[Path]) -> Iterator[tuple[Path, Path, bool]]:
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


def _header_fields(draft: Draft, data: dict[str, Any]) -> tuple[str, ...] | None:
    full = data.get("fullTags")
    if full is not None and not isinstance(full, bool):
        draft.report(None, "fullTags", f"expected true or false, got {show(full)}")
    fields = data.get("headerFields")
    if fields is None or full is True:
        return None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        draft.report(None, "headerFields", f"expected a list of strings, got {show(fields)}")
        return None
    return tuple(fields)


def read_system_settings(
    settings_file: Path, paths: Sequence[Path], default_events: tuple[str, ...]
) -> tuple[Draft, tuple[str, ...] | None]:
    """The legacy system settings file: its pre/post jobs form service ``system``."""
    folder = settings_file.absolute().parent
    roots = tuple(dict.fromkeys([*(Path(p).absolute() for p in paths if Path(p).is_dir()), folder]))
    label = str(settings_file)
    draft = _new_draft(SYSTEM_SERVICE, folder, settings_file.absolute(), label, roots, legacy=True)
    draft.code_from_entries = True
    if not settings_file.is_file():
        draft.report(None, None, "settings file not found")
        return draft, None
    data = read_json(settings_file, draft)
    if not isinstance(data, dict):
        if data is not None:
            draft.report(None, None, f"expected a settings object, got {show(data)}")
        return draft, None
    # The file holds many other dcm-processor settings; only these are ours.
    keys = ("preServices", "postServices", "headerFields", "fullTags")
    draft.service.definition = {key: data[key] for key in keys if key in data}
    for list_name, phase in (("preServices", Phase.PRE.value), ("postServices", Phase.POST.value)):
        if data.get(list_name) is not None:
            ctx = JobContext(folder, default_events, SYSTEM_SORT_POSITION, phase, list_name)
            read_jobs(draft, data[list_name], ctx, list_name)
    return draft, _header_fields(draft, data)


def _read_entry_point(ep: importlib.metadata.EntryPoint, default_events: tuple[str, ...]) -> Draft:
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


def read_entry_points(default_events: tuple[str, ...]) -> list[Draft]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [_read_entry_point(ep, default_events) for ep in sorted(found, key=lambda e: e.name)]
