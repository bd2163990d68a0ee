"""Helpers shared by the tests: pointing the whole process at a store and broker."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from kombu import Connection

from scheduler import testing
from scheduler.config import Settings

PG_ADMIN_URL = os.environ.get("DCM_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _redis_url() -> str:
    """One Redis database per test process, so two test runs on one machine
    (a developer's and CI's) and the parallel workers of one run (pytest-xdist
    names them gw0, gw1, …) never flush each other's queues."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw-1")[2:])
    given = os.environ.get("DCM_TEST_REDIS") or None
    if given is None:
        run = os.getppid() if worker >= 0 else os.getpid()
        return f"redis://127.0.0.1:6379/{1 + (run + max(worker, 0)) % 15}"
    if worker < 0:
        return given
    base, _, database = given.rpartition("/")
    return f"{base}/{(int(database or 0) + worker) % 16}"


REDIS_URL = _redis_url()
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
    return testing.create_database(PG_ADMIN_URL, name)


def drop_database(name: str) -> None:
    testing.drop_database(PG_ADMIN_URL, name)


def write_json(path: Path, data: Any) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


@contextmanager
def worker_in_process(values: dict[str, str], concurrency: int = 4) -> Iterator[Settings]:
    """The environment ``values`` plus a real Celery worker (threads pool) in
    this process, consuming the planning queue and the default channel."""
    with (
        testing.using_environment(values) as settings,
        testing.embedded_worker(concurrency=concurrency),
    ):
        yield settings


# Service code whose exception hides what it is: a metaclass whose __name__
# raises, and a message of a str subclass that raises when formatted.
DISGUISED_EXCEPTION = """
class Text(str):
    def __format__(self, spec):
        raise ValueError("no format")


class Named(type):
    @property
    def __name__(cls):
        raise ValueError("no name")


class Disguised(Exception, metaclass=Named):
    def __str__(self):
        return Text("formats badly")
"""

# Service values that raise when read: a repr, a dict's items().
ODD_OBJECTS = """
class Unrepresentable:
    def __repr__(self):
        raise ValueError("no repr")


class Unreadable(dict):
    def items(self):
        raise KeyError("no items")
"""
