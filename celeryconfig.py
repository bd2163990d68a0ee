"""Celery settings of the scheduler (README, "Configuration"), all derived from the environment.

``celery -A scheduler …`` loads this module through ``scheduler.app``. The
values come from :func:`scheduler.config.get_settings`; :func:`celery_settings`
builds the same mapping for any :class:`~scheduler.config.Settings`, which
the demo and the tests use to point one app at another store or broker.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from kombu import Exchange, Queue

from scheduler.config import Settings, get_settings
from scheduler.vocabulary import DEFAULT_CHANNEL, PLANNING_QUEUE

AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")
# RabbitMQ orders messages by priority only in a queue declared with
# x-max-priority; our priorities (0-9) are sent unchanged on AMQP, where the
# highest runs first. The value is part of each queue's declaration: a queue
# that exists with other arguments is refused by RabbitMQ (PRECONDITION_FAILED).
AMQP_MAX_PRIORITY = 10
# Messages sent without a priority (planning tasks, a hand-sent run_job) get
# the default job priority instead of the lowest.
AMQP_DEFAULT_PRIORITY = 5


def uses_amqp(settings: Settings) -> bool:
    """True when the broker is RabbitMQ (or another AMQP 0-9-1 server)."""
    return settings.broker_url.startswith(AMQP_SCHEMES)


def transport_class(settings: Settings) -> str | None:
    """The kombu transport, where the project has its own: the filesystem
    broker creating its folders when first used (``scheduler.broker``), and
    Redis with a client per channel (``scheduler.redis_broker``)."""
    if settings.uses_filesystem_broker:
        return "scheduler.broker:Transport"
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return "scheduler.redis_broker:Transport"
    return None


def transport_options(settings: Settings) -> dict[str, Any]:
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    if settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return {
            # Longer than the longest job timeout: a message in flight is not
            # handed to a second worker while the first still runs it.
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for expired unacknowledged messages at a pace that fits
            # the timeout (kombu's default sweep is every ~100 s).
            "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout // 4))),
            "unacked_restore_throttle": 1 if settings.visibility_timeout < 600 else 10,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        }
    # RabbitMQ's counterpart of the visibility timeout is its consumer_timeout,
    # set on the server (README, "Run in production").
    return {}


def channel_queue(name: str, max_priority: int | None = None) -> Queue:
    arguments = {"x-max-priority": max_priority} if max_priority is not None else None
    return Queue(name, Exchange(name), routing_key=name, queue_arguments=arguments)


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration mapping for ``settings``."""
    beat_schedule: dict[str, Any] = {
        "dcm-detect": {
            "task": "scheduler.detect",
            "schedule": timedelta(seconds=settings.detect_interval),
            # Generous expiry: behind a planning backlog the run is late, not lost.
            "options": {"queue": PLANNING_QUEUE, "expires": max(settings.detect_interval * 10, 60)},
        },
        "dcm-resend": {
            "task": "scheduler.resend",
            "schedule": timedelta(seconds=max(settings.detect_interval, 5.0)),
            "options": {"queue": PLANNING_QUEUE, "expires": max(settings.detect_interval * 10, 60)},
        },
    }
    # Cohort runs open their sessions on beat, each tick what their rate
    # allows since the last; one short read when none runs.
    beat_schedule["dcm-cohorts"] = {
        "task": "scheduler.open_cohorts",
        "schedule": timedelta(seconds=settings.detect_interval),
        "options": {"queue": PLANNING_QUEUE, "expires": max(settings.detect_interval * 10, 60)},
    }
    if settings.webhook_urls:
        # Delivers what a lost message left in the outbox, and the retries.
        beat_schedule["dcm-webhooks"] = {
            "task": "scheduler.deliver_webhooks",
            "schedule": timedelta(seconds=max(settings.detect_interval, 5.0)),
            "options": {
                "queue": PLANNING_QUEUE,
                "expires": max(settings.detect_interval * 10, 60),
                # The lowest, behind every plan (Redis runs the lowest number first).
                "priority": 0 if uses_amqp(settings) else 9,
            },
        }
    if settings.retention is not None:
        # Hourly: each run has an hour of endings to prune, a few short batches.
        beat_schedule["dcm-prune"] = {
            "task": "scheduler.prune",
            "schedule": timedelta(hours=1),
            "options": {"queue": PLANNING_QUEUE, "expires": 3600},
        }
    if settings.orthanc_url:
        beat_schedule["dcm-orthanc"] = {
            "task": "scheduler.follow_orthanc",
            "schedule": timedelta(seconds=settings.detect_interval),
            "options": {"queue": PLANNING_QUEUE, "expires": max(settings.detect_interval * 10, 60)},
        }
    # On AMQP every queue is a priority queue: the configured ones here, and
    # through task_queue_max_priority the ones Celery creates for a channel
    # such as `gpu` (task_create_missing_queues, `worker -Q gpu`). Redis and
    # the filesystem broker take priorities from the message alone.
    max_priority = AMQP_MAX_PRIORITY if uses_amqp(settings) else None
    broker_url = settings.broker_url
    if broker_url == "filesystem://":
        broker_url = "filesystem://localhost//"  # kombu warns about a missing host otherwise
    return {
        "broker_url": broker_url,
        "broker_transport": transport_class(settings),
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "result_backend": settings.result_backend,
        "task_ignore_result": True,
        # JSON only: a pickled message is refused by every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Task events cost a publish each (a third of a no-op job's time on a
        # prefork worker): off until someone watches. Flower turns them on in
        # every worker while it runs (its --enable_events, the default).
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "task_default_queue": DEFAULT_CHANNEL,
        # Each queue on its own exchange and key, like the ones Celery creates
        # for `-Q gpu`: a message for one queue is never copied to another.
        "task_queues": [
            channel_queue(PLANNING_QUEUE, max_priority),
            channel_queue(DEFAULT_CHANNEL, max_priority),
        ],
        "task_create_missing_queues": True,
        "task_queue_max_priority": max_priority,
        "task_default_priority": AMQP_DEFAULT_PRIORITY if max_priority else None,
        "task_routes": {"scheduler.*": {"queue": PLANNING_QUEUE}},
        "beat_schedule": beat_schedule,
        # Makes the schedule file's folder; tells the store that beat is alive.
        "beat_scheduler": "scheduler.beat:Scheduler",
        "beat_schedule_filename": str(settings.home / "celerybeat-schedule"),
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
    }


globals().update(celery_settings(get_settings()))
