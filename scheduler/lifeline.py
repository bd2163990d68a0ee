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


def supported() -> bool:
    """Whether parent-death signals work here (Linux)."""
    return _libc is not None and hasattr(_libc, "prctl")
