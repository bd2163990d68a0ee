"""The Celery application: ``celery -A scheduler worker|beat|flower``.

Configuration comes from ``celeryconfig`` (the environment). Planning tasks
live in :mod:`scheduler.tasks` and the job task in :mod:`workers_bridge.tasks`.
"""

from __future__ import annotations

from celery import Celery
from kombu import pools

import celeryconfig
from scheduler.config import Settings

app = Celery("scheduler", include=["scheduler.tasks", "workers_bridge.tasks"])
app.config_from_object(celeryconfig)


def _add_worker_steps() -> None:
    from workers_bridge.presence import Presence

    app.steps["worker"].add(Presence)


_add_worker_steps()


def configure(settings: Settings) -> Celery:
    """Point the app at the store and broker of ``settings`` (demo, tests)."""
    app.conf.update(celeryconfig.celery_settings(settings))
    # Connections made with the previous broker URL must not be reused;
    # kombu keeps its pools globally, per URL.
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    return app
