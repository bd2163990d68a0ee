"""The webhook outbox: what is owed to receivers when a session ends.

Every transition that gives a session its final status (the last job's
ending in :mod:`scheduler.jobstate`, a cancel, a plan with no job in
:mod:`scheduler.emission`, a planning failure in :mod:`scheduler.sessions`)
calls :func:`queue_session_event` in its own transaction, so the rows are
committed with the status or not at all. One row per configured URL, keyed
by session, event and the session's notification count: one ending is
queued once, and a session retried and ended again is notified again.
Without ``DCM_WEBHOOK_URLS`` nothing is read or written. After the commit
:func:`announce` sends ``scheduler.deliver_webhooks``; beat sends it too, so
a lost message only delays a delivery (README, "Notifications").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import exists, func, select

from scheduler.config import Settings, get_settings
from scheduler.store.db import Executor, insert_for
from scheduler.store.models import Job, WebhookDelivery, new_id

log = logging.getLogger(__name__)

DELIVER = "scheduler.deliver_webhooks"


def event_of(status: str) -> str:
    """The webhook event of a session's final status."""
    return f"session.{status}"


def wanted(statuses: Iterable[str], settings: Settings | None = None) -> bool:
    """Whether a session ending with one of ``statuses`` may owe webhooks
    (``DCM_WEBHOOK_URLS`` set, and the event among ``DCM_WEBHOOK_EVENTS``)."""
    settings = settings or get_settings()
    return bool(settings.webhook_urls) and any(
        event_of(status) in settings.webhook_events for status in statuses
    )


def queue_session_event(
    db: Executor,
    session_id: str,
    status: str,
    now: datetime,
    settings: Settings | None = None,
) -> int:
    """Queue the notification of the session's ending with ``status``, in
    the caller's transaction (the session row locked or just claimed);
    returns how many rows were written."""
    settings = settings or get_settings()
    if not wanted((status,), settings):
        return 0
    event = event_of(status)
    if settings.webhook_services and not db.scalar(
        select(
            exists().where(
                Job.session_id == session_id, Job.service.in_(sorted(settings.webhook_services))
            )
        )
    ):
        return 0
    sequence = 1 + (
        db.scalar(
            select(func.max(WebhookDelivery.sequence)).where(
                WebhookDelivery.session_id == session_id
            )
        )
        or 0
    )
    rows = [
        {
            "id": new_id(),
            "session_id": session_id,
            "event": event,
            "sequence": sequence,
            "url": url,
            "created_at": now,
            "attempts": 0,
            "next_attempt_at": now,
        }
        for url in settings.webhook_urls
    ]
    db.execute(insert_for(db)(WebhookDelivery).on_conflict_do_nothing(), rows)
    return len(rows)


def announce(settings: Settings | None = None) -> bool:
    """Ask a planning worker to deliver what is due, after the commit that
    queued it; a failure to send is logged (beat's sweep delivers it)."""
    settings = settings or get_settings()
    if not settings.webhook_urls:
        return False
    from scheduler.messages import RETRY_POLICY, app, broker_priority

    try:
        # Behind every plan on the planning queue, like a cohort run's messages.
        app().signature(DELIVER).apply_async(
            retry=True, retry_policy=RETRY_POLICY, priority=broker_priority(cohort=True)
        )
    except Exception as exc:  # noqa: BLE001 - the outbox rows say what is owed
        log.warning("broker unavailable, webhook delivery left for beat's sweep: %s", exc)
        return False
    return True
