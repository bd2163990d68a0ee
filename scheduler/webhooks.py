"""Delivering the webhook outbox (README, "Notifications").

:func:`deliver_due` takes each notification that is due, claims it with a
conditional update (so two deliverers never post the same row at once),
posts its JSON document to its URL with a timeout, and marks it delivered
on a 2xx answer. Anything else (refused, timed out, another status) leaves
the row for a later attempt after an exponential back-off, with the error
kept on the row, until :data:`MAX_ATTEMPTS` attempts are spent. The
document is built at the first attempt and stored, so every retry sends the
same bytes, signed with ``DCM_WEBHOOK_SECRET`` (``X-DCM-Signature:
sha256=<hex>``). A deliverer that dies between the POST and the mark sends
the row again once its claim lapses: receivers deduplicate on the
``X-DCM-Delivery`` header, the row's id.

Deliveries share the planning workers with clinical work, so a slow or
hanging receiver must not hold them: one deliverer runs at a time (the
``webhooks`` lease; others return at once), a run stops starting posts after
:data:`BUDGET` seconds, a receiver that failed is not tried again in the same
run, and the messages go at the lowest priority, behind every plan.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from scheduler import queries
from scheduler.clock import iso, utcnow
from scheduler.config import Settings, get_settings
from scheduler.leases import acquire, new_holder, release
from scheduler.store.db import rowcount, transaction
from scheduler.store.models import Patient, Series, Study, WebhookDelivery
from scheduler.vocabulary import JobStatus, Level

log = logging.getLogger(__name__)

# Seconds a receiver has to answer.
TIMEOUT = 10.0
# Seconds one delivery run may start posts for; what is left waits for the next.
BUDGET = 15.0
LEASE = "webhooks"
# A claimed row is not taken by another deliverer for this long: longer than
# a POST may take, so only a deliverer that died loses its claim.
CLAIM_FOR = timedelta(seconds=TIMEOUT * 6)
# Back-off after a failed attempt: doubles from FIRST_RETRY up to LONGEST_WAIT;
# after MAX_ATTEMPTS (about a day of trying) the row is given up.
FIRST_RETRY = timedelta(seconds=10)
LONGEST_WAIT = timedelta(hours=1)
MAX_ATTEMPTS = 30
BATCH = 100
FAILED_JOB_STATUSES = (JobStatus.FAILED, JobStatus.UPSTREAM_FAILED, JobStatus.CANCELLED)


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0  # attempts that failed, to be retried
    given_up: int = 0


def backoff(attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed attempt."""
    return min(FIRST_RETRY * 2 ** max(attempts - 1, 0), LONGEST_WAIT)


def signature(secret: str, body: bytes) -> str:
    """The ``X-DCM-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def receiver(url: str) -> str:
    """A webhook URL as logs and ``doctor`` show it: scheme and host only,
    since the path or query of many receivers holds their secret token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def dashboard_link(settings: Settings, session_id: str) -> str:
    return f"{settings.dashboard_url}/sessions/{session_id}"


def _candidate_ids(db: Session, level: str, uid: str) -> dict[str, str | None]:
    """The patient ID and study UID of a candidate, when the store knows them."""
    if level == Level.PATIENT:
        return {"patient_id": uid, "study_uid": None}
    query = (
        select(Patient.patient_id, Study.study_uid)
        .select_from(Study)
        .join(Patient, Patient.id == Study.patient_pk)
    )
    if level == Level.STUDY:
        query = query.where(Study.study_uid == uid)
    else:
        query = query.join(Series, Series.study_pk == Study.id).where(Series.series_uid == uid)
    found = db.execute(query).first()
    return {"patient_id": found[0], "study_uid": found[1]} if found else {}


def document(db: Session, delivery: WebhookDelivery, settings: Settings) -> dict[str, Any]:
    """What a receiver gets: the event, the session (the ``show --json``
    fields without trace and job details), its job counts by status, the
    jobs that did not succeed with their errors, and the dashboard link."""
    shown = queries.show_session(db, delivery.session_id)
    jobs = shown.pop("jobs")
    shown.pop("trace", None)
    shown.pop("added_params", None)
    session = {
        **shown,
        "patient_id": None,
        "study_uid": None,
        **_candidate_ids(db, shown["level"], shown["uid"]),
        "jobs": dict(Counter(job["status"] for job in jobs)),
        "failed_jobs": [
            {
                "id": job["id"],
                "job_name": job["job_name"],
                "service": job["service"],
                "status": job["status"],
                "attempts": job["attempts"],
                "error": job["error"],
            }
            for job in jobs
            if job["status"] in FAILED_JOB_STATUSES
        ],
    }
    return {
        "event": delivery.event,
        "delivery": delivery.id,
        "created_at": iso(delivery.created_at),
        "session": session,
        "dashboard_url": dashboard_link(settings, delivery.session_id),
    }


@dataclass(frozen=True)
class Claimed:
    id: str
    url: str
    event: str
    attempt: int
    body: bytes


def _claim(delivery_id: str, now: datetime, settings: Settings) -> Claimed | None:
    """Take the row for one attempt, if it is still due and undelivered."""
    with transaction() as db:
        taken = db.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.delivered_at.is_(None),
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + CLAIM_FOR)
            .execution_options(synchronize_session=False)
        )
        if rowcount(taken) != 1:
            return None
        row = db.get(WebhookDelivery, delivery_id)
        assert row is not None
        if row.body is None:
            row.body = json.dumps(document(db, row, settings), sort_keys=True)
        return Claimed(row.id, row.url, row.event, row.attempts, row.body.encode())


def _post(claimed: Claimed, settings: Settings) -> str | None:
    """POST the document; None on a 2xx answer, else what went wrong."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "dcm-scheduler",
        "X-DCM-Event": claimed.event,
        "X-DCM-Delivery": claimed.id,
    }
    if settings.webhook_secret:
        headers["X-DCM-Signature"] = signature(settings.webhook_secret, claimed.body)
    try:
        response = httpx.post(claimed.url, content=claimed.body, headers=headers, timeout=TIMEOUT)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _settle(claimed: Claimed, error: str | None, now: datetime) -> str:
    """Record how the attempt went: delivered, to retry, or given up."""
    if error is None:
        values: dict[str, Any] = {"delivered_at": now, "next_attempt_at": None, "last_error": None}
        outcome = "delivered"
    elif claimed.attempt >= MAX_ATTEMPTS:
        values = {"next_attempt_at": None, "last_error": error}
        outcome = "given_up"
    else:
        values = {"next_attempt_at": now + backoff(claimed.attempt), "last_error": error}
        outcome = "failed"
    with transaction() as db:
        db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == claimed.id, WebhookDelivery.attempts == claimed.attempt)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    return outcome


def deliver_due(settings: Settings | None = None, now: datetime | None = None) -> DeliveryReport:
    """Attempt the notifications due at ``now`` (default: the current time),
    unless another deliverer is at it, for at most :data:`BUDGET` seconds."""
    settings = settings or get_settings()
    holder = new_holder()
    if not acquire(LEASE, BUDGET + 2 * TIMEOUT, holder):
        return DeliveryReport()
    try:
        return _deliver(settings, now or utcnow())
    finally:
        release(LEASE, holder)


def _deliver(settings: Settings, now: datetime) -> DeliveryReport:
    report = DeliveryReport()
    stop_at = time.monotonic() + BUDGET
    with transaction() as db:
        due = list(
            db.execute(
                select(WebhookDelivery.id, WebhookDelivery.url)
                .where(
                    WebhookDelivery.delivered_at.is_(None),
                    WebhookDelivery.next_attempt_at <= now,
                )
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(BATCH)
            )
        )
    # A receiver that failed once in this run is not tried again until the
    # next: a host that swallows connections costs one timeout, not one per row.
    failing: set[str] = set()
    for delivery_id, url in due:
        if time.monotonic() > stop_at:
            break
        if url in failing:
            continue
        claimed = _claim(delivery_id, now, settings)
        if claimed is None:
            continue  # delivered or taken by another deliverer meanwhile
        error = _post(claimed, settings)
        outcome = _settle(claimed, error, now)
        if error is not None:
            failing.add(url)
            log.warning(
                "webhook %s to %s, attempt %d: %s",
                claimed.id,
                receiver(claimed.url),
                claimed.attempt,
                error,
            )
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


@dataclass(frozen=True)
class OutboxState:
    """What ``doctor`` reports of the outbox."""

    waiting: int  # not delivered yet, still tried
    failing: int  # of those, at least one attempt failed
    given_up: int
    last_error: str | None


def outbox_state(db: Session) -> OutboxState:
    undelivered = WebhookDelivery.delivered_at.is_(None)
    counts = db.execute(
        select(
            func.count().filter(WebhookDelivery.next_attempt_at.is_not(None)),
            func.count().filter(
                WebhookDelivery.next_attempt_at.is_not(None),
                WebhookDelivery.last_error.is_not(None),
            ),
            func.count().filter(WebhookDelivery.next_attempt_at.is_(None)),
        ).where(undelivered)
    ).one()
    last_error = db.scalar(
        select(WebhookDelivery.last_error)
        .where(undelivered, WebhookDelivery.last_error.is_not(None))
        .order_by(WebhookDelivery.created_at.desc())
        .limit(1)
    )
    return OutboxState(counts[0], counts[1], counts[2], last_error)
