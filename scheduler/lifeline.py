"""Processes that die with the process that started them.

Every process the scheduler starts — the worker and beat under
``dcm-scheduler run``, a worker's pool processes, the process of a job
attempt, the process that runs registry callbacks — asks the Linux kernel
for a signal when its parent dies (``PR_SET_PDEATHSIG``). A parent killed
with SIGKILL cannot clean up after itself; with this, nothing it started
outlives it, so a restarted scheduler never finds a second copy of itself
still working (README, "Failure modes").

The processes that run service code (attempts, callbacks) are guarded
further (:func:`guard`): service code may ignore or replace a signal
handler, so a watchdog thread checks the parent too, and they keep every
descendant in their tree (``PR_SET_CHILD_SUBREAPER``: a daemon's double fork
lands on them, not on init), so taking the tree down takes everything.

The parent-death signal is tied to the *thread* that forked the child:
start long-lived children from threads that live as long as they should.
This module is standard library only: the attempt process of a service with
its own interpreter loads it by path (:mod:`workers_bridge.child`).
"""

from __future__ import annotations

import _signal
import _thread
import contextlib
import ctypes
import os
import signal
import time
from typing import Any

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_CHILD_SUBREAPER = 36
# How often a guarded process checks that its parent is still there.
WATCH_EVERY = 0.5

# The C library as the interpreter already has it loaded (no file lookup:
# ctypes.util would import subprocess, tempfile and more into every process
# that guards itself, a fork server's attempts included).
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
    _libc.prctl  # noqa: B018 - absent off Linux
except (OSError, AttributeError):  # not Linux: children then outlive a killed parent
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
    made a session of their own included (deepest first; a descendant keeps
    its pid when its parent dies, so the list stays good while it is used).
    Nothing is stopped and left waiting: a killer that dies half way leaves
    the rest running, never frozen."""
    for victim in [*reversed(descendants(pid)), pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def keep_descendants() -> None:
    """Make this process the reaper of its orphaned descendants, so they stay
    in its tree (and in :func:`kill_tree`'s reach) until it ends."""
    if _libc is not None:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)


def take_down(_signum: int = 0, _frame: Any = None) -> None:
    """Kill this process's whole tree, this process last."""
    kill_tree(os.getpid())


def guard(parent: int, signum: int = signal.SIGUSR2, watchdog: bool = True) -> None:
    """Take down this process's tree when ``parent`` dies, whatever the code
    running here does: the parent-death signal ``signum`` is handled by
    :func:`take_down`, and a watchdog thread checks the parent every
    :data:`WATCH_EVERY` seconds, for code that ignores or replaces the
    handler (``watchdog=False`` where the parent is guarded itself and kills
    its whole tree when it goes). Descendants are kept in the tree
    (:func:`keep_descendants`)."""
    keep_descendants()
    # The C function: signal.signal would turn the handler it replaces into
    # an enum member, failing (and raising inside) for a function such as
    # take_down, which a forked child inherits: ~70 pages copied per attempt.
    _signal.signal(signum, take_down)
    die_with_parent(signum, parent)
    if not watchdog:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_EVERY)
        take_down()

    # A bare thread: importing threading would make every fork of this
    # process run its after-fork handler (~120 pages copied per attempt of a
    # fork server whose service does not use threads).
    _thread.start_new_thread(watch, ())


def reassert(signum: int = signal.SIGUSR2) -> None:
    """Put :func:`guard`'s handler back and unblock its signal, after service
    code ran in this process (an import, a callback) and may have replaced,
    reset or blocked it: reset to its default action, the parent's death
    would end this process outright, leaving what it started running."""
    _signal.signal(signum, take_down)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, (signum,))


def exit_description(code: int) -> str:
    """How a process ended, from its exit status (minus the signal that
    killed it, as :mod:`subprocess` and :func:`os.waitstatus_to_exitcode`
    give it): "exited with status 3", "was killed by signal 9 (SIGKILL)"."""
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def supported() -> bool:
    """Whether parent-death signals work here: Linux, and ``prctl`` not
    refused (a sandbox's system-call filter may refuse it)."""
    if _libc is None or not hasattr(_libc, "prctl"):
        return False
    current = ctypes.c_int(0)
    return bool(_libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(current), 0, 0, 0) == 0)
