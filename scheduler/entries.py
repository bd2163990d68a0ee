"""Resolving a service's entries (``module.sub:function``) inside its folder.

The one way the scheduler imports service code: the registry when it
validates a service, and the callback host (:mod:`scheduler.callbacks`)
before it calls a callback. An entry must stay inside its service's folders
(and its package, for an installed service): that is checked before any of
its code runs, so ``os:system`` or ``../elsewhere`` never executes. Standard
library only: the callback host imports nothing else to get here.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from _thread import RLock
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from types import ModuleType
from typing import Any

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*")

# Importing runs service code that may itself import; one loader at a time
# keeps the "already imported from elsewhere" checks and sys.path edits sound.
# threading's RLock is this one; importing threading itself would cost every
# attempt forked from a fork server its after-fork handler.
_import_lock = RLock()


class RegistryError(Exception):
    """A service definition problem a user can meet and fix."""


class EntryError(RegistryError):
    """An entry (``module.sub:function``) that cannot be resolved or imported.

    ``str()`` is the reason only, so callers can say which entry it was:
    ``f"cannot import workerEntry {entry!r}: {exc}"``.
    """

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(reason)
        self.entry = entry
        self.reason = reason


@dataclass(frozen=True)
class _Target:
    """Where an entry's top-level module was found, before anything is imported."""

    module: str
    attribute: str | None  # None for the dotted form: split at import
    top: str
    root: Path
    location: Path  # the package folder or module file


def _parse_entry(entry: str) -> tuple[str, str | None]:
    text = entry.strip()
    if "/" in text or "\\" in text or text.startswith("."):
        raise EntryError(
            entry,
            "a path points outside its service folder; name a module inside it,"
            " like 'package.module:function'",
        )
    module, colon, attribute = text.partition(":")
    if colon:
        if _DOTTED.fullmatch(module) and _DOTTED.fullmatch(attribute):
            return module, attribute
    elif _DOTTED.fullmatch(text) and "." in text:
        return text, None
    raise EntryError(entry, "expected 'module.sub:function' or 'module.sub.function'")


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "no folder"


def spec_location(spec: ModuleSpec) -> Path | None:
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None


def module_location(module: ModuleType) -> Path | None:
    path = getattr(module, "__path__", None)
    if path:
        return Path(next(iter(path)))
    file = getattr(module, "__file__", None)
    return Path(file) if file else None


def same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def inside(path: Path, roots: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _known_elsewhere(top: str) -> bool:
    if top in sys.modules:
        return True
    try:
        # Finding a top-level module runs none of its code.
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def locate(entry: str, roots: Sequence[Path], package: str | None) -> _Target:
    """Find the entry's top-level module in ``roots`` without importing it, so
    an entry such as ``os:system`` is refused before any code runs."""
    module, attribute = _parse_entry(entry)
    if package is not None and module != package and not module.startswith(package + "."):
        raise EntryError(
            entry,
            f"module {module!r} is outside its service folder: entries of this service"
            f" must be inside its package {package!r}",
        )
    top = module.partition(".")[0]
    for root in roots:
        spec = PathFinder.find_spec(top, [str(root)])
        location = spec_location(spec) if spec else None
        if location is not None:
            return _Target(module, attribute, top, root, location)
    if _known_elsewhere(top):
        raise EntryError(
            entry,
            f"module {top!r} is outside its service folder (looked in {_roots_text(roots)})",
        )
    raise EntryError(entry, f"no module named {top!r} in {_roots_text(roots)}")


def _import_top(entry: str, target: _Target) -> None:
    """Import the top-level module from exactly where it was found, so another
    module of the same name earlier on sys.path can never stand in for it."""
    existing = sys.modules.get(target.top)
    if existing is not None:
        location = module_location(existing)
        if location is None or not same_path(location, target.location):
            raise EntryError(
                entry,
                f"module {target.top!r} is also provided by {location or 'a built-in module'},"
                " which is already imported; rename the service's module",
            )
        return
    spec = PathFinder.find_spec(target.top, [str(target.root)])
    if spec is None or spec.loader is None:
        raise EntryError(entry, f"no module named {target.top!r} in {target.root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[target.top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(target.top, None)
        raise


def _missing(error: ModuleNotFoundError, candidate: str) -> bool:
    """Whether ``candidate`` itself is absent, not a module it imports."""
    name = error.name or ""
    return candidate == name or candidate.startswith(name + ".")


def _import_target(target: _Target) -> tuple[ModuleType, list[str]]:
    if target.attribute is not None:
        return importlib.import_module(target.module), target.attribute.split(".")
    # Dotted form: the longest importable prefix is the module, the rest attributes.
    parts = target.module.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        try:
            return importlib.import_module(candidate), parts[cut:]
        except ModuleNotFoundError as exc:
            if cut == 1 or not _missing(exc, candidate):
                raise
    raise AssertionError("unreachable: the loop returns or raises at cut == 1")


def _resolve_attributes(
    entry: str, module: ModuleType, attributes: list[str], roots: Sequence[Path]
) -> Any:
    value: Any = module
    path = module.__name__
    for name in attributes:
        if not hasattr(value, name):
            raise EntryError(entry, f"{path!r} has no attribute {name!r}")
        value = getattr(value, name)
        path = f"{path}.{name}"
        # `mypkg.os.system` reaches outside through a module mypkg imported.
        location = module_location(value) if isinstance(value, ModuleType) else None
        if isinstance(value, ModuleType) and (location is None or not inside(location, roots)):
            raise EntryError(entry, f"{path!r} is a module outside its service folder")
    return value


def _ensure_on_path(root: Path, front: bool) -> None:
    # Appended in a shared process (the registry's): a service folder must
    # never shadow an installed library there. Our own top-level import does
    # not depend on the order (see _import_top); the service's sibling
    # imports do, so a process of the service's own puts it in front.
    if str(root) not in sys.path:
        sys.path.insert(0, str(root)) if front else sys.path.append(str(root))


def _raised(exc: BaseException) -> str:
    """``Kind: message`` of what an import raised, never raising: its
    ``__str__`` is service code too (as :func:`scheduler.untrusted.described`,
    which this module, loaded from its file under a service's interpreter,
    cannot import)."""
    # The class's own name, not what a metaclass of the service's says it is.
    kind = type.__dict__["__name__"].__get__(type(exc))
    try:
        text = str.__str__(str(exc))  # a plain copy: a str subclass formats itself
    except BaseException:  # noqa: BLE001
        return f"{kind} (its message could not be shown: its __str__ raised)"
    return f"{kind}: {text}"


def load_entry(
    entry: str, roots: Sequence[Path], *, package: str | None = None, front: bool = False
) -> Callable[..., Any]:
    """Import ``entry`` (``module.sub:function`` or ``module.sub.function``)
    from the first of ``roots`` that holds its top-level module.

    The entry must stay inside ``roots`` (and inside ``package`` when given);
    that is checked before anything is imported. ``front``: the process is
    the service's own (a job attempt), its folder goes first on ``sys.path``.
    Raises :class:`EntryError`.
    """
    absolute = tuple(Path(root).absolute() for root in roots)
    target = locate(entry, absolute, package)
    with _import_lock:
        _ensure_on_path(target.root, front)
        try:
            _import_top(entry, target)
            module, attributes = _import_target(target)
        except EntryError:
            raise
        except (Exception, SystemExit) as exc:  # service code may raise anything
            raise EntryError(entry, _raised(exc)) from exc
    location = module_location(module)
    if location is None or not inside(location, absolute):
        raise EntryError(
            entry,
            f"module {module.__name__!r} comes from {location}, outside its service folder",
        )
    value = _resolve_attributes(entry, module, attributes, absolute)
    if not callable(value):
        raise EntryError(entry, f"{entry!r} is not callable (it is a {type(value).__name__})")
    return value
