"""Off-peak windows: when a job with ``"window": "HH:MM-HH:MM"`` may be sent.

A window is a span of the day on the scheduler's clock (``DCM_TIMEZONE``, by
default the machine's local zone); one whose end is earlier than its start
runs across midnight (``"20:00-06:00"``). The start is inclusive, the end
exclusive. Only sending waits for a window: a job that started inside it
runs to its end (README, "Off-peak windows"). Pure functions of an explicit
``now``, so tests need no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo

_FORM = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")


class WindowError(ValueError):
    """A window that is not ``"HH:MM-HH:MM"`` with two different times of day."""


@dataclass(frozen=True)
class Window:
    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def is_open(self, now: datetime, zone: tzinfo | None = None) -> bool:
        """Whether ``now`` (aware) falls in the window, on ``zone``'s clock
        (None: the machine's local zone)."""
        moment = _local(now, zone).time().replace(second=0, microsecond=0)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def opens_at(self, now: datetime, zone: tzinfo | None = None) -> datetime:
        """When the window next opens after ``now`` (``now`` itself if open),
        as an aware time in ``zone``."""
        local = _local(now, zone)
        if self.is_open(now, zone):
            return local
        opening = local.replace(
            hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0
        )
        if opening <= local:
            opening += timedelta(days=1)
        return opening

    def waiting(self, now: datetime, zone: tzinfo | None = None) -> str | None:
        """What a queued job of this window waits for, or None while it is open."""
        if self.is_open(now, zone):
            return None
        opening = self.opens_at(now, zone)
        day = "" if opening.date() == _local(now, zone).date() else " tomorrow"
        return f"window {self} opens at {opening:%H:%M}{day}"


def _local(now: datetime, zone: tzinfo | None) -> datetime:
    aware = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    return aware.astimezone(zone) if zone is not None else aware.astimezone()


def parse_window(text: str) -> Window:
    """``"HH:MM-HH:MM"`` (00:00 to 23:59, start and end different) as a
    :class:`Window`; :class:`WindowError` says what is wrong."""
    match = _FORM.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise WindowError(f"expected a window like '20:00-06:00' (HH:MM-HH:MM), got {text!r}")
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    for hour, minute in ((start_h, start_m), (end_h, end_m)):
        if hour > 23 or minute > 59:
            raise WindowError(
                f"expected times from 00:00 to 23:59, got {hour:02d}:{minute:02d} in {text!r}"
            )
    start, end = time(start_h, start_m), time(end_h, end_m)
    if start == end:
        raise WindowError(f"the window {text!r} starts and ends at the same time")
    return Window(start, end)


def window_open(window: str | None, now: datetime, zone: tzinfo | None = None) -> bool:
    """Whether a job with this stored window may be sent at ``now``; a job
    without one, or with a window the scheduler cannot read, always may."""
    if not window:
        return True
    try:
        return parse_window(window).is_open(now, zone)
    except WindowError:
        return True


def waiting_for(window: str | None, now: datetime, zone: tzinfo | None = None) -> str | None:
    """``"window 20:00-06:00 opens at 20:00"`` for a closed window, else None."""
    if not window:
        return None
    try:
        return parse_window(window).waiting(now, zone)
    except WindowError:
        return None
