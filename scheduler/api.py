"""The HTTP API and dashboard of ``dcm-scheduler serve`` (SPEC §11).

A thin FastAPI layer over the library the CLI uses: reads come from
:mod:`scheduler.queries` (the same JSON documents as ``--json``), writes call
:mod:`scheduler.control`, and ``POST /stable-patient`` accepts the push of
dcm-processor's Orthanc script so an existing Orthanc keeps working when it
is pointed at this server. Every write needs ``Authorization: Bearer
<DCM_API_TOKEN>``; reads are open on a loopback address and need the token
too when the server listens on any other address. The dashboard (plain
HTML/JS under ``scheduler/web``) is served at ``/``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from scheduler import control, queries
from scheduler.config import get_settings
from scheduler.dicom import InstanceItem, NotDicomError, item_from_mapping, read_header
from scheduler.headers import UnknownCandidateError
from scheduler.ingest import record_instances
from scheduler.redact import hide_secrets, mask
from scheduler.registry import current_registry, folder_problems
from scheduler.sessions import current_fingerprint, open_session, plan_session, trigger
from scheduler.store.db import transaction
from scheduler.store.models import Job, SchedulingSession

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"
SessionStatus = Literal[
    "planning", "running", "succeeded", "failed", "partial", "cancelled", "empty"
]
JobStatus = Literal["queued", "running", "succeeded", "failed", "upstream_failed", "cancelled"]
Level = Literal["study", "series", "patient"]
STABLE_PATIENT_EVENT = "patient.stable"
TOKEN_HINT = "send it as 'Authorization: Bearer <DCM_API_TOKEN>'"
# The dashboard loads nothing from elsewhere and runs no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --------------------------------------------------------------------------
# Access: bearer token for writes, and for reads off loopback
# --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _presented_token(request: Request, *, basic: bool) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if basic and scheme.lower() == "basic":
        # dcm-processor's Orthanc script cannot send a bearer header, but it
        # can put credentials in SCHEDULER_HOST (http://user:TOKEN@host).
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def _check_token(request: Request, *, basic: bool = False) -> None:
    expected = get_settings().api_token
    if expected is None:
        raise HTTPException(
            403,
            "this server has no API token: set DCM_API_TOKEN in its environment, "
            f"restart it, and {TOKEN_HINT}",
        )
    given = _presented_token(request, basic=basic)
    if given is None:
        raise HTTPException(
            401, f"missing API token: {TOKEN_HINT}", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            401,
            "wrong API token (compare with DCM_API_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_write(request: Request) -> None:
    _check_token(request)


def require_legacy_write(request: Request) -> None:
    _check_token(request, basic=True)


def require_read(request: Request) -> None:
    if request.app.state.reads_need_token:
        _check_token(request)


def _may_read(request: Request) -> bool:
    try:
        require_read(request)
    except HTTPException:
        return False
    return True


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------


class TriggerRequest(BaseModel):
    """``POST /api/trigger``: a new session for one resource and a custom event."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    level: Level
    uid: str = Field(min_length=1, max_length=128)


# --------------------------------------------------------------------------
# dcm-processor's POST /stable-patient
# --------------------------------------------------------------------------


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
            session_id = _existing_session(patient_id)
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


def _existing_session(patient_id: str) -> str:
    fingerprint = current_fingerprint("patient", patient_id).fingerprint
    with transaction() as db:
        found = db.scalar(
            select(SchedulingSession.id).where(
                SchedulingSession.event == STABLE_PATIENT_EVENT,
                SchedulingSession.level == "patient",
                SchedulingSession.uid == patient_id,
                SchedulingSession.fingerprint == fingerprint,
                SchedulingSession.trigger == "",
            )
        )
    if found is None:  # pragma: no cover - only if the session was deleted meanwhile
        raise queries.NotFoundError(f"no session for patient {patient_id!r}")
    return str(found)


# --------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------

reads = APIRouter(prefix="/api", dependencies=[Depends(require_read)], tags=["read"])
writes = APIRouter(prefix="/api", dependencies=[Depends(require_write)], tags=["write"])
legacy = APIRouter(dependencies=[Depends(require_legacy_write)], tags=["dcm-processor"])

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many rows.")]
Offset = Annotated[int, Query(ge=0, description="Rows to skip (pagination).")]


@reads.get("/sessions")
def get_sessions(
    status: SessionStatus | None = None,
    uid: Annotated[str | None, Query(max_length=128)] = None,
    event: Annotated[str | None, Query(max_length=128)] = None,
    since: Annotated[datetime | None, Query(description="Created at or after (ISO 8601).")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """Scheduling sessions, newest first (the ``sessions --json`` objects)."""
    with transaction() as db:
        return queries.list_sessions(
            db, status=status, uid=uid, event=event, since=since, limit=limit, offset=offset
        )


@reads.get("/sessions/{session_id}")
def get_session(session_id: str) -> dict[str, Any]:
    """The session with its ``trace`` and ``jobs`` (``show --json``); a unique
    id prefix works too."""
    with transaction() as db:
        return queries.show_session(db, session_id)


@reads.get("/jobs")
def get_jobs(
    session_id: Annotated[str | None, Query(description="Session id or unique prefix.")] = None,
    status: JobStatus | None = None,
    job_name: Annotated[str | None, Query(max_length=255)] = None,
    limit: Limit = 500,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """Jobs (the ``jobs --json`` objects): a session's in DAG order, else newest first."""
    with transaction() as db:
        if session_id:
            session_id = queries.resolve_session_id(db, session_id)
        return queries.list_jobs(
            db,
            session_id=session_id,
            status=status,
            job_name=job_name,
            limit=limit,
            offset=offset,
        )


@reads.get("/jobs/{job_id}")
def get_job(job_id: str) -> dict[str, Any]:
    """One job (the ``jobs --json`` object)."""
    with transaction() as db:
        row = db.get(Job, job_id)
        if row is None:
            raise queries.NotFoundError(f"no job {job_id!r}")
        return queries.job_json(row, queries.dependency_names(db, [row.id]).get(row.id, ()))


@reads.get("/services")
def get_services() -> dict[str, Any]:
    """Loaded services with their jobs, and every problem found (``services list --json``)."""
    missing = folder_problems(get_settings().services_path, "on DCM_SERVICES_PATH")[1]
    return queries.services_report(current_registry(), missing)


@reads.get("/workers")
def get_workers() -> list[dict[str, Any]]:
    """Workers seen: hostname, channels, pid, started_at, last_heartbeat, age_s, live."""
    with transaction() as db:
        return queries.list_workers(db)


def get_health(request: Request) -> JSONResponse:
    """Store reachable (200) or not (503); details when the caller may read."""
    settings = get_settings()
    store: dict[str, Any] = {"url": mask(settings.database_url)}
    try:
        with transaction() as db:
            db.execute(text("SELECT 1"))
        store["ok"] = True
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        store |= {"ok": False, "error": hide_secrets(reason, settings.database_url)}
    code = 200 if store["ok"] else 503
    if not _may_read(request):
        return JSONResponse({"ok": store["ok"]}, status_code=code)
    try:
        registry = current_registry(settings)
        services, problems = len(registry.services), len(registry.problems)
    except Exception as exc:  # noqa: BLE001 - a broken registry is reported, not raised
        services, problems = 0, 1
        log.warning("cannot load services: %s", exc)
    return JSONResponse(
        {
            "ok": store["ok"],
            "store": store,
            "broker": {
                "scheme": urlsplit(settings.broker_url).scheme or settings.broker_url,
                "url": mask(settings.broker_url),
            },
            "services": services,
            "problems": problems,
            "api_token_configured": settings.api_token is not None,
            "reads_need_token": request.app.state.reads_need_token,
        },
        status_code=code,
    )


@writes.post("/trigger", status_code=201)
def post_trigger(body: TriggerRequest) -> dict[str, Any]:
    """A new session for ``level``/``uid`` with ``event``, planned now."""
    planned = trigger(body.event, body.level, body.uid)
    return planned.as_dict(body.event, body.level, body.uid)


@writes.post("/jobs/{job_id}/retry")
def post_job_retry(job_id: str) -> dict[str, Any]:
    """Re-run a failed (or cancelled, upstream_failed) job and what depends on it."""
    return control.retry_jobs(job_id=job_id).as_dict()


@writes.post("/sessions/{session_id}/retry")
def post_session_retry(session_id: str) -> dict[str, Any]:
    """Re-run every failed or cancelled job of the session and what depends on them."""
    return control.retry_jobs(session_id=session_id).as_dict()


@writes.post("/sessions/{session_id}/cancel")
def post_session_cancel(session_id: str) -> dict[str, Any]:
    """Cancel what has not started and stop what runs."""
    return control.cancel_session(session_id).as_dict()


STABLE_PATIENT_EXAMPLES: dict[str, Any] = {
    "orthanc": {
        "summary": "what dcm-processor's Orthanc script sends",
        "value": {
            "id": "<orthanc patient id>",
            "tags": {"PatientID": "P1", "PatientName": "DOE^JANE"},
            "studies": [
                {
                    "id": "<orthanc study id>",
                    "tags": {"StudyInstanceUID": "1.2.3"},
                    "series": [{"id": "<orthanc series id>", "tags": {"Modality": "CT"}}],
                }
            ],
            "studyIds": ["<orthanc study id>"],
            "seriesIds": ["<orthanc series id>"],
            "dcmpath": "dicom/<orthanc patient id>",
        },
    },
    "instances": {
        "summary": "instances listed with their tags and file locations",
        "value": {
            "PatientID": "P1",
            "studies": [
                {
                    "tags": {"StudyInstanceUID": "1.2.3"},
                    "series": [
                        {
                            "tags": {"SeriesInstanceUID": "1.2.3.4", "Modality": "CT"},
                            "instances": [
                                {"SOPInstanceUID": "1.2.3.4.1", "location": "/data/1.dcm"}
                            ],
                        }
                    ],
                }
            ],
        },
    },
}


@legacy.post("/stable-patient")
def post_stable_patient(
    body: Annotated[dict[str, Any], Body(openapi_examples=STABLE_PATIENT_EXAMPLES)],
) -> dict[str, Any]:
    """dcm-processor's push from its Orthanc script, accepted unchanged.

    The body describes one patient, as dcm-processor's ``OnStablePatient``
    sends it: ``id`` (Orthanc patient id), ``tags`` (patient main tags),
    ``studies`` (each with ``id``, ``tags`` and ``series``: ``id`` and
    ``tags``), ``studyIds``, ``seriesIds`` and ``dcmpath``, the folder under
    which each series' files lie as ``<dcmpath>/<series id>/*.dcm``. Key names
    are matched whatever their case or separators (``dcmPath``, ``dcm_path``),
    and ``MainDicomTags`` works for ``tags``.

    - A series listing ``instances`` (tags with ``SOPInstanceUID``, plus
      ``location``/``path``) is recorded as listed, its study's and patient's
      tags filling in; an instance given only as a file is read from disk.
    - A series without instances is read from the DICOM headers of the files
      under ``<dcmpath>/<series id>`` (or its own ``dcmpath``); a body naming
      no series at all means every file under ``dcmpath``. Files that are not
      DICOM are skipped and listed with their reason.
    - A relative ``dcmpath`` is taken from ``DCM_DATA_ROOT`` (dcm-processor's
      shared DATA folder; default: the server's working folder). A path that
      leads outside it — absolute, with ``..``, or through a symlink — is
      refused with 400 and logged; nothing of that body is recorded.

    Then one ``patient.stable`` session is opened and planned per patient
    (``open_session(manual=False)``: the same data pushed again returns the
    same session with ``created: false``). Answers 200, as dcm-processor's
    scheduler did. Authentication: the bearer token, or HTTP Basic with the
    token as password, so an Orthanc whose ``SCHEDULER_HOST`` is
    ``http://dcm:<token>@scheduler`` works without edits to its script.
    """
    return stable_patient(body)


# --------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------


def _error(status: int) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        content: dict[str, Any] = {"detail": str(exc)}
        if isinstance(exc, BadPushError):
            client = request.client.host if request.client else "unknown client"
            log.warning("refused a push from %s: %s", client, exc)
        if isinstance(exc, BadPushError) and exc.skipped:
            content["skipped"] = exc.skipped
        return JSONResponse(content, status_code=status)

    return handler


async def _store_unreachable(_request: Request, exc: Exception) -> JSONResponse:
    settings = get_settings()
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    detail = f"the store is unreachable: {hide_secrets(reason, settings.database_url)}"
    return JSONResponse({"detail": detail}, status_code=503)


def create_app(*, host: str = "127.0.0.1", web: Path = WEB) -> FastAPI:
    """The API and dashboard; reads need the token unless ``host`` is loopback."""
    app = FastAPI(
        title="dcm-scheduler",
        summary="Sessions, jobs and services of the dcm-processor job scheduler.",
        version="1",
    )
    app.state.reads_need_token = not is_loopback(host)
    app.include_router(reads)
    app.include_router(writes)
    app.include_router(legacy)
    app.add_api_route("/api/health", get_health, methods=["GET"], tags=["read"])
    app.add_exception_handler(queries.NotFoundError, _error(404))
    app.add_exception_handler(UnknownCandidateError, _error(404))
    app.add_exception_handler(control.NothingToDoError, _error(409))
    app.add_exception_handler(BadPushError, _error(400))
    app.add_exception_handler(OperationalError, _store_unreachable)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def dashboard() -> Response:
        return FileResponse(web / "index.html", headers=PAGE_HEADERS)

    @app.get("/sessions/{session_id}", include_in_schema=False)
    def session_page(session_id: str) -> Response:
        return RedirectResponse(f"/#/sessions/{session_id}")

    app.mount("/static", StaticFiles(directory=web), name="static")
    return app


def serve(host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the API and dashboard with uvicorn until interrupted."""
    import uvicorn

    from scheduler.store.db import init_db

    settings = get_settings()
    init_db()
    if settings.api_token is None:
        log.warning("DCM_API_TOKEN is not set: every write (and /stable-patient) is refused")
    if not is_loopback(host):
        log.warning("listening on %s: reads need the API token too", host)
    uvicorn.run(create_app(host=host), host=host, port=port, log_level="info")
