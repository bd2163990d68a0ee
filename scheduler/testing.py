"""Running the scheduler inside one process, to test it or to measure it.

In the spirit of ``celery.contrib.testing``: the project's tests, its
benchmarks (``bench/``) and the demo use these helpers, and so can anyone
testing their own services against the scheduler.

- Settings: :func:`environment_values` (a complete set of ``DCM_*``
  settings for a folder, a store and a broker), :func:`use_environment` and
  :func:`using_environment` (apply them to this process, caches included).
- Stores: :func:`create_database` / :func:`drop_database` (throwaway
  PostgreSQL databases).
- Services: :func:`write_service` (a definition file) and
  :func:`noop_service` (a service whose worker and callback do nothing).
- Data and outcomes: :func:`record_study`, :func:`detect_and_send`,
  :func:`wait_until`, :func:`session_doc`, :func:`wait_session`.
- Workers: :func:`embedded_worker` (a Celery worker in a thread of this
  process), :func:`celery_command`, :func:`free_port`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from scheduler.config import Settings, get_settings, reset_settings
from scheduler.vocabulary import DEFAULT_CHANNEL, PLANNING_QUEUE, SESSION_FINAL_STATUSES

T = TypeVar("T")

# --------------------------------------------------------------------------
# Settings


def environment_values(folder: Path, database_url: str, broker_url: str = "") -> dict[str, str]:
    """Every setting of a scheduler living in ``folder``: no header fields,
    legacy settings file or retention, study-level detection, a 60 s stable age.
    An empty ``broker_url`` is the embedded filesystem broker."""
    return {
        "DCM_HOME": str(folder / "home"),
        "DCM_DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "DCM_SERVICES_PATH": str(folder / "services"),
        "DCM_OUTPUT_DIR": str(folder / "outputs"),
        "DCM_STABLE_AGE": "60",
        "DCM_DETECT_INTERVAL": "5",
        "DCM_DETECT_LEVELS": "study",
        "DCM_DEFAULT_EVENTS": "study.stable",
        "DCM_HEADER_FIELDS": "",
        "DCM_SETTINGS": "",
        "DCM_CALLBACK_TIMEOUT": "5",
        "DCM_HEARTBEAT_INTERVAL": "10",
        "DCM_RETENTION": "",  # no pruning on beat unless a test asks for it
    }


def use_environment(values: dict[str, str]) -> Settings:
    """Apply settings to this process: environment, store engines, Celery app."""
    from scheduler.celery_app import configure
    from scheduler.registry import forget_registry
    from scheduler.store.db import dispose_engines

    os.environ.update(values)
    reset_settings()
    dispose_engines()
    forget_registry()
    settings = get_settings()
    configure(settings)
    return settings


@contextmanager
def using_environment(values: dict[str, str]) -> Iterator[Settings]:
    """:func:`use_environment` for a block; the previous values come back after."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        yield use_environment(values)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        use_environment({})


# --------------------------------------------------------------------------
# Stores


def postgres_url(admin_url: str, name: str) -> str:
    """The SQLAlchemy URL of database ``name`` on ``admin_url``'s server."""
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def create_database(admin_url: str, name: str) -> str:
    """A new, empty PostgreSQL database (dropped first if left over)."""
    drop_database(admin_url, name)
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------
# Services


def write_service(
    services: Path, jobs: list[dict[str, Any]], name: str, version: str = "1"
) -> Path:
    """Write the definition of service ``name`` in ``services/<name>`` (the
    folder is created) and make this process load the services again."""
    from scheduler.registry import forget_registry

    folder = services / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dcm-processor.json"
    path.write_text(json.dumps({"name": name, "version": version, "jobs": jobs}, indent=2))
    forget_registry()
    return path


NOOP_MODULE = "noopjobs"
NOOP = f"{NOOP_MODULE}:noop"  # a worker entry that returns nothing
ACCEPT = f"{NOOP_MODULE}:accept"  # a registry callback that schedules its job
_NOOP_SOURCE = '''"""Entries that do nothing, to measure the scheduler alone."""


def noop(*args, **kwargs):
    return None


def accept(*args, **kwargs):
    return True
'''


def noop_service(services: Path, jobs: list[dict[str, Any]], name: str = "noop") -> Path:
    """A service ``name`` whose package ``noopjobs`` holds :data:`NOOP` and
    :data:`ACCEPT`; ``jobs`` may use them."""
    package = services / name / NOOP_MODULE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(_NOOP_SOURCE)
    return write_service(services, jobs, name)


# --------------------------------------------------------------------------
# Data and outcomes


def record_study(
    study_uid: str,
    instances: int = 2,
    *,
    patient: str = "P1",
    now: datetime | None = None,
    series_uid: str | None = None,
    series: int = 1,
    first: int = 1,
    tags: dict[str, Any] | None = None,
) -> None:
    """Record ``instances`` CT instances of one study, numbered from
    ``first``: in ``series_uid``, or spread over ``series`` series; ``tags``
    are added to (or replace) those of every instance."""
    from scheduler.ingest import record_instances
    from scheduler.store.db import transaction

    items = []
    for n in range(first, first + instances):
        in_series = series_uid or f"{study_uid}.{n % series + 1}"
        items.append(
            {
                "PatientID": patient,
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": in_series,
                "SOPInstanceUID": f"{in_series}.{n}",
                "Modality": "CT",
                "location": f"/data/{in_series}/{n}.dcm",
            }
            | (tags or {})
        )
    with transaction() as db:
        record_instances(db, items, now=now)


def wait_until(
    check: Callable[[], T | None],
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll until ``check`` returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def detect_and_send() -> list[str]:
    """One detection pass; its sessions are sent to the planners."""
    from scheduler import detection, messages

    run = detection.detect()
    messages.send_plans(run.sessions)
    return run.sessions


def session_doc(session_id: str) -> dict[str, Any]:
    """The session as ``show --json`` prints it."""
    from scheduler import queries
    from scheduler.store.db import transaction

    with transaction() as db:
        return queries.show_session(db, session_id)


def wait_session(session_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The session once it has ended; on a timeout the error tells each
    job's status and what the broker holds."""

    def ended() -> dict[str, Any] | None:
        doc = session_doc(session_id)
        return doc if doc["status"] in SESSION_FINAL_STATUSES else None

    try:
        return wait_until(ended, timeout, f"session {session_id} to end")
    except AssertionError as exc:
        doc = session_doc(session_id)
        jobs = {j["job_name"]: (j["status"], j["error"]) for j in doc["jobs"]}
        raise AssertionError(
            f"{exc}: status {doc['status']}, jobs {jobs}; broker: {broker_state()}"
        ) from None


def broker_state() -> dict[str, Any]:
    """Key → length of what a Redis broker holds (diagnostics only)."""
    from scheduler.celery_app import app

    state: dict[str, Any] = {}
    try:
        with app.connection_for_read() as conn:
            client = conn.default_channel.client
            for key in client.keys("*"):
                kind = client.type(key).decode()
                size = (
                    client.llen(key)
                    if kind == "list"
                    else client.hlen(key)
                    if kind == "hash"
                    else kind
                )
                state[key.decode()] = size
    except Exception as error:  # noqa: BLE001 - diagnostics only, on any broker
        state["error"] = repr(error)
    return state


# --------------------------------------------------------------------------
# Workers


@contextmanager
def embedded_worker(
    queues: Sequence[str] = (PLANNING_QUEUE, DEFAULT_CHANNEL), concurrency: int = 2
) -> Iterator[Any]:
    """A Celery worker (threads pool) in this process, consuming ``queues``."""
    from celery.contrib.testing.worker import start_worker

    from scheduler.celery_app import app

    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=False,
        queues=list(queues),
        loglevel="WARNING",
        shutdown_timeout=60,
    ) as worker:
        yield worker


def celery_command(*args: str) -> list[str]:
    """``celery -A scheduler <args>`` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "scheduler", *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
