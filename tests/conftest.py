"""Fixtures: stores on SQLite and PostgreSQL, Redis, an environment per test.

Server-backed fixtures skip with a reason when the server is absent on a
developer machine, and fail under CI (``CI=true``), where ``.ci/run``
starts PostgreSQL and Redis: a test that needs a server must run there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from scheduler.config import Settings
from scheduler.store.db import dispose_engines, init_db
from tests.support import (
    REDIS_URL,
    create_database,
    drop_database,
    environment,
    postgres_available,
    redis_available,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
TABLES = (
    "job_dependencies, jobs, sessions, instances, series, studies, patients, "
    "services, workers, leases"
)


def require(available: bool, what: str) -> None:
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is not reachable, but CI must run this test")
    pytest.skip(f"{what} is not reachable on this machine")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    require(postgres_available(), "PostgreSQL at 127.0.0.1:5432")
    name = f"dcm_test_{uuid.uuid4().hex[:10]}"
    url = create_database(name)
    init_db(url)
    yield url
    dispose_engines()
    drop_database(name)


def truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty store on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        init_db(url)
        return url
    url: str = request.getfixturevalue("pg_database")
    truncate(url)
    return url


@pytest.fixture
def pg_url(pg_database: str) -> str:
    truncate(pg_database)
    return pg_database


@pytest.fixture
def redis_url() -> str:
    require(redis_available(), "Redis at 127.0.0.1:6379")
    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


def base_environment(tmp_path: Path, database_url: str, broker_url: str = "") -> dict[str, str]:
    return {
        "DCM_HOME": str(tmp_path / "home"),
        "DCM_DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "DCM_SERVICES_PATH": str(tmp_path / "services"),
        "DCM_OUTPUT_DIR": str(tmp_path / "outputs"),
        "DCM_STABLE_AGE": "60",
        "DCM_DETECT_LEVELS": "study",
        "DCM_DEFAULT_EVENTS": "study.stable",
        "DCM_HEADER_FIELDS": "",
        "DCM_SETTINGS": "",
        "DCM_CALLBACK_TIMEOUT": "5",
        "DCM_HEARTBEAT_INTERVAL": "10",
    }


@pytest.fixture
def env(tmp_path: Path, store_url: str) -> Iterator[Settings]:
    """This process pointed at a fresh store (each backend) and a filesystem broker."""
    with environment(base_environment(tmp_path, store_url)) as settings:
        yield settings
