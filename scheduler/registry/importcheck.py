"""Importing a service's entries to check them, in a process that can be killed.

Checking that a ``workerEntry`` or ``registryEntry`` imports runs the
service's module-level code. Run in the planner, in ``dcm-scheduler run`` or
in a CLI command, a service that calls ``os._exit``, hangs or starts a
thread at import would take that process with it. The imports run instead
in a callback host (:mod:`scheduler.callbacks`) that lives for one load of
the registry: a service whose import ends it, or runs past
``DCM_CALLBACK_TIMEOUT``, is reported as not importable; the host is killed
with everything it started, and the next service gets a fresh one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scheduler.callbacks import CallbackHost, HostError


class ImportChecker:
    """The callback host that imports entries for one load of the registry."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.host: CallbackHost | None = None

    def check(
        self, items: Sequence[tuple[str, Sequence[Path], str | None]]
    ) -> tuple[list[str | None], dict[str, Path]]:
        """For each (entry, roots, package): None when it imports, else why
        not; and the top-level modules loaded so far, with their locations."""
        if not items:
            return [], {}
        request = {"check": [[e, [str(r) for r in roots], p] for e, roots, p in items]}
        try:
            if self.host is None or not self.host.alive:
                self.host = CallbackHost("import-check")
            answer = self.host.call(request, b"null", self.timeout)
        except TimeoutError:
            reason = f"importing it did not finish within {self.timeout:g}s"
        except HostError as exc:
            reason = self._ending() or str(exc)
        else:
            modules = {name: Path(where) for name, where in answer["modules"].items()}
            return list(answer["errors"]), modules
        self.host = None  # killed by the failed call: the next service gets a fresh one
        return [reason] * len(items), {}

    def _ending(self) -> str | None:
        code = self.host.process.returncode if self.host is not None else None
        if code is None:
            return None
        if code < 0:
            return f"importing it killed the process by signal {-code}"
        return f"importing it ended the process with status {code}"

    def close(self) -> None:
        # Killed, not asked to end: threads service code started at import
        # would keep a host that exits on its own waiting.
        if self.host is not None:
            self.host.kill()
            self.host = None
