"""A service's code: its files, its hashes, and a cheap stamp of it.

The content hash (definition and ``*.py`` files) identifies what ran; the
code hash alone tells a long-running process that a service's code changed,
so it forgets the modules it imported and imports the code on disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from scheduler.registry.definitions import Draft

# Folders whose *.py files are not the service's code: caches, VCS data and
# virtualenvs (a job's `python` may live inside its service folder).
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})


def _code_files(location: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    if location.is_file():
        yield prefix + location.name, location
        return
    for path in _py_files(os.fspath(location)):
        yield prefix + Path(path).relative_to(location).as_posix(), Path(path)


def _py_files(folder: str) -> Iterator[str]:
    """The *.py files under ``folder``, the service's code: not in caches,
    VCS data or virtualenvs, and, as ``os.walk``, not in linked folders.
    Plain strings: :func:`code_stamp` walks them before every plan."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            if entry.name.endswith(".py"):
                yield entry.path
        elif (
            not entry.name.startswith(".")
            and entry.name not in SKIPPED_DIRS
            and not entry.is_symlink()
            and not os.path.exists(os.path.join(entry.path, "pyvenv.cfg"))
        ):
            yield from _py_files(entry.path)


def _code_of(draft: Draft) -> dict[str, Path]:
    """The service's *.py files by relative path."""
    files: dict[str, Path] = {}
    for location in draft.code:
        # Code found through entries sits in shared roots: keep its folder name.
        prefix = f"{location.name}/" if draft.code_from_entries and location.is_dir() else ""
        files.update(_code_files(location, prefix))
    return files


def _digest(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for relative, path in sorted(files.items()):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def hash(draft: Draft) -> None:
    """The content hash (definition file and *.py files, in the order of their
    relative paths, so a change to either is noticed) and the code hash."""
    files = _code_of(draft)
    draft.service.code = tuple(draft.code)
    draft.service.code_hash = _digest(files)
    if draft.definition_file is not None and draft.definition_file.is_file():
        files[draft.definition_file.name] = draft.definition_file
    draft.service.content_hash = _digest(files)
    service = draft.service
    service.jobs = [
        replace(job, service_version=service.version, service_hash=service.content_hash)
        for job in service.jobs
    ]


def code_stamp(locations: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Modification times and sizes of the *.py files under ``locations``
    (the files the code hash reads): cheap to take, and it changes when the
    code does. Taken before every plan: plain strings, no path objects (a
    service holding a vendored package has hundreds of files)."""
    stamp: list[tuple[str, int, int]] = []
    for location in locations:
        place = os.fspath(location)
        for path in [place] if os.path.isfile(place) else _py_files(place):
            try:
                status = os.stat(path)
            except OSError:
                continue
            stamp.append((path, status.st_mtime_ns, status.st_size))
    return tuple(stamp)
