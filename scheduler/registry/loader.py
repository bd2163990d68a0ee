"""Loading the registry: read every service, run the checks, keep what works."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from scheduler.config import get_settings
from scheduler.registry.checks import (
    ModuleClaims,
    cascade,
    check_cycles,
    check_dependencies,
    check_entries,
    check_job_names,
    check_service_names,
)
from scheduler.registry.code import hash
from scheduler.registry.definitions import Draft, Problem, Registry, ServiceDefinition
from scheduler.registry.files import (
    discover_folders,
    read_entry_points,
    read_folder_service,
    read_system_settings,
)
from scheduler.registry.importcheck import ImportChecker


def _registry(drafts: list[Draft], header_fields: tuple[str, ...] | None) -> Registry:
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
    """Find, read and check every service (README, "Writing a service").

    ``paths`` are the folders of ``DCM_SERVICES_PATH``; ``settings_file`` the
    legacy system settings (``DCM_SETTINGS``). ``check_imports=False`` skips
    importing entries, for a fast listing; everything else is still checked.
    """
    events = tuple(default_events)
    # Definitions and code may have changed on disk since the last load.
    importlib.invalidate_caches()
    drafts: list[Draft] = []
    header_fields = None
    if settings_file is not None:
        system, header_fields = read_system_settings(Path(settings_file), paths, events)
        drafts.append(system)
    for folder, root, legacy in discover_folders(paths):
        drafts.append(read_folder_service(folder, root, events, legacy=legacy))
    if entry_points:
        drafts.extend(read_entry_points(events))
    check_service_names(drafts)
    # Names and the dependency graph first: a service they leave out is then
    # never imported, and claims no module name (see check_entries).
    owners = check_job_names(drafts)
    check_dependencies(drafts, owners)
    check_cycles(drafts, owners)
    claims = ModuleClaims()
    checker = ImportChecker(get_settings().callback_timeout) if check_imports else None
    try:
        for draft in drafts:
            check_entries(draft, claims, checker)
    finally:
        if checker is not None:
            checker.close()
    cascade(drafts, owners)
    for draft in drafts:
        hash(draft)
    return _registry(drafts, header_fields)
