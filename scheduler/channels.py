"""Pausing and resuming a channel (README, "Pausing a channel").

A paused channel is a row of ``paused_channels``, so every process sees it
and it outlives restarts. While it is there, sending holds the channel's
jobs back (:func:`scheduler.messages.send_jobs`) and a worker's claim
refuses a message already in the broker, leaving the job queued and owed a
message (:func:`scheduler.jobstate.claim`); attempts already running end
as usual. :func:`resume` deletes the row and sends what waited, in priority
order. The CLI and the HTTP API both call these functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select

from scheduler import messages
from scheduler.clock import iso, utcnow
from scheduler.registry.definitions import CHANNEL
from scheduler.store.db import rowcount, transaction
from scheduler.store.models import Job, PausedChannel, Worker
from scheduler.vocabulary import PLANNING_QUEUE, JobStatus


class ChannelNameError(ValueError):
    """Not a name a channel can have."""


class NotPausedError(LookupError):
    """Resuming a channel that is not paused."""


@dataclass
class ChannelReport:
    channel: str
    paused: bool
    paused_at: str | None = None
    reason: str | None = None
    # Jobs of the channel queued and ready, waiting to be sent (pause), or
    # sent by the resume.
    queued: int = 0
    sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# A pause reason is shown in tables, the dashboard and doctor: one line.
REASON_MAX = 500


def check_channel(channel: str) -> str:
    if not CHANNEL.fullmatch(channel):
        raise ChannelNameError(
            f"{channel!r} is not a channel name: a letter or digit, then letters, digits, "
            "'_', '.', ':' or '-' (at most 128 characters)"
        )
    if channel == PLANNING_QUEUE:
        raise ChannelNameError(
            f"{PLANNING_QUEUE} is where sessions are planned, not a job channel: to stop "
            "planning, stop beat or the planning worker"
        )
    return channel


def check_reason(reason: str | None) -> str | None:
    """The reason as one printable line (control characters would reach
    terminals raw), or an error when it is too long to show."""
    if reason is None:
        return None
    line = " ".join("".join(c if c.isprintable() else " " for c in reason).split())
    if len(line) > REASON_MAX:
        raise ChannelNameError(f"a pause reason has at most {REASON_MAX} characters")
    return line or None


def is_used(channel: str) -> bool:
    """Whether a loaded service's job, a job in the store or a worker uses
    ``channel``: pausing one nothing uses is likely a typo."""
    from scheduler.registry import current_registry

    if any(job.channel == channel for job in current_registry().jobs()):
        return True
    with transaction() as db:
        if db.scalar(select(Job.id).where(Job.channel == channel).limit(1)) is not None:
            return True
        return any(channel in (row or {}) for row in db.scalars(select(Worker.channels)))


def _ready_jobs(channel: str) -> Any:
    return select(Job.id).where(
        Job.channel == channel,
        Job.status == JobStatus.QUEUED,
        Job.pending_deps == 0,
    )


def pause(channel: str, reason: str | None = None, now: datetime | None = None) -> ChannelReport:
    """Pause ``channel``; pausing a paused channel keeps its first pause time
    and takes the new reason, if one is given."""
    check_channel(channel)
    reason = check_reason(reason)
    now = now or utcnow()
    with transaction() as db:
        row = db.get(PausedChannel, channel)
        if row is None:
            row = PausedChannel(channel=channel, paused_at=now, reason=reason)
            db.add(row)
        elif reason is not None:
            row.reason = reason
        report = ChannelReport(channel, True, iso(row.paused_at), row.reason)
        report.queued = len(db.scalars(_ready_jobs(channel)).all())
    messages.forget_paused()
    return report


def resume(channel: str, now: datetime | None = None) -> ChannelReport:
    """Resume ``channel`` and send its queued jobs that are owed a message,
    in priority order (those of a closed off-peak window keep waiting)."""
    check_channel(channel)
    now = now or utcnow()
    with transaction() as db:
        removed = db.execute(delete(PausedChannel).where(PausedChannel.channel == channel))
        if not rowcount(removed):
            raise NotPausedError(f"channel {channel} is not paused")
        owed = list(
            db.scalars(
                _ready_jobs(channel).where(
                    or_(Job.run_after.is_(None), Job.run_after <= now),
                    # A message already in the broker runs now the claim accepts it.
                    Job.dispatched_at.is_(None),
                )
            )
        )
    messages.forget_paused()
    report = ChannelReport(channel, False)
    report.queued = len(owed)
    report.sent = messages.send_job_ids(owed, now=now)
    return report
