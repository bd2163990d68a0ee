"""The Redis transport builds one client per channel, and still delivers."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from kombu import Connection

import celeryconfig
from scheduler.config import load_settings
from scheduler.redis_broker import Transport


def test_redis_urls_get_the_project_s_transport_and_other_brokers_their_own() -> None:
    def transport(url: str) -> str | None:
        return celeryconfig.transport_class(load_settings({"CELERY_BROKER_URL": url}))

    assert transport("redis://127.0.0.1:6379/0") == "scheduler.redis_broker:Transport"
    assert transport("rediss://cache.example:6380/1") == "scheduler.redis_broker:Transport"
    assert transport("amqp://guest:guest@127.0.0.1:5672//") is None
    assert transport("redis+socket:///run/redis.sock") is None
    assert transport("filesystem://") == "scheduler.broker:Transport"


def test_messages_published_and_acknowledged_share_one_client_per_channel(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    original = redis.Redis.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    with Connection(redis_url, transport=Transport) as connection:
        queue = connection.SimpleQueue("dcm-test-redis-broker")
        for n in range(6):
            queue.put({"n": n})
        received = []
        for _ in range(6):
            message = queue.get(timeout=5)
            received.append(message.payload["n"])
            message.ack()
        channel = queue.channel
        # A lost connection drops kombu's pools: the next calls use the new one.
        channel._disconnect_pools()
        queue.put({"n": 6})
        message = queue.get(timeout=5)
        received.append(message.payload["n"])
        message.ack()
        queue.close()
    assert received == list(range(7))
    # Each of the two pools' synchronous clients, and kombu's blocking ones for
    # receiving: not one per publish, delivery and acknowledgement.
    assert len(built) <= 6, len(built)
