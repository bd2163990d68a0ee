"""kombu's Redis transport, with one synchronous Redis client per channel.

kombu builds a new ``redis.Redis`` client for each publish, and for each
delivery and acknowledgement of a message acknowledged late (its
``conn_or_acquire``), and redis-py builds every client's table of command
callbacks anew: about a third of the time a worker spends publishing a
message went there. A client only borrows connections from its pool, so
one client per channel and pool serves every call; the blocking client
that waits for messages is kombu's own, as before.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis


class Channel(redis.Channel):
    _shared: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        shared = self._shared
        # kombu drops its pools after a connection error: a client of the new one then.
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared = super()._create_client()
        return shared


class Transport(redis.Transport):
    Channel = Channel
