"""The Celery application: ``celery -A scheduler worker|beat|flower``.

Configuration comes from ``celeryconfig`` (the environment). Planning tasks
live in :mod:`scheduler.tasks` and the job task in :mod:`workers_bridge.tasks`.

Two things differ from a stock Celery app, both so that several workers on
one machine stay apart and none outlives its parent:

- a worker started without ``-n`` (or with Celery's default name) is named
  ``celery-<pid>@<host>``, not ``celery@<host>``: two workers on one host are two rows in
  ``dcm-scheduler workers`` and in Flower;
- a prefork pool process and an embedded beat (``-B``) die with the worker's
  main process, even when it is killed with SIGKILL (:mod:`scheduler.lifeline`).
"""

from __future__ import annotations

import os
import signal
import socket
from functools import cached_property
from typing import Any

from celery import Celery, signals
from celery.apps.worker import Worker as CeleryWorker
from celery.utils.nodenames import default_nodename
from kombu import pools

import celeryconfig
from scheduler.config import Settings
from scheduler.lifeline import die_with_parent


def unique_nodename() -> str:
    """The default node name of a worker process: unique per process."""
    return f"celery-{os.getpid()}@{socket.gethostname()}"


class Worker(CeleryWorker):
    """``celery worker``, named per process unless ``-n`` names it otherwise.

    Celery's command line turns a missing ``-n`` into ``celery@<host>``
    before the worker sees it, so that name stands for "not named".
    """

    def __init__(self, app: Any = None, hostname: str | None = None, **kwargs: Any) -> None:
        if not hostname or hostname == default_nodename(None):
            hostname = unique_nodename()
        super().__init__(app=app, hostname=hostname, **kwargs)


class SchedulerCelery(Celery):
    @cached_property
    def Worker(self) -> Any:  # noqa: N802 - Celery's name
        return self.subclass_with_self(Worker)


app = SchedulerCelery("scheduler", include=["scheduler.tasks", "workers_bridge.tasks"])
app.config_from_object(celeryconfig)

# The worker's main process; its forked children (pool processes, embedded
# beat) inherit the value and compare it with their parent.
_main_pid: int | None = None


@signals.worker_init.connect
def _remember_main_process(**_kwargs: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()


@signals.worker_process_init.connect
@signals.beat_embedded_init.connect
def _die_with_main_process(**_kwargs: Any) -> None:
    # Sent in the main process too by the solo pool and a threaded beat.
    if _main_pid is None or os.getpid() == _main_pid:
        return
    # Nothing to save in a pool process or beat whose worker is gone: the
    # store and the re-sender recover the jobs they were running.
    die_with_parent(signal.SIGKILL, _main_pid)


def configure(settings: Settings) -> Celery:
    """Point the app at the store and broker of ``settings`` (demo, tests)."""
    app.conf.update(celeryconfig.celery_settings(settings))
    # Connections made with the previous broker URL must not be reused;
    # kombu keeps its pools globally, per URL.
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    # Celery builds the queue declarations once per process, and its message
    # sender keeps the ones it found; another broker may need others
    # (priority queues on RabbitMQ). Its task-sent events' exchange is typed
    # for the broker too (fanout on Redis).
    for cached in ("queues", "default_queue", "router", "send_task_message", "_event_dispatcher"):
        app.amqp.__dict__.pop(cached, None)
    return app
