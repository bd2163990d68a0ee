"""Text about what service code raised or returned, made without trusting it.

An exception's ``__str__``, a value's ``__repr__``, even the ``__name__`` of
a class with a metaclass of its own are service code: they may raise. The
job's error or the callback's reason must still say what happened, so the
attempt's process (:mod:`workers_bridge.child`), the callback host
(:mod:`scheduler.callbacks`) and the entry loader (:mod:`scheduler.entries`)
describe service objects only through these functions, which never raise,
and flush the output streams service code may have broken with
:func:`flush_output`.
Standard library only: an attempt's process under a service's own
interpreter loads it from its file.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from typing import Any


def class_name(value: Any) -> str:
    """The name of the value's class: its own, not what a metaclass of the
    service's says it is."""
    try:
        return str.__str__(type.__dict__["__name__"].__get__(type(value)))
    except BaseException:  # noqa: BLE001
        return "object"


def message(exc: BaseException) -> str | None:
    """``str(exc)`` as a plain ``str`` (a subclass may raise when it is
    formatted), or None when its ``__str__`` raised."""
    try:
        return str.__str__(str(exc))
    except BaseException:  # noqa: BLE001
        return None


def described(exc: BaseException) -> str:
    """``Kind: message`` of an exception; when its message cannot be had,
    its kind and that its message could not be shown."""
    text = message(exc)
    if text is None:
        return f"{class_name(exc)} (its message could not be shown: its __str__ raised)"
    return f"{class_name(exc)}: {text}"


def shown(value: Any) -> str:
    """``repr(value)``, or what the value is when its ``__repr__`` raised."""
    try:
        return str.__str__(repr(value))
    except BaseException:  # noqa: BLE001
        return f"<{class_name(value)} object whose repr raised>"


def traceback_text(exc: BaseException) -> str:
    """The traceback of ``exc``, as much of it as can be formatted: the
    frames alone, with :func:`described`, when the exception itself cannot
    be (its ``__notes__`` or its chain may be service code too)."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: BLE001
        pass
    try:
        frames = "".join(traceback.format_tb(exc.__traceback__))
    except BaseException:  # noqa: BLE001
        frames = ""
    return f"Traceback (most recent call last):\n{frames}{described(exc)}\n"


def flush_output() -> None:
    """Flush ``sys.stdout`` and ``sys.stderr``, whatever service code did to
    them: closed their descriptors (the flush raises ``OSError``) or put
    objects of its own there. What cannot be written is lost; the answer
    that follows must not be."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
