"""Recording a load in the store's ``services`` table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.registry.definitions import Registry, ServiceDefinition
from scheduler.store.models import Service, utcnow


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
