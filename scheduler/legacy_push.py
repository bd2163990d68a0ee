"""dcm-processor's ``POST /stable-patient`` push, understood.

dcm-processor's Orthanc script tells its scheduler that a patient is stable
by posting what it knows: Orthanc ids and main tags of the patient, its
studies and series, and ``dcmpath``, the folder of the shared ``DATA`` where
the series' files lie. :func:`stable_patient` records the instances the
body describes (listed ones with their tags, the others read from their
files) and opens and plans one ``patient.stable`` session per patient, the
same one when the same data is pushed again. Key names are matched whatever
their case or separators (``dcmPath``, ``dcm_path``).

Every path is confined to the data root (``DCM_DATA_ROOT``, default: the
server's working folder): an absolute path outside it, ``..``, a symlink
that leads out, a ``file:`` URL to elsewhere, or a location that is neither
a path nor an http(s) URL refuses the whole push (README, "Failure modes").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from scheduler import queries
from scheduler.config import get_settings
from scheduler.dicom import InstanceItem, NotDicomError, item_from_mapping, read_header
from scheduler.ingest import record_instances
from scheduler.sessions import existing_session, open_session, plan_session
from scheduler.store.db import transaction
from scheduler.store.models import SchedulingSession

STABLE_PATIENT_EVENT = "patient.stable"


class BadPushError(ValueError):
    """A ``/stable-patient`` body that describes nothing the store can record."""

    def __init__(self, message: str, skipped: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.skipped = skipped or []


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _lookup(mapping: Any, *names: str) -> Any:
    """The value of the first of ``names`` present, whatever its case or
    separators (``dcmpath``, ``dcmPath``, ``dcm_path`` are one key)."""
    if not isinstance(mapping, Mapping):
        return None
    keys = {_key(str(k)): v for k, v in mapping.items()}
    for name in names:
        value = keys.get(_key(name))
        if value not in (None, "", [], {}):
            return value
    return None


def _tags(node: Any) -> dict[str, Any]:
    """The DICOM tags of a node: its ``tags``/``MainDicomTags`` and any
    top-level keyword (``PatientID``…) it carries itself."""
    if not isinstance(node, Mapping):
        return {}
    tags = {k: v for k, v in node.items() if isinstance(k, str) and k[:1].isupper()}
    for name in ("tags", "MainDicomTags", "dicomTags", "header", "headers"):
        nested = _lookup(node, name)
        if isinstance(nested, Mapping):
            tags.update({str(k): v for k, v in nested.items()})
    return tags


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def data_root() -> Path:
    """Where relative ``dcmpath`` folders lie (dcm-processor's shared ``DATA``)."""
    return (get_settings().data_root or Path.cwd()).resolve()


class OutsideDataRootError(BadPushError):
    """A pushed path that leads outside the data root (absolute, ``..``, or a
    symlink): refused whole, never read."""


def _inside_root(given: Any, path: Path, root: Path) -> Path:
    """``path`` with every symlink resolved, if it stays inside ``root``."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # too long, a loop, a NUL byte
        raise BadPushError(f"path {str(given)!r} cannot be used: {exc}") from exc
    if not resolved.is_relative_to(root):
        raise OutsideDataRootError(
            f"path {str(given)!r} is outside DCM_DATA_ROOT ({root}; when it is not set, "
            "the server's working folder): refused"
        )
    return resolved


def _folder(value: Any, root: Path) -> Path:
    path = Path(_local_path(value)).expanduser()
    return _inside_root(value, path if path.is_absolute() else root / path, root)


def _location(value: Any) -> tuple[bool, str]:
    """(is a URL, text): a local path (``file:`` URLs decoded to theirs) or an
    http(s) URL with a host; anything else is refused, as are control
    characters (a newline or NUL in a path is never a real location)."""
    text = str(value)
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise BadPushError(f"location {text!r}: control characters are not allowed")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter
        return False, text
    if scheme == "file":
        return False, unquote(parts.path)
    if scheme in ("http", "https") and parts.netloc:
        return True, text
    raise BadPushError(f"location {text!r}: use a path under the data root or an http(s) URL")


def _local_path(location: Any) -> str:
    """A local path, or the path of a ``file:`` URL; any other URL refused."""
    is_url, text = _location(location)
    if is_url:
        raise BadPushError(f"location {text!r}: a file to read must be a path under the data root")
    return text


def _worker_location(location: Any, root: Path) -> str:
    """Where workers will read a listed instance: an http(s) URL (a PACS such
    as Orthanc serves it) as given, a local path only inside the data root,
    resolved."""
    is_url, text = _location(location)
    return text if is_url else str(_folder(text, root))


def _files(folder: Path, root: Path) -> Iterator[Path]:
    """Files under ``folder``, never through a symlink that leaves ``root``."""
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(parent, name)
            if path.is_file():
                yield _inside_root(path, path, root)


def push_items(body: Any, root: Path) -> tuple[list[InstanceItem], list[dict]]:
    """The instances a ``/stable-patient`` body describes, and what was skipped.

    Instances listed in the body are taken with their tags (the study's and
    patient's tags filling in); a series listed without instances is read
    from the DICOM headers of the files under ``<dcmpath>/<series id>``; a
    body naming no series at all means every file under ``dcmpath``.
    """
    if not isinstance(body, Mapping):
        raise BadPushError("the body must be a JSON object describing one patient")
    patient_tags = _tags(body) | _tags(_lookup(body, "patient"))
    given = _lookup(body, "dcmpath", "path", "folder", "dicomPath")
    base = _folder(given, root) if given else None

    series_nodes: list[tuple[Any, dict[str, Any]]] = []
    for study in _list(_lookup(body, "studies")):
        study_tags = _tags(study)
        for series in _list(_lookup(study, "series")):
            series_nodes.append((series, study_tags))
    for series in _list(_lookup(body, "series")):
        series_nodes.append((series, {}))
    named = {
        str(_lookup(s, "id", "seriesId") if isinstance(s, Mapping) else s) for s, _ in series_nodes
    }
    for series_id in _list(_lookup(body, "seriesIds", "series_ids")):
        if str(series_id) not in named:
            series_nodes.append((series_id, {}))

    items: list[InstanceItem] = []
    skipped: list[dict[str, str]] = []
    folders: list[Path] = []

    def take(tags: Mapping[str, Any], location: str) -> None:
        try:
            items.append(item_from_mapping(tags, location))
        except NotDicomError as exc:
            skipped.append({"location": exc.location, "reason": exc.reason})

    for node, study_tags in series_nodes:
        if not isinstance(node, Mapping):
            node = {"id": node}
        series_id = _lookup(node, "id", "seriesId", "SeriesInstanceUID")
        series_tags = patient_tags | study_tags | _tags(node)
        instances = _list(_lookup(node, "instances"))
        for instance in instances:
            if not isinstance(instance, Mapping):  # a file name under the series folder
                folder = base / str(series_id) if base and series_id else base or root
                instance = {"location": str(folder / str(instance))}
            location = _lookup(instance, "location", "path", "file", "filename") or ""
            if location and not _tags(instance).get("SOPInstanceUID"):
                folders.append(_folder(location, root))  # only a file: read its header
                continue
            if location:
                location = _worker_location(location, root)
            take(series_tags | _tags(instance), str(location))
        if instances:
            continue
        own = _lookup(node, "dcmpath", "path", "folder")
        if own:
            folders.append(_folder(own, root))
        elif base is not None and series_id:
            folders.append(_folder(base / str(series_id), root))
        else:
            skipped.append(
                {
                    "location": str(series_id or "<series>"),
                    "reason": "no instances listed and no dcmpath to read them from",
                }
            )
    if not series_nodes:
        if base is None:
            raise BadPushError(
                "the body names no series, no instances and no dcmpath: nothing to record"
            )
        folders.append(base)

    for folder in folders:
        try:
            paths = (
                [folder]
                if folder.is_file()
                else list(_files(folder, root))
                if folder.is_dir()
                else []
            )
        except OSError as exc:  # a name too long for the filesystem …
            raise BadPushError(
                f"path {str(folder)[:200]!r} cannot be read: {exc.strerror}"
            ) from exc
        if not paths:
            skipped.append({"location": str(folder), "reason": "no such file or folder, or empty"})
        for path in paths:
            try:
                items.append(read_header(path))
            except NotDicomError as exc:
                skipped.append({"location": exc.location, "reason": exc.reason})
    return items, skipped


def stable_patient(body: Any) -> dict[str, Any]:
    """Record what a dcm-processor push describes, then open and plan one
    ``patient.stable`` session per patient in it (idempotent per data)."""
    items, skipped = push_items(body, data_root())
    if not items:
        raise BadPushError("no DICOM instance found in the body or under its dcmpath", skipped)
    # Files without a PatientID belong to the patient the body names.
    named = _tags(body) | _tags(_lookup(body, "patient"))
    fallback = named.get("PatientID") or _lookup(body, "patient_id", "id") or ""
    for item in items:
        item.patient_id = item.patient_id or str(fallback)
    with transaction() as db:
        ingested = record_instances(db, items)
    skipped.extend({"location": r.location, "reason": r.reason} for r in ingested.rejected)

    sessions = []
    for patient_id in dict.fromkeys(item.patient_id for item in items):
        session_id = open_session("patient", patient_id, STABLE_PATIENT_EVENT, manual=False)
        created = session_id is not None
        if session_id is None:  # this very data was pushed before: same session
            session_id = existing_session("patient", patient_id, STABLE_PATIENT_EVENT)
        else:
            plan_session(session_id)
        with transaction() as db:
            row = db.get(SchedulingSession, session_id)
            state = row.status if row else "unknown"
            jobs = queries.list_jobs(db, session_id=session_id)
        sessions.append(
            {
                "session_id": session_id,
                "patient_id": patient_id,
                "created": created,
                "status": state,
                "jobs": [job["job_name"] for job in jobs],
            }
        )
    first = sessions[0]
    return {
        "status": "accepted",
        "session_id": first["session_id"],
        "patient_id": first["patient_id"],
        "created": first["created"],
        "sessions": sessions,
        "recorded": ingested.recorded,
        "known": ingested.known,
        "skipped": skipped,
    }
