"""Typed SQLAlchemy models of the store (docs/architecture.md).

What was received (patients, studies, series, instances), what is loaded
(services, workers) and what was decided and run (sessions, jobs and their
dependencies). The schema is created by the Alembic migrations in
``scheduler/store/migrations``; never by ``create_all`` in production code.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from scheduler.clock import utcnow
from scheduler.vocabulary import (
    DEFAULT_CHANNEL,
    JobStatus,
    Phase,
    ResourceState,
    SessionStatus,
)

JSONType = JSON().with_variant(JSONB(), "postgresql")

# Resource detection states (docs/architecture.md).


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONType}


class ResourceMixin:
    """Counters and detection state kept by every level above instance."""

    tags: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16), default=ResourceState.RECEIVING)
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    # Fingerprint of the last revision that became stable; a new one bumps `revision`.
    stable_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    # The newest instance the fingerprint covers. Ingest locks a resource
    # before it adds instances to it, so the instances with an id up to this
    # one are exactly those the fingerprint was computed from.
    last_instance_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Patient(ResourceMixin, Base):
    __tablename__ = "patients"
    __table_args__ = (Index("ix_patients_detect", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(128), unique=True)


class Study(ResourceMixin, Base):
    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_detect", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)

    patient: Mapped[Patient] = relationship()


class Series(ResourceMixin, Base):
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_detect", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(128), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)

    study: Mapped[Study] = relationship()


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(128), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    tags: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # A filesystem path or a URI (orthanc://instances/<id>, file://, …).
    location: Mapped[str] = mapped_column(Text, default="")
    source_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship()


class Service(Base):
    __tablename__ = "services"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(Text, default="")
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    definition: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    loaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    channels: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SchedulingSession(Base):
    """One scheduling run for one candidate and one event."""

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint(
            "event", "level", "uid", "fingerprint", "trigger", name="uq_sessions_idempotency"
        ),
        Index("ix_sessions_status", "status"),
        Index("ix_sessions_uid", "uid"),
        Index("ix_sessions_cohort", "cohort"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event: Mapped[str] = mapped_column(String(128))
    level: Mapped[str] = mapped_column(String(16))
    uid: Mapped[str] = mapped_column(String(128))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    # The resource's last_instance_id when the session was created: its
    # headers hold the instances up to it, whatever arrived since.
    last_instance_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Empty for detection; a fresh id for every manual trigger.
    trigger: Mapped[str] = mapped_column(String(64), default="")
    headers: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    added_params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    trace: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=SessionStatus.PLANNING)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    planned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Urgent sessions' jobs go ahead of every normal job of their channel and
    # ignore off-peak windows (README, "Urgent studies first").
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    # The cohort run that opened the session, if any (README, "Cohort runs").
    cohort: Mapped[str | None] = mapped_column(String(128), nullable=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="session", order_by="Job.created_seq")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("session_id", "job_name", name="uq_jobs_session_job_name"),
        Index("ix_jobs_ready", "status", "pending_deps"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    created_seq: Mapped[int] = mapped_column(Integer, default=0)
    job_name: Mapped[str] = mapped_column(String(128))
    service: Mapped[str] = mapped_column(String(128))
    # The service's version and content hash when the job was planned.
    service_version: Mapped[str] = mapped_column(String(64), default="")
    service_hash: Mapped[str] = mapped_column(String(64), default="")
    phase: Mapped[str] = mapped_column(String(8), default=Phase.MAIN)
    worker_entry: Mapped[str] = mapped_column(String(255))
    # Folder the entry is imported from, and an optional separate interpreter.
    entry_root: Mapped[str] = mapped_column(Text, default="")
    python: Mapped[str | None] = mapped_column(Text, nullable=True)
    channel: Mapped[str] = mapped_column(String(128), default=DEFAULT_CHANNEL)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    added_params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    sort_position: Mapped[float] = mapped_column(Float, default=999)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    timeout_s: Mapped[float] = mapped_column(Float, default=3600)
    retry_delay_s: Mapped[float] = mapped_column(Float, default=30)
    result: Mapped[Any | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # One entry per ended attempt: status, error, worker, times (retry keeps history).
    attempt_log: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Process that runs the attempt on `worker`: a redelivered message can
    # tell a dead local attempt from a live one at once.
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pending_deps: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Earliest time the job may run (retry back-off).
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # "HH:MM-HH:MM": the job is sent only while this off-peak window is open.
    window: Mapped[str | None] = mapped_column(String(16), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    session: Mapped[SchedulingSession] = relationship(back_populates="jobs")


class JobDependency(Base):
    """Edge job → depends_on. ``requires_success`` is false only for the
    implicit edges of post jobs, which wait for an end, not a success."""

    __tablename__ = "job_dependencies"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    depends_on_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True, index=True)
    requires_success: Mapped[bool] = mapped_column(Boolean, default=True)


class Lease(Base):
    """A named lock with an expiry, so that runs of one task never overlap
    and a crashed holder does not block forever."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Cursor(Base):
    """Where a source stopped reading (e.g. the last Orthanc change ``Seq``),
    saved in the same transaction as what it recorded."""

    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One notification owed to one webhook URL (README, "Notifications"),
    written in the transaction that gave its session a final status.
    ``sequence`` counts the session's notifications, so a session retried
    and ended again is notified again, while one ending is queued once."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        UniqueConstraint("session_id", "event", "sequence", "url", name="uq_webhook_outbox_once"),
        Index("ix_webhook_outbox_due", "delivered_at", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    # The exact bytes sent (signed), frozen at the first attempt so every
    # retry sends the same document.
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When it may be tried next; NULL once delivered or given up.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Cohort(Base):
    """A named run of one event over the stored studies (series, patients)
    that match its criteria, opened at a limited rate."""

    __tablename__ = "cohorts"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    event: Mapped[str] = mapped_column(String(128))
    level: Mapped[str] = mapped_column(String(16))
    # The --where, --since, --until and --limit it was started with.
    criteria: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # Sessions opened per minute at most; None: as fast as planning allows.
    rate_per_min: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Candidates matched when it started, and sessions opened so far.
    total: Mapped[int] = mapped_column(Integer, default=0)
    opened: Mapped[int] = mapped_column(Integer, default=0)
    # How far opening went: the row id of the last candidate examined, and
    # the highest one when it started (data recorded later is not in it).
    position: Mapped[int] = mapped_column(Integer, default=0)
    up_to: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="opening")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PausedChannel(Base):
    """A channel an operator paused: its jobs stay queued, unsent, until resumed."""

    __tablename__ = "paused_channels"

    channel: Mapped[str] = mapped_column(String(128), primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class MetricCarry(Base):
    """What ``prune`` deleted, as the counter and histogram samples of
    ``/metrics`` it made, so those never go down (README, "Metrics")."""

    __tablename__ = "metric_carry"

    # The exposed sample, e.g. ``dcm_jobs_finished_total``.
    sample: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Its labels as JSON, keys sorted.
    labels: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[float] = mapped_column(Float, default=0.0)
