"""Calling a service's worker function, in the process that runs one attempt.

Standard library only: this file also runs as a script under a service's own
interpreter (the ``python`` field, a separate virtualenv without the
scheduler installed): ``python child.py REQUEST.json RESULT.json PARENT_PID``;
it then loads the scheduler's standard-library modules it shares (the entry
resolver, the lifeline) from their files.

A request names the entry, the folders it is imported from and the call's
arguments; the response is ``{"ok": true, "result": …}`` or ``{"ok": false,
"error": …, "traceback": …}``. Exceptions, ``sys.exit`` and results that are
not JSON all become errors with a message that says which.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def scheduler_module(name: str) -> Any:
    """``scheduler.<name>``, one of its standard-library-only modules
    (``entries``, ``lifeline``): imported as usual in the worker's own
    interpreter, loaded from its file under a service's interpreter, which
    does not have the scheduler installed."""
    if __package__:
        return importlib.import_module(f"scheduler.{name}")
    path = Path(__file__).resolve().parent.parent / "scheduler" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_dcm_scheduler_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# (top module, roots) -> (size of sys.modules when listed, module names)
_listed: dict[tuple[str, tuple[str, ...]], tuple[int, list[str]]] = {}


def service_modules(entry: str, roots: list[str] | None = None) -> list[str]:
    """The loaded modules of the entry's top-level package, and every other
    loaded module whose file lies in the service's ``roots`` (a ``helpers``
    module beside the package). Listed again only when ``sys.modules``
    changed size: a worker that runs the same jobs pays for one scan."""
    top = entry.partition(":")[0].split(".")[0]
    folders = tuple(os.path.join(os.path.abspath(root), "") for root in roots or () if root)
    key = (top, folders)
    cached = _listed.get(key)
    if cached is not None and cached[0] == len(sys.modules):
        return cached[1]
    # A snapshot: another thread of the worker may be importing meanwhile.
    modules = tuple(sys.modules.items())
    names = [
        name
        for name, module in modules
        if name == top
        or name.startswith(top + ".")
        or (folders and str(getattr(module, "__file__", None) or "").startswith(folders))
    ]
    _listed[key] = (len(modules), names)
    return names


def fresh_imports(
    entry: str, roots: list[str] | None = None, loaded: list[str] | None = None
) -> None:
    """Forget the entry's package, so an attempt forked from a long-running
    worker imports the service's current code, not the copy the worker
    loaded when it first validated or ran it.

    ``loaded`` is :func:`service_modules` computed by the parent before it
    forked: scanning ``sys.modules`` in the child touches every module name,
    and each touch copies a page of the parent's memory (2 ms per attempt).
    """
    for name in service_modules(entry, roots) if loaded is None else loaded:
        sys.modules.pop(name, None)


def resolve(entry: str, roots: list[str]) -> Any:
    """Import the worker entry from its service folders, the registry's way
    (:func:`scheduler.entries.load_entry`), the service's folder first."""
    entries = scheduler_module("entries")
    return entries.load_entry(entry, [Path(root) for root in roots], front=True)


def run(request: dict[str, Any], loaded: list[str] | None = None) -> dict[str, Any]:
    """Call the worker of ``request``; never raises. ``loaded``: see :func:`fresh_imports`."""
    try:
        fresh_imports(request["entry"], request.get("roots", []), loaded)
        worker = resolve(request["entry"], request.get("roots", []))
    except BaseException as exc:  # noqa: BLE001
        return {
            "ok": False,
            "error": f"cannot import workerEntry {request['entry']!r}: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
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
        return {"ok": False, "error": f"worker called sys.exit({exc.code!r})", "traceback": ""}
    except BaseException as exc:  # noqa: BLE001 - the worker's failure is the job's error
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return {
            "ok": False,
            "error": f"worker returned a value that is not JSON-serialisable "
            f"({type(value).__name__}): {exc}",
            "traceback": "",
        }
    return {"ok": True, "result": value}


def write_response(path: str, response: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(response, handle, allow_nan=False)


def main(argv: list[str]) -> int:
    request_path, response_path, parent = argv[1], argv[2], int(argv[3])
    # The worker process that started this one dies: take everything down.
    scheduler_module("lifeline").guard(parent)
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    response = run(request)
    sys.stdout.flush()
    sys.stderr.flush()
    write_response(response_path, response)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
