"""Recording a load in the store's ``services`` table.

A planner records each load of the registry once, before it plans with it:
the table shows which services (version, content hash, definition) the
planners use, and which are broken or gone; every job row keeps the version
and hash of the service it was planned with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler.clock import utcnow
from scheduler.config import get_settings
from scheduler.registry.definitions import Registry, ServiceDefinition
from scheduler.store.db import transaction
from scheduler.store.models import Service


def sync_services(db: Session, registry: Registry) -> None:
    """Record a load in ``services``: loaded services enabled, broken ones
    disabled with their problems, services no longer found disabled."""
    now = utcnow()
    rows = {row.name: row for row in db.scalars(select(Service))}

    def upsert(service: ServiceDefinition, error: str | None) -> None:
        row = rows.get(service.name)
        if row is None:
            row = rows[service.name] = Service(name=service.name)
            db.add(row)
        row.version = service.version
        row.source = str(service.source) if service.source != Path() else ""
        row.content_hash = service.content_hash
        definition: Any = service.definition if service.definition is not None else {}
        row.definition = definition
        row.enabled = error is None
        row.error = error
        row.loaded_at = now

    seen: set[str] = set()
    for service in registry.services:
        upsert(service, None)
        seen.add(service.name)
    for name, problems in registry.broken.items():
        if name in seen:
            continue  # a duplicate name: the service that loaded owns the row
        service = registry.rejected.get(name) or ServiceDefinition(
            name, "", Path(), "", None, False
        )
        upsert(service, "\n".join(str(problem) for problem in problems))
        seen.add(name)
    for name, row in rows.items():
        if name not in seen:
            row.enabled = False
            row.error = "no longer found on the services path"
    db.flush()


def record_load(registry: Registry) -> None:
    """Record ``registry`` in the store once per load."""
    store = get_settings().database_url
    if store in registry.recorded_in:
        return
    try:
        with transaction() as db:
            sync_services(db, registry)
    except IntegrityError:
        # Another planner inserted the same new service a moment ago: the
        # second pass finds its row and updates it.
        with transaction() as db:
            sync_services(db, registry)
    registry.recorded_in.add(store)
