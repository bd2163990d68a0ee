"""The HTTP API and dashboard of ``dcm-scheduler serve`` (README, "Commands").

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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from scheduler import channels, cohorts, control, queries
from scheduler.config import get_settings
from scheduler.headers import UnknownCandidateError
from scheduler.legacy_push import BadPushError, stable_patient
from scheduler.metrics import StoreCollector
from scheduler.redact import hide_secrets, mask
from scheduler.registry import current_registry, folder_problems
from scheduler.sessions import trigger
from scheduler.store.db import transaction
from scheduler.vocabulary import EVENT_NAME, JobStatus, Level, SessionStatus

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"
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

    event: str = Field(min_length=1, max_length=128, pattern=f"^{EVENT_NAME}$")
    level: Level
    uid: str = Field(min_length=1, max_length=128)


class CohortRequest(BaseModel):
    """``POST /api/cohorts``: a cohort run (README, "Cohort runs"), the
    options of ``trigger --where`` as fields."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(min_length=1, max_length=128, pattern=f"^{EVENT_NAME}$")
    level: Level = Level.STUDY
    where: list[str] = Field(default_factory=list, description="FIELD=VALUE items.")
    since: str | None = Field(default=None, description="Study date on or after (YYYY-MM-DD).")
    until: str | None = Field(default=None, description="Study date on or before (YYYY-MM-DD).")
    limit: int | None = Field(default=None, ge=1)
    rate: str | None = Field(default=None, description="e.g. 30/min, 2/s, 500/h.")
    name: str | None = Field(default=None, max_length=128)
    dry_run: bool = False


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
    q: Annotated[
        str | None,
        Query(
            max_length=128,
            description="Part of the UID, patient ID or name, study UID, description or "
            "accession number (case-insensitive).",
        ),
    ] = None,
    cohort: Annotated[
        str | None, Query(max_length=128, description="Sessions of this cohort run.")
    ] = None,
    urgent: Annotated[
        bool | None, Query(description="Only urgent (true) or only other (false) sessions.")
    ] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """Scheduling sessions, newest first (the ``sessions --json`` objects)."""
    with transaction() as db:
        return queries.list_sessions(
            db,
            status=status,
            uid=uid,
            event=event,
            since=since,
            q=q,
            cohort=cohort,
            urgent=urgent,
            limit=limit,
            offset=offset,
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
    service: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[
        str | None, Query(max_length=64, description="With service: jobs that version ran.")
    ] = None,
    limit: Limit = 500,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """Jobs (the ``jobs --json`` objects): a session's in DAG order, else newest first."""
    if version is not None and service is None:
        raise HTTPException(422, "version needs service: versions are numbered per service")
    with transaction() as db:
        if session_id:
            session_id = queries.resolve_session_id(db, session_id)
        return queries.list_jobs(
            db,
            session_id=session_id,
            status=status,
            job_name=job_name,
            service=service,
            version=version,
            limit=limit,
            offset=offset,
        )


@reads.get("/jobs/{job_id}")
def get_job(job_id: str) -> dict[str, Any]:
    """One job (the ``jobs --json`` object)."""
    with transaction() as db:
        return queries.get_job(db, job_id)


@reads.get("/services")
def get_services() -> dict[str, Any]:
    """Loaded services with their jobs, and every problem found (``services list --json``)."""
    missing = folder_problems(get_settings().services_path, "on DCM_SERVICES_PATH")[1]
    return queries.services_report(current_registry(), missing)


@reads.get("/services/stats")
def get_service_stats(
    since: Annotated[
        datetime | None, Query(description="Jobs that finished at or after (ISO 8601).")
    ] = None,
) -> list[dict[str, Any]]:
    """Per job name and service: runs, success rate, p50/p95 duration, last failure."""
    with transaction() as db:
        return queries.service_stats(db, since)


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


def get_metrics(request: Request) -> Response:
    """The scheduler's figures in Prometheus text format, read from the store
    (README, "Metrics"); the same access rule as the other reads."""
    body = generate_latest(request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


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


@reads.get("/channels")
def get_channels() -> list[dict[str, Any]]:
    """Channels seen (consumed by a worker, holding jobs, or paused), with
    whether each is paused (README, "Pausing a channel")."""
    with transaction() as db:
        return queries.list_channels(db)


class PauseRequest(BaseModel):
    """``POST /api/channels/{channel}/pause``: why, optionally."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


@writes.post("/channels/{channel}/pause")
def post_channel_pause(
    channel: str, body: Annotated[PauseRequest | None, Body()] = None
) -> dict[str, Any]:
    """Stop sending the channel's jobs; running ones finish, queued ones wait.
    ``warning`` says when no service job, stored job or worker uses the
    channel (a typo leaves the real one running)."""
    report = channels.pause(channel, body.reason if body else None).as_dict()
    if not channels.is_used(channel):
        report["warning"] = f"no service job, stored job or worker uses channel {channel!r}"
    return report


@writes.post("/channels/{channel}/resume")
def post_channel_resume(channel: str) -> dict[str, Any]:
    """Send the paused channel's queued jobs, in priority order."""
    return channels.resume(channel).as_dict()


@reads.get("/cohorts")
def get_cohorts() -> list[dict[str, Any]]:
    """Cohort runs, newest first, with their sessions counted by status
    (``cohorts --json``)."""
    with transaction() as db:
        return cohorts.list_cohorts(db)


@writes.post("/cohorts", status_code=201)
def post_cohort(body: CohortRequest, response: Response) -> dict[str, Any]:
    """Start a cohort run (opened on beat at its rate), or with ``dry_run``
    count its matches and open nothing (200)."""
    if not (body.where or body.since or body.until or body.limit):
        raise cohorts.CohortError("give where, since, until or limit")
    criteria = cohorts.Criteria(
        cohorts.parse_where(body.where),
        body.since and cohorts.parse_day(body.since, "since"),
        body.until and cohorts.parse_day(body.until, "until"),
        body.limit,
    )
    rate = cohorts.parse_rate(body.rate)
    if body.dry_run:
        response.status_code = 200
        return cohorts.preview(body.level, criteria).as_dict() | {"dry_run": True}
    return cohorts.start(body.event, body.level, criteria, rate_per_min=rate, name=body.name)


@writes.post("/cohorts/{name}/cancel")
def post_cohort_cancel(name: str) -> dict[str, Any]:
    """Stop opening the cohort's sessions and cancel those still open."""
    return cohorts.cancel_cohort(name).as_dict()


@writes.post("/cohorts/{name}/retry")
def post_cohort_retry(name: str) -> dict[str, Any]:
    """Re-run the failed jobs of every failed or partial session of the cohort."""
    return cohorts.retry_cohort(name).as_dict()


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


async def _refuse_nul(request: Request, call_next: Callable[[Request], Any]) -> Any:
    """A NUL character cannot be in any id, name or search text (PostgreSQL
    refuses it in text): the request is wrong, not the server."""
    raw = request.scope.get("query_string", b"").lower()
    if b"%00" in raw or b"\x00" in raw or "\x00" in request.scope.get("path", ""):
        return JSONResponse({"detail": "NUL characters are not allowed"}, status_code=422)
    return await call_next(request)


def create_app(*, host: str = "127.0.0.1", web: Path = WEB) -> FastAPI:
    """The API and dashboard; reads need the token unless ``host`` is loopback."""
    app = FastAPI(
        title="dcm-scheduler",
        summary="Sessions, jobs and services of the dcm-processor job scheduler.",
        version="1",
    )
    app.state.reads_need_token = not is_loopback(host)
    app.middleware("http")(_refuse_nul)
    app.include_router(reads)
    app.include_router(writes)
    app.include_router(legacy)
    app.add_api_route("/api/health", get_health, methods=["GET"], tags=["read"])
    app.state.metrics = CollectorRegistry(auto_describe=False)
    app.state.metrics.register(StoreCollector())
    app.add_api_route(
        "/metrics",
        get_metrics,
        methods=["GET"],
        dependencies=[Depends(require_read)],
        tags=["read"],
        response_class=Response,
    )
    app.add_exception_handler(queries.NotFoundError, _error(404))
    app.add_exception_handler(UnknownCandidateError, _error(404))
    app.add_exception_handler(control.NothingToDoError, _error(409))
    app.add_exception_handler(channels.ChannelNameError, _error(422))
    app.add_exception_handler(channels.NotPausedError, _error(409))
    app.add_exception_handler(cohorts.CohortExistsError, _error(409))
    app.add_exception_handler(cohorts.CohortError, _error(422))
    app.add_exception_handler(BadPushError, _error(400))
    app.add_exception_handler(OperationalError, _store_unreachable)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def dashboard() -> Response:
        return FileResponse(web / "index.html", headers=PAGE_HEADERS)

    @app.get("/sessions/{session_id}", include_in_schema=False)
    def session_page(session_id: str) -> Response:
        return RedirectResponse(f"/#/sessions/{session_id}")

    @app.get("/services", include_in_schema=False)
    def services_page() -> Response:
        return RedirectResponse("/#/services")

    @app.get("/channels", include_in_schema=False)
    def channels_page() -> Response:
        return RedirectResponse("/#/channels")

    @app.get("/cohorts", include_in_schema=False)
    def cohorts_page() -> Response:
        return RedirectResponse("/#/cohorts")

    app.mount("/static", StaticFiles(directory=web), name="static")
    return app


def serve(host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the API and dashboard with uvicorn until interrupted."""
    import uvicorn

    settings = get_settings()
    if settings.api_token is None:
        log.warning("DCM_API_TOKEN is not set: every write (and /stable-patient) is refused")
    if not is_loopback(host):
        log.warning("listening on %s: reads need the API token too", host)
    uvicorn.run(create_app(host=host), host=host, port=port, log_level="info")
