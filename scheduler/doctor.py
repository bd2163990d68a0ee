"""``dcm-scheduler doctor``: check every moving part and say how to fix it.

Each check returns a :class:`Check` with a status (``ok``, ``warning``,
``problem``), what was found, and the fix. Nothing here changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from scheduler.config import Settings, get_settings
from scheduler.redact import hide_secrets, mask
from scheduler.vocabulary import JobStatus, SessionStatus

OK, WARNING, PROBLEM = "ok", "warning", "problem"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_store(settings: Settings) -> Check:
    from scheduler.store.db import sqlite_path
    from scheduler.store.reader import store_revision
    from scheduler.store.schema import SCHEMA_HEAD

    url = mask(settings.database_url)
    path = sqlite_path(settings.database_url)
    if path is not None and not path.is_file():
        return Check("store", PROBLEM, f"no store at {path}", "run: dcm-scheduler init-db")
    try:
        current = store_revision(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return Check(
            "store",
            PROBLEM,
            f"cannot connect to {url}: "
            f"{hide_secrets(str(exc).splitlines()[0], settings.database_url)}",
            "check DCM_DATABASE_URL and that the database server runs",
        )
    if current != SCHEMA_HEAD:
        return Check(
            "store",
            PROBLEM,
            f"{url} is at schema {current or 'none'}, code needs {SCHEMA_HEAD}",
            "run: dcm-scheduler init-db",
        )
    return Check("store", OK, f"{url}, schema {current}")


def check_broker(settings: Settings) -> Check:
    if settings.uses_filesystem_broker:
        # Connecting would create its folders: look at them instead.
        folder = settings.broker_folder
        if not (folder / "queue").is_dir():
            return Check(
                "broker",
                WARNING,
                f"embedded broker at {folder}: not used yet",
                "dcm-scheduler run (or demo) creates it; CELERY_BROKER_URL for Redis/RabbitMQ",
            )
        bad = folder / "bad"
        set_aside = sum(1 for _ in bad.iterdir()) if bad.is_dir() else 0
        if set_aside:
            return Check(
                "broker",
                WARNING,
                f"embedded broker at {folder}: {set_aside} damaged message file(s) set aside",
                f"look at them in {bad}, then delete them",
            )
        return Check("broker", OK, f"embedded broker at {folder}")
    from scheduler.celery_app import app

    url = mask(str(app.conf.broker_url))
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # noqa: BLE001
        return Check(
            "broker",
            PROBLEM,
            f"cannot reach {url}: {hide_secrets(str(exc), settings.broker_url)}",
            "check CELERY_BROKER_URL and that Redis/RabbitMQ runs; jobs planned "
            "meanwhile are kept and sent by the re-sender when it is back",
        )
    return Check("broker", OK, url)


def check_services(settings: Settings) -> Check:
    from scheduler.registry import current_registry

    registry = current_registry(settings)
    jobs = registry.jobs()
    summary = f"{len(registry.services)} service(s), {len(jobs)} job(s) from " + ", ".join(
        str(p) for p in settings.services_path
    )
    if registry.problems:
        return Check(
            "services",
            PROBLEM,
            summary + "; " + "; ".join(map(str, registry.problems)),
            "run: dcm-scheduler services validate, fix the files named above",
        )
    if not jobs:
        return Check(
            "services",
            WARNING,
            summary,
            "put service folders (with dcm-processor.json) on DCM_SERVICES_PATH",
        )
    return Check("services", OK, summary)


def check_header_fields(settings: Settings) -> Check | None:
    """The header fields asked for (``DCM_HEADER_FIELDS``, or a legacy
    system settings file's ``headerFields``) that no header ever holds: a
    misspelt keyword keeps a field from every callback and worker, silently.
    None when every field is passed on."""
    from scheduler.dicom import ALL_TAGS
    from scheduler.registry import current_registry

    asked: Sequence[str] | None = settings.header_fields
    where = "DCM_HEADER_FIELDS"
    if asked is None:
        asked, where = current_registry(settings).header_fields, "headerFields"
    if asked is None:
        return None
    unknown = [name for name in asked if name not in ALL_TAGS]
    if not unknown:
        return Check("header_fields", OK, f"{where}: {len(asked)} field(s), all recorded")
    return Check(
        "header_fields",
        WARNING,
        f"{where} names {', '.join(unknown)}, which the store does not record, so no "
        "header holds them (it records these DICOM keywords: " + ", ".join(ALL_TAGS) + ")",
        f"correct the spelling in {where}, or leave those names out",
    )


def check_workers(settings: Settings) -> Check:
    from scheduler.presence import live_channels
    from scheduler.registry import current_registry
    from scheduler.store.db import transaction
    from scheduler.vocabulary import PLANNING_QUEUE

    with transaction() as db:
        live = live_channels(db)
    needed = {PLANNING_QUEUE} | {job.channel for job in current_registry(settings).jobs()}
    missing = sorted(needed - live)
    if missing:
        commands = "; ".join(f"celery -A scheduler worker -Q {c}" for c in missing)
        return Check(
            "workers",
            PROBLEM,
            f"no live worker consumes: {', '.join(missing)} "
            f"(live channels: {', '.join(sorted(live)) or 'none'})",
            f"start: {commands} (or dcm-scheduler run on one machine)",
        )
    return Check("workers", OK, f"live channels: {', '.join(sorted(live))}")


def check_paused(settings: Settings) -> Check | None:
    """A warning per paused channel: its jobs wait until someone resumes it
    (README, "Pausing a channel"); None when nothing is paused."""
    from scheduler.queries import list_paused
    from scheduler.store.db import transaction

    with transaction() as db:
        paused = list_paused(db)
    if not paused:
        return None
    detail = "; ".join(
        f"{row['channel']} since {row['paused_at']}"
        + (f" ({row['reason']})" if row["reason"] else "")
        + f", {row['queued']} job(s) queued"
        for row in paused
    )
    return Check(
        "paused channels",
        WARNING,
        f"paused: {detail}",
        "; ".join(f"dcm-scheduler resume {row['channel']}" for row in paused)
        + " when the maintenance is over",
    )


def check_lifeline() -> Check | None:
    """A warning where processes cannot be tied to their parent (no
    ``prctl``: not Linux, a C library without it, or a sandbox refusing it);
    None where they are.
    There a worker killed with SIGKILL leaves its attempts and callbacks
    running (README, "Failure modes")."""
    from scheduler import lifeline

    if lifeline.supported():
        return None
    return Check(
        "processes",
        WARNING,
        "this system cannot have a process signalled when its parent dies (prctl): "
        "a worker or planner killed with SIGKILL leaves its attempts and callbacks "
        "running until they end",
        "run the scheduler on Linux (the Dockerfile's image)",
    )


def check_beat(settings: Settings) -> Check:
    """Beat renews a lease every few seconds while it runs (scheduler.beat):
    no lease, or one not renewed for three rounds, means nothing detects new
    data or re-sends lost messages."""
    from scheduler.beat import ALIVE_EVERY, ALIVE_FOR, BEAT_LEASE
    from scheduler.store.db import transaction
    from scheduler.store.models import Lease, utcnow

    start = "start it: celery -A scheduler beat (or dcm-scheduler run on one machine)"
    with transaction() as db:
        row = db.get(Lease, BEAT_LEASE)
        expires, holder = (row.expires_at, row.holder) if row is not None else (None, "")
    if expires is None:
        return Check("beat", PROBLEM, "beat has never run against this store", start)
    where = holder.rsplit(":", 1)[0]
    silent = (utcnow() - (expires - timedelta(seconds=ALIVE_FOR))).total_seconds()
    if silent > 3 * ALIVE_EVERY:
        return Check(
            "beat",
            PROBLEM,
            f"beat ({where}) last renewed its lease {silent:.0f}s ago: no detection, no re-sending",
            start,
        )
    return Check("beat", OK, f"alive ({where}, {silent:.0f}s ago)")


def check_backlog(settings: Settings) -> Check:
    """Work that should have moved and did not: beat or the re-sender may be down."""
    from scheduler.store.db import transaction
    from scheduler.store.models import Job, SchedulingSession, utcnow

    now = utcnow()
    old = now - timedelta(seconds=max(settings.resend_after, 120))
    with transaction() as db:
        planning = (
            db.scalar(
                select(func.count())
                .select_from(SchedulingSession)
                .where(
                    SchedulingSession.status == SessionStatus.PLANNING,
                    SchedulingSession.created_at < old,
                )
            )
            or 0
        )
        stale = (
            db.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.status == JobStatus.QUEUED,
                    Job.pending_deps == 0,
                    Job.created_at < old,
                    Job.started_at.is_(None),
                )
            )
            or 0
        )
    if planning or stale:
        return Check(
            "backlog",
            WARNING,
            f"{planning} session(s) waiting to be planned and {stale} ready job(s) "
            "not started for a while",
            "check that beat runs (celery -A scheduler beat: it re-sends lost "
            "messages) and that workers consume those channels",
        )
    return Check("backlog", OK, "nothing stuck")


def check_orthanc(settings: Settings) -> Check | None:
    if not settings.orthanc_url:
        return None
    import httpx

    from scheduler.orthanc import split_credentials

    base, auth = split_credentials(settings.orthanc_url)
    try:
        response = httpx.get(f"{base}/system", auth=auth, timeout=5)
        response.raise_for_status()
        version = response.json().get("Version", "?")
    except Exception as exc:  # noqa: BLE001
        return Check(
            "orthanc",
            PROBLEM,
            f"{base}: {hide_secrets(str(exc), settings.orthanc_url)}",
            "check DCM_ORTHANC_URL (and its credentials) and that Orthanc runs",
        )
    return Check("orthanc", OK, f"{base}, Orthanc {version}")


def check_webhooks(settings: Settings) -> Check | None:
    """Notifications not delivered (README, "Notifications"): a receiver
    down or refusing them, or webhooks turned off with some still owed."""
    from scheduler.store.db import transaction
    from scheduler.webhooks import MAX_ATTEMPTS, outbox_state, receiver

    with transaction() as db:
        state = outbox_state(db)
    if not settings.webhook_urls and not (state.waiting or state.given_up):
        return None
    urls = ", ".join(map(receiver, settings.webhook_urls)) or "no DCM_WEBHOOK_URLS"
    if state.given_up:
        return Check(
            "webhooks",
            PROBLEM,
            f"{state.given_up} notification(s) given up after {MAX_ATTEMPTS} attempts "
            f"({urls}); last error: {state.last_error}",
            "make the receiver answer 2xx; given-up notifications are not sent again",
        )
    if state.failing or (state.waiting and not settings.webhook_urls):
        return Check(
            "webhooks",
            WARNING,
            f"{state.waiting} notification(s) waiting, {state.failing} failing ({urls}); "
            f"last error: {state.last_error}",
            "check that the receiver runs and answers 2xx, and that beat and a "
            "dcm.planning worker run: they are retried with a growing back-off",
        )
    unknown = sorted(settings.webhook_services - _service_names(settings))
    if settings.webhook_urls and unknown:
        return Check(
            "webhooks",
            WARNING,
            f"DCM_WEBHOOK_SERVICES names {', '.join(map(repr, unknown))}, not a loaded "
            "service: no session of it is ever notified",
            "use the names `dcm-scheduler services list` shows",
        )
    return Check("webhooks", OK, f"{urls}, {state.waiting} waiting")


def _service_names(settings: Settings) -> set[str]:
    from scheduler.registry import current_registry

    registry = current_registry(settings)
    return {service.name for service in registry.services} | set(registry.broken)


def run_checks(settings: Settings | None = None) -> list[Check]:
    settings = settings or get_settings()
    store = check_store(settings)
    checks = [store, check_broker(settings), check_services(settings)]
    fields = check_header_fields(settings)
    if fields:
        checks.append(fields)
    if store.status == OK:
        checks += [check_workers(settings), check_beat(settings), check_backlog(settings)]
        paused = check_paused(settings)
        if paused:
            checks.append(paused)
        webhooks = check_webhooks(settings)
        if webhooks:
            checks.append(webhooks)
    orthanc = check_orthanc(settings)
    if orthanc:
        checks.append(orthanc)
    processes = check_lifeline()
    if processes:
        checks.append(processes)
    return checks
