"""kombu's Redis transport, with one command client per channel instead of one per publish.

kombu 5.7's Redis `Channel.conn_or_acquire` builds a new redis-py client for every command it sends
outside the consumer's poll: every task published, every task event (three per task while events are on),
every acknowledgement's pipeline. Building one copies redis-py's table of response callbacks, about
0.15 ms of CPU; with the Redis command itself at about the same cost, that doubled the broker's share of
each message (`bench/e2e.py`, measured side by side: see README, Performance). The client is only a
handle on the channel's connection pool, so one per channel is enough: it takes a pooled connection per
command, as the throw-away clients did, and is rebuilt whenever kombu replaces the pool (after a fork, a
lost connection, a closed channel).

`celeryconfig` selects this transport for `redis://` brokers (`transport_for`). The messages and keys are
kombu's own, so workers on this transport and on the stock one share queues without noticing each other.
"""
from __future__ import annotations

from contextlib import contextmanager

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        pool = self.pool
        if self._command_client is None or self._command_client.connection_pool is not pool:
            self._command_client = self._create_client()
        yield self._command_client


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """Celery's `broker_transport` for `broker_url`: this transport for `redis://`, else None (kombu picks by
    the URL's scheme). `rediss://` stays on kombu's own, which derives its TLS defaults from that name."""
    return f"{__name__}:Transport" if broker_url.startswith("redis://") else None
