"""Importing a service's entries to check them, in a process that can be killed.

Checking that a ``workerEntry`` or ``registryEntry`` imports runs the
service's module-level code. Run in the planner, in ``dcm-scheduler run`` or
in a CLI command, a service that calls ``os._exit``, hangs or starts a
thread at import would take that process with it. The imports run instead in
a child interpreter (:func:`scheduler.entries._serve_import_checks`) that
lives for one load of the registry: a service whose import ends it, or runs
past ``DCM_CALLBACK_TIMEOUT``, is reported as not importable; the child is
killed with everything it started, and the next service gets a fresh one.
"""

from __future__ import annotations

import functools
import json
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scheduler import entries
from scheduler.lifeline import die_with_parent, kill_tree


class ImportChecker:
    """The child interpreter that imports entries for one load of the registry."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.buffer = b""
        # What service code prints while imported: a file, so a service that
        # prints megabytes never blocks on a full pipe.
        self.output: Any = None

    def _start(self) -> subprocess.Popen[bytes]:
        import os

        self.output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        return subprocess.Popen(
            [sys.executable, entries.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.output,
            start_new_session=True,
            preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
        )

    def check(
        self, items: Sequence[tuple[str, Sequence[Path], str | None]]
    ) -> tuple[list[str | None], dict[str, Path]]:
        """For each (entry, roots, package): None when it imports, else why
        not; and the top-level modules loaded so far, with their locations."""
        if not items:
            return [], {}
        if self.process is None or self.process.poll() is not None:
            self.close()
            self.process = self._start()
            self.buffer = b""
        assert self.process.stdin is not None
        request = {"entries": [[e, [str(r) for r in roots], p] for e, roots, p in items]}
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
            answer = self._answer()
        except (BrokenPipeError, OSError):
            answer = None
        if answer is not None:
            modules = {name: Path(where) for name, where in answer["modules"].items()}
            return list(answer["errors"]), modules
        reason = self._failure()
        return [reason] * len(items), {}

    def _answer(self) -> dict[str, Any] | None:
        assert self.process is not None and self.process.stdout is not None
        replies = self.process.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([replies], [], [], left)
            if ready:
                import os

                data = os.read(replies, 65536)
                if not data:
                    return None
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _failure(self) -> str:
        """Why no answer came; the child is gone afterwards."""
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            kill_tree(self.process.pid)
            self.process.wait()
            reason = f"importing it did not finish within {self.timeout:g}s"
        elif code < 0:
            reason = f"importing it killed the process by signal {-code}"
        else:
            reason = f"importing it ended the process with status {code}"
        tail = self._stderr_tail()
        self.process = None
        return f"{reason}{' (its last output: ' + tail + ')' if tail else ''}"

    def _stderr_tail(self) -> str:
        try:
            self.output.seek(0, 2)
            size = self.output.tell()
            self.output.seek(max(0, size - 4096))
            data = self.output.read()
        except (OSError, ValueError, AttributeError):
            return ""
        lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                kill_tree(self.process.pid)
                self.process.wait()
        self.process = None
        if self.output is not None:
            self.output.close()
