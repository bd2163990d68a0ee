"""Fixtures: stores on SQLite and PostgreSQL, Redis and RabbitMQ brokers, an
environment per test.

Server-backed fixtures skip with a reason when the server is absent on a
developer machine, and fail under CI (``CI=true``), where ``.ci/run``
starts PostgreSQL, Redis and RabbitMQ: a test that needs a server must run there.
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
from scheduler.testing import environment_values, using_environment, write_service
from tests.support import (
    RABBITMQ_VHOST,
    REDIS_URL,
    create_database,
    create_vhost,
    delete_vhost,
    drop_database,
    postgres_available,
    purge_queues,
    rabbitmq_available,
    redis_available,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
TABLES = (
    "job_dependencies, jobs, sessions, instances, series, studies, patients, "
    "services, workers, leases, cursors, cohorts, paused_channels"
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


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    """A virtual host of this test process on the machine's RabbitMQ."""
    require(rabbitmq_available(), "RabbitMQ at 127.0.0.1:5672 (managed by rabbitmqctl)")
    url = create_vhost(RABBITMQ_VHOST)
    yield url
    delete_vhost(RABBITMQ_VHOST)


@pytest.fixture
def rabbitmq_url(rabbitmq_vhost: str) -> str:
    """RabbitMQ with no message left by an earlier test in the scheduler's
    queues and the `gpu` channel of the tests."""
    purge_queues(rabbitmq_vhost, ["dcm.planning", "default", "gpu"])
    return rabbitmq_vhost


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each production broker in turn."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def env(tmp_path: Path, store_url: str) -> Iterator[Settings]:
    """This process pointed at a fresh store (each backend) and a filesystem broker."""
    with using_environment(environment_values(tmp_path, store_url)) as settings:
        yield settings


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def services_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry root with the ``testjobs`` service; tests rewrite its definition.

    The folder stays the same for the whole run, so its Python package is
    imported from one place only, as in a long-running worker.
    """
    import shutil

    root = tmp_path_factory.mktemp("services")
    shutil.copytree(FIXTURES / "dcm_testjobs", root / "testjobs" / "dcm_testjobs")
    return root


class Define:
    """``define([{jobName: …}, …])`` writes the testjobs service definition."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, jobs: list[dict], name: str = "testjobs") -> Path:
        return write_service(self.root, jobs, name)


@pytest.fixture
def define(services_root: Path) -> Iterator[Define]:
    definer = Define(services_root)
    yield definer
    for child in services_root.iterdir():
        definition = child / "dcm-processor.json"
        if definition.exists():
            definition.unlink()


@pytest.fixture
def live(tmp_path: Path, pg_url: str, redis_url: str, services_root: Path) -> Iterator[Settings]:
    """PostgreSQL + Redis + a real Celery worker (threads pool) in this process."""
    from tests.support import worker_in_process

    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
        "DCM_HEARTBEAT_INTERVAL": "1",
    }
    with worker_in_process(values) as settings:
        yield settings
