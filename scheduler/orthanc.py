"""The Orthanc source (README, "Following Orthanc"): follow Orthanc's ``/changes`` feed.

Each run reads the changes after the last ``Seq`` saved in the store, records
every new instance with its main tags and Orthanc id, and saves the new
``Seq`` in the same transaction as the instances: a restart resumes exactly
where the last committed batch ended, without gaps or duplicates. When
Orthanc is down the run logs it and returns; beat tries again next time.

An instance's location is the URL of its file in Orthanc
(``<DCM_ORTHANC_URL>/instances/<id>/file``, never with credentials), so any
worker that can reach Orthanc can read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.orm import Session

from scheduler.config import Settings, get_settings
from scheduler.dicom import NotDicomError
from scheduler.ingest import record_instances
from scheduler.leases import lease
from scheduler.store.db import insert_for, transaction
from scheduler.store.models import Cursor, utcnow

log = logging.getLogger(__name__)

BATCH = 100
TIMEOUT = 10.0


@dataclass
class FollowReport:
    recorded: int = 0
    known: int = 0
    rejected: list[str] = field(default_factory=list)
    seq: int = 0
    error: str | None = None


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without user:password, and those credentials if any."""
    parsed = httpx.URL(url)
    auth = None
    if parsed.username:
        auth = (parsed.username, parsed.password or "")
    clean = str(parsed.copy_with(username=None, password=None)).rstrip("/")
    return clean, auth


def cursor_name(base_url: str) -> str:
    return f"orthanc:{base_url}"


def read_cursor(db: Session, name: str) -> int:
    row = db.get(Cursor, name)
    return int(row.value) if row and row.value else 0


def save_cursor(db: Session, name: str, seq: int) -> None:
    insert = insert_for(db)
    now = utcnow()
    db.execute(
        insert(Cursor)
        .values(name=name, value=str(seq), updated_at=now)
        .on_conflict_do_update(index_elements=["name"], set_={"value": str(seq), "updated_at": now})
    )


def instance_item(client: httpx.Client, base: str, orthanc_id: str) -> dict[str, Any]:
    response = client.get(f"{base}/instances/{orthanc_id}/simplified-tags")
    response.raise_for_status()
    tags = {k: v for k, v in response.json().items() if not isinstance(v, list | dict)}
    return {
        **tags,
        "location": f"{base}/instances/{orthanc_id}/file",
        "source_id": orthanc_id,
    }


def follow_changes(
    settings: Settings | None = None, *, client: httpx.Client | None = None, max_batches: int = 50
) -> FollowReport:
    """Record the instances Orthanc received since the last saved ``Seq``."""
    settings = settings or get_settings()
    if not settings.orthanc_url:
        return FollowReport(error="DCM_ORTHANC_URL is not set")
    base, auth = split_credentials(settings.orthanc_url)
    name = cursor_name(base)
    with lease(name, ttl=300) as held:
        if not held:  # another beat is following this Orthanc right now
            return FollowReport(error="another run is following this Orthanc")
        return _follow(base, auth, name, client, max_batches)


def _follow(
    base: str,
    auth: tuple[str, str] | None,
    name: str,
    client: httpx.Client | None,
    max_batches: int,
) -> FollowReport:
    report = FollowReport()
    own_client = client is None
    client = client or httpx.Client(auth=auth, timeout=TIMEOUT)
    try:
        with transaction() as db:
            report.seq = read_cursor(db, name)
        for _ in range(max_batches):
            response = client.get(f"{base}/changes", params={"since": report.seq, "limit": BATCH})
            response.raise_for_status()
            feed = response.json()
            items: list[dict[str, Any]] = []
            for change in feed.get("Changes", []):
                if change.get("ChangeType") != "NewInstance":
                    continue
                try:
                    items.append(instance_item(client, base, change["ID"]))
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 404:
                        raise
                    # Deleted from Orthanc before we read it: skip, never stall.
                    report.rejected.append(f"{base}/instances/{change['ID']}: gone (404)")
            last = int(feed.get("Last", report.seq))
            with transaction() as db:
                result = record_instances(db, items)
                save_cursor(db, name, last)
            report.recorded += result.recorded
            report.known += result.known
            report.rejected += [f"{r.location}: {r.reason}" for r in result.rejected]
            report.seq = last
            if feed.get("Done", True):
                break
    except (httpx.HTTPError, ValueError, KeyError, NotDicomError) as exc:
        report.error = f"Orthanc at {base} unavailable or answering badly: {exc}"
        log.warning("%s; will try again at the next run", report.error)
    finally:
        if own_client:
            client.close()
    return report
