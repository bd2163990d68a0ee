"""The scheduler's words, defined once: statuses, levels, phases, queues.

Each is a ``StrEnum``: its members are the strings stored in the database and
printed in JSON (``JobStatus.QUEUED == "queued"``), so code compares and
writes them without spelling them again. The meanings are in README
("Commands", statuses; "Writing a service", phases).
"""

from __future__ import annotations

from enum import StrEnum

PLANNING_QUEUE = "dcm.planning"
DEFAULT_CHANNEL = "default"
# A listing's --limit beyond this is a typo, and past what the stores' LIMIT holds.
LARGEST_LIMIT = 1_000_000_000


class SessionStatus(StrEnum):
    PLANNING = "planning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # no job succeeded
    PARTIAL = "partial"
    CANCELLED = "cancelled"
    EMPTY = "empty"  # no job scheduled

    @property
    def final(self) -> bool:
        return self not in (SessionStatus.PLANNING, SessionStatus.RUNNING)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UPSTREAM_FAILED = "upstream_failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class AttemptStatus(StrEnum):
    """How one attempt of a job ended (its entry in ``attempt_log``)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    LOST = "lost"  # its worker or process died, killed from outside
    CANCELLED = "cancelled"


class Level(StrEnum):
    """What a candidate is: detection and planning work per level."""

    SERIES = "series"
    STUDY = "study"
    PATIENT = "patient"


class Phase(StrEnum):
    """Main jobs need every pre job to succeed; post jobs wait for every
    pre and main job to end. The order of the members is the order of
    evaluation and of the phases in a session."""

    PRE = "pre"
    MAIN = "main"
    POST = "post"

    @property
    def order(self) -> int:
        return list(Phase).index(self)


class ResourceState(StrEnum):
    """Detection state of a series, study or patient."""

    RECEIVING = "receiving"
    STABLE = "stable"


JOB_FINAL_STATUSES = frozenset(status for status in JobStatus if status.final)
SESSION_FINAL_STATUSES = frozenset(status for status in SessionStatus if status.final)
# Jobs that may still run, sessions that may still change.
OPEN_JOB_STATUSES = frozenset(status for status in JobStatus if not status.final)
OPEN_SESSION_STATUSES = frozenset(status for status in SessionStatus if not status.final)


# What a triggered event, a cohort name may be: they end up in tables,
# metrics labels and file names.
EVENT_NAME = r"[A-Za-z0-9_.:-]{1,128}"
