"""The service registry: finds, reads and validates service definitions.

A service is a folder on the services path holding ``dcm-processor.json``
(or a legacy dcm-processor registry folder with ``settings.json``), a
package registered under the entry-point group ``dcm_processor.services``,
or the legacy system settings file with its ``preServices``/``postServices``.
:func:`load_registry` reads them all (:mod:`.files`, :mod:`.fields`), checks
every job field, the entries (importable, callable, inside their service
folder), job names across services, ``dependsOn`` and cycles
(:mod:`.checks`), and returns a :class:`Registry`: the services that load,
and every :class:`Problem` found. A service with a problem is left out on
its own; every other service keeps working (README, "Writing a service").

:func:`current_registry` is the process's loaded registry, reloaded when a
definition or the code of a service changes (:mod:`.cache`); each load is
recorded in the store's ``services`` table (:mod:`.store`).
"""

from scheduler.entries import EntryError, RegistryError, load_entry
from scheduler.registry.cache import current_registry, forget_registry
from scheduler.registry.code import code_stamp
from scheduler.registry.definitions import (
    DEFINITION_FILE,
    LEGACY_DEFINITION_FILE,
    JobDefinition,
    Problem,
    Registry,
    ServiceDefinition,
)
from scheduler.registry.files import folder_problems
from scheduler.registry.loader import load_registry
from scheduler.registry.store import record_load, sync_services

__all__ = [
    "DEFINITION_FILE",
    "LEGACY_DEFINITION_FILE",
    "EntryError",
    "JobDefinition",
    "Problem",
    "Registry",
    "RegistryError",
    "ServiceDefinition",
    "code_stamp",
    "current_registry",
    "folder_problems",
    "forget_registry",
    "load_entry",
    "load_registry",
    "record_load",
    "sync_services",
]
