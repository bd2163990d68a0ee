"""Calling a service's worker function, in the process that runs one attempt.

Standard library only: the fork server (:mod:`workers_bridge.forkserver`)
also runs under a service's own interpreter (the ``python`` field, a separate
virtualenv without the scheduler installed) and loads this file, and the
scheduler's standard-library modules it shares (the entry resolver, the
lifeline), from their files.

A request names the entry, the folders it is imported from and the call's
arguments; the response is ``{"ok": true, "result": …}`` or ``{"ok": false,
"error": …, "traceback": …}``. Exceptions, ``sys.exit`` and results that are
not JSON all become errors with a message that says which.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

# A result is stored with its job, read by every listing of it and handed to
# each dependent: larger outputs belong in files (README, "The worker").
LARGEST_RESULT = 4 * 1024 * 1024


def scheduler_module(name: str) -> Any:
    """``scheduler.<name>``, one of its standard-library-only modules
    (``entries``, ``lifeline``, ``jsonsafe``,
    ``untrusted``): imported as usual in the worker's own
    interpreter, loaded from its file under a service's interpreter, which
    does not have the scheduler installed."""
    if __package__:
        return importlib.import_module(f"scheduler.{name}")
    loaded = sys.modules.get(f"_dcm_scheduler_{name}")
    if loaded is not None:
        return loaded
    path = Path(__file__).resolve().parent.parent / "scheduler" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_dcm_scheduler_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Loaded with this module, so the fork server has them before it forks.
jsonsafe = scheduler_module("jsonsafe")
untrusted = scheduler_module("untrusted")


def service_modules(entry: str, roots: list[str] | None = None) -> list[str]:
    """The loaded modules of the entry's top-level package, and every other
    loaded module whose file lies in the service's ``roots`` (a ``helpers``
    module beside the package)."""
    top = entry.partition(":")[0].split(".")[0]
    folders = tuple(os.path.join(os.path.abspath(root), "") for root in roots or () if root)
    return [
        name
        for name, module in tuple(sys.modules.items())
        if name == top
        or name.startswith(top + ".")
        or (folders and str(getattr(module, "__file__", None) or "").startswith(folders))
    ]


def fresh_imports(entry: str, roots: list[str] | None = None) -> None:
    """Forget the entry's package, so the next import reads the service's
    current code, not the copy this process loaded before."""
    for name in service_modules(entry, roots):
        sys.modules.pop(name, None)


def resolve(entry: str, roots: list[str]) -> Any:
    """Import the worker entry from its service folders, the registry's way
    (:func:`scheduler.entries.load_entry`), the service's folder first."""
    entries = scheduler_module("entries")
    return entries.load_entry(entry, [Path(root) for root in roots], front=True)


def run(request: dict[str, Any], worker: Any | None = None) -> dict[str, Any]:
    """Call the worker of ``request`` (``worker``: the function, imported
    beforehand from the service's current code); never raises."""
    try:
        if worker is None:
            fresh_imports(request["entry"], request.get("roots", []))
            worker = resolve(request["entry"], request.get("roots", []))
    except BaseException as exc:  # noqa: BLE001
        return {
            "ok": False,
            "error": f"cannot import workerEntry {request['entry']!r}: {untrusted.described(exc)}",
            "traceback": untrusted.traceback_text(exc),
        }
    try:
        value = worker(
            request["job_name"],
            request["headers"],
            request["params"],
            request["added_params"],
            **request.get("kwargs", {}),
        )
    except SystemExit as exc:
        return {
            "ok": False,
            "error": f"worker called sys.exit({untrusted.shown(exc.code)})",
            "traceback": "",
        }
    except BaseException as exc:  # noqa: BLE001 - the worker's failure is the job's error
        return {
            "ok": False,
            "error": untrusted.described(exc),
            "traceback": untrusted.traceback_text(exc),
        }
    try:
        encoded = json.dumps(value, allow_nan=False)
    except RecursionError:
        return {
            "ok": False,
            "error": "worker returned a value nested too deep for JSON",
            "traceback": "",
        }
    except (TypeError, ValueError) as exc:
        reason = untrusted.message(exc) or untrusted.described(exc)
        return {
            "ok": False,
            "error": f"worker returned a value that is not JSON-serialisable "
            f"({untrusted.class_name(value)}): {reason}",
            "traceback": "",
        }
    except BaseException as exc:  # noqa: BLE001 - a dict subclass's items() is service code
        return {
            "ok": False,
            "error": f"worker returned a value that raised while encoded as JSON "
            f"({untrusted.class_name(value)}): {untrusted.described(exc)}",
            "traceback": untrusted.traceback_text(exc),
        }
    if len(encoded) > LARGEST_RESULT:
        return {
            "ok": False,
            "error": f"worker returned a result of {len(encoded):,} characters as JSON; "
            f"a result holds at most {LARGEST_RESULT:,} (4 MiB): write larger outputs "
            "to files in kwargs['output_dir'] and return their paths",
            "traceback": "",
        }
    # The response carries the value as JSON read back: plain data, which
    # writing the response cannot make run service code again (a subclass's
    # items() or __repr__).
    with contextlib.suppress(RecursionError):  # as deep as json.dumps managed: kept as is
        value = json.loads(encoded)
    flaw = jsonsafe.unstorable(value)
    if flaw:
        return {
            "ok": False,
            "error": f"worker returned a value the store cannot keep: {flaw}",
            "traceback": "",
        }
    return {"ok": True, "result": value}


def write_response(path: str, response: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(response, handle, allow_nan=False)
