"""What a loaded registry is made of: job and service definitions, problems.

The constants are the defaults of README's job field table. A
:class:`Draft` is a service as read, before the checks across services
decide whether it loads.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.rules import Condition
from scheduler.vocabulary import Phase

DEFINITION_FILE = "dcm-processor.json"
LEGACY_DEFINITION_FILE = "settings.json"
ENTRY_POINT_GROUP = "dcm_processor.services"
SYSTEM_SERVICE = "system"

DEFAULT_SORT_POSITION = 999.0
# dcm-processor gave pre/post services of the system settings file this default.
SYSTEM_SORT_POSITION = 1.0
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_RETRY_DELAY_S = 30.0
DEFAULT_PRIORITY = 5
ON_NEW_DATA = ("rerun", "ignore")

JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")
CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
JOB_NAME_MAX = 128  # jobs.job_name column width

# Job fields in the order of README's field table, and the legacy names they replace.
JOB_FIELDS = (
    "jobName",
    "workerEntry",
    "registryEntry",
    "when",
    "urgent",
    "events",
    "dependsOn",
    "sortPosition",
    "phase",
    "channel",
    "timeout",
    "retries",
    "retryDelay",
    "priority",
    "window",
    "params",
    "python",
    "onNewData",
    "disabled",
    "description",
)
LEGACY_FIELDS = {"worker": "workerEntry", "callback": "registryEntry"}
SERVICE_FIELDS = ("name", "version", "jobs")


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
    # The service's version and content hash at load: a job row keeps them,
    # so a result can be traced to the code that produced it.
    service_version: str = field(default="", compare=False)
    service_hash: str = field(default="", compare=False)
    # Rules without code (scheduler.rules): the series the job is for, and
    # whether scheduling it makes the session urgent (a condition, or True).
    when: Condition | None = field(default=None, compare=False)
    urgent: Condition | bool = field(default=False, compare=False)
    # "HH:MM-HH:MM": sent only while this off-peak window is open (scheduler.windows).
    window: str | None = None

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
    # The stores (database URLs) this load has been recorded in.
    recorded_in: set[str] = field(default_factory=set, compare=False, repr=False)

    def jobs(self) -> list[JobDefinition]:
        """Enabled jobs of the loaded services, by phase, sortPosition, jobName."""
        jobs = [job for s in self.services for job in s.jobs if not job.disabled]
        return sorted(jobs, key=lambda j: (Phase(j.phase).order, j.sort_position, j.job_name))

    def every_job(self) -> list[JobDefinition]:
        """Every job of the loaded services, disabled ones included, so a
        session's trace explains them too."""
        return [job for service in self.services for job in service.jobs]

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
class Draft:
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


def show(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."
