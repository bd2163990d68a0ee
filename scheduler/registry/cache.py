"""The registry of this process: loaded once, reloaded when a service changes.

Planning asks for the registry for every session; reading and checking every
service each time would cost more than planning. The loaded registry is
kept with a stamp of the definition files (and of the services' code), and
loaded again when the stamp changes, so a running planner always plans with
the services on disk (README, "Failure modes").
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from scheduler.config import Settings, get_settings
from scheduler.registry.code import code_stamp
from scheduler.registry.definitions import Registry
from scheduler.registry.loader import load_registry

# Problems that the trace and the CLI report too, on a logger of its own so
# the CLI, which prints them, can keep them out of its stderr.
service_log = logging.getLogger("scheduler.services")

_registry_lock = threading.Lock()
_registry_cache: dict[str, Any] = {}


def _definition_stamp(settings: Settings) -> tuple[Any, ...]:
    """Modification times of everything that defines services (taken
    before every plan: plain strings and ``os`` calls, no path objects)."""
    files = [os.fspath(settings.settings_file)] if settings.settings_file else []
    for root in settings.services_path:
        try:
            with os.scandir(root) as listing:
                children = sorted(entry.path for entry in listing)
        except OSError:
            continue
        files.append(os.path.join(root, "dcm-processor.json"))
        for child in children:
            files.extend(
                [os.path.join(child, "dcm-processor.json"), os.path.join(child, "settings.json")]
            )
    stamp: list[Any] = []
    for path in files:
        try:
            stamp.append((path, os.stat(path).st_mtime_ns))
        except OSError:
            continue
    return (settings.services_path, settings.settings_file, tuple(settings.default_events), *stamp)


def current_registry(settings: Settings | None = None) -> Registry:
    """The loaded services, reloaded when a definition file or the code of a
    service changed (a running planner plans with the services on disk)."""
    settings = settings or get_settings()
    definitions = _definition_stamp(settings)
    with _registry_lock:
        cached: Registry | None = _registry_cache.get("registry")
        code = code_stamp(cached.code_locations()) if cached is not None else ()
        if cached is None or _registry_cache.get("stamp") != (definitions, code):
            cached = load_registry(
                settings.services_path,
                settings.settings_file,
                default_events=settings.default_events,
            )
            for problem in cached.problems:
                service_log.warning("service problem: %s", problem)
            code = code_stamp(cached.code_locations())
            _registry_cache.update(stamp=(definitions, code), registry=cached)
        return cached


def forget_registry() -> None:
    with _registry_lock:
        _registry_cache.clear()
