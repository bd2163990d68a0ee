"""Helpers shared by the tests: pointing the whole process at a store and broker."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from kombu import Connection

from scheduler.config import Settings

PG_ADMIN_URL = os.environ.get("DCM_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
# One Redis database per test process, so two test runs on one machine
# (a developer's and CI's) never flush each other's queues.
REDIS_URL = os.environ.get("DCM_TEST_REDIS", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}")
# RabbitMQ on this machine, managed with `rabbitmqctl` (as root); each test
# process gets a virtual host of its own, for the same reason.
RABBITMQ_SERVER = os.environ.get("DCM_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
RABBITMQ_VHOST_PREFIX = "dcm-test-"
RABBITMQ_VHOST = f"{RABBITMQ_VHOST_PREFIX}{os.getpid()}"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "services"


def postgres_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def rabbitmq_available() -> bool:
    """RabbitMQ answers on AMQP and `rabbitmqctl` may manage it."""
    try:
        with Connection(f"{RABBITMQ_SERVER}//", connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        rabbitmqctl("list_vhosts", "--no-table-headers", "name")
    except Exception:  # noqa: BLE001 - whatever fails, the tests cannot use it
        return False
    return True


def create_vhost(name: str) -> str:
    """A fresh virtual host for the guest user; returns its broker URL.

    Virtual hosts left by test processes that died without cleaning up are
    deleted on the way."""
    for vhost in rabbitmqctl("list_vhosts", "--no-table-headers", "name").split():
        pid = vhost.removeprefix(RABBITMQ_VHOST_PREFIX)
        if vhost == name or (pid.isdigit() and not psutil.pid_exists(int(pid))):
            delete_vhost(vhost)
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"{RABBITMQ_SERVER}/{name}"


def delete_vhost(name: str) -> None:
    with contextlib.suppress(subprocess.CalledProcessError):
        rabbitmqctl("delete_vhost", name)


def rabbitmq_queues(vhost: str) -> dict[str, dict[str, Any]]:
    """name → declared arguments of each queue of ``vhost``."""
    import json

    listed = json.loads(
        rabbitmqctl("list_queues", "-p", vhost, "--formatter", "json", "name", "arguments")
    )
    # Each argument is listed as [name, AMQP type, value].
    return {
        queue["name"]: {name: value for name, _type, value in queue["arguments"]}
        for queue in listed
    }


def purge_queues(url: str, names: list[str]) -> None:
    """Drop the messages a previous test left in these queues of ``url``."""
    with Connection(url) as conn:
        for name in names:
            channel = conn.channel()
            with contextlib.suppress(Exception):  # a queue not declared yet
                channel.queue_purge(name)
            with contextlib.suppress(Exception):
                channel.close()


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def apply_environment(values: dict[str, str]) -> Settings:
    """Set DCM_* variables and make every cached piece follow them."""
    from scheduler.demo import use_environment

    return use_environment(values)


def environment(values: dict[str, str]) -> AbstractContextManager[Settings]:
    """The environment ``values`` for a block (see scheduler.demo.using_environment)."""
    from scheduler.demo import using_environment

    return using_environment(values)


def write_json(path: Path, data: Any) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


@contextmanager
def worker_in_process(values: dict[str, str], concurrency: int = 4) -> Iterator[Settings]:
    """The environment ``values`` plus a real Celery worker (threads pool) in
    this process, consuming the planning queue and the default channel."""
    from celery.contrib.testing.worker import start_worker

    from scheduler.celery_app import app

    with (
        environment(values) as settings,
        start_worker(
            app,
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            queues=["dcm.planning", "default"],
            loglevel="WARNING",
            shutdown_timeout=60,
        ),
    ):
        yield settings
