"""Processes that die with the process that started them.

Every process the scheduler starts — the worker under ``dcm-scheduler run``,
a worker's pool processes and embedded beat, the process of a job attempt,
the process that runs registry callbacks — asks the Linux kernel for a
signal when its parent dies (``PR_SET_PDEATHSIG``). A parent killed with
SIGKILL cannot clean up after itself; with this, nothing it started outlives
it, so a restarted scheduler never finds a second copy of itself still
working (README, "Failure modes").

The signal is tied to the *thread* that forked the child: start long-lived
children from threads that live as long as the children should.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
from typing import Any

PR_SET_PDEATHSIG = 1

try:
    _libc: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not Linux: children then outlive a killed parent
    _libc = None


def die_with_parent(signum: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies.

    ``parent`` is the pid the caller expects as its parent: when it died
    before the request took effect, this process exits at once.
    """
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signum)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (from /proc), children first: also
    those that left its process group (``setsid``). Empty off Linux."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # it ended meanwhile
        # The parent's pid is the second field after the command name, which
        # is in parentheses and may itself hold spaces or parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant, those that
    made a session of their own included. Another process's group is
    stopped first, so it cannot fork while its descendants are listed (a
    process taking down its own tree must not stop itself)."""
    if os.getpgrp() != pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGSTOP)
    for victim in [*reversed(descendants(pid)), pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def supported() -> bool:
    """Whether parent-death signals work here (Linux)."""
    return _libc is not None and hasattr(_libc, "prctl")
