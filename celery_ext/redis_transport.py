"""kombu's Redis transport, with one command client per channel and messages taken off a queue in batches.

kombu 5.7's Redis `Channel.conn_or_acquire` builds a new redis-py client for every command it sends
outside the consumer's poll: every task published, every task event (three per task while events are on),
every acknowledgement's pipeline. Building one copies redis-py's table of response callbacks, about
0.15 ms of CPU; with the Redis command itself at about the same cost, that doubled the broker's share of
each message (`bench/e2e.py`, measured side by side: see README, Performance). The client is only a
handle on the channel's connection pool, so one per channel is enough: it takes a pooled connection per
command, as the throw-away clients did, and is rebuilt whenever kombu replaces the pool (after a fork, a
lost connection, a closed channel).

kombu's consumer takes one message per `BRPOP` and one turn of the worker's event loop: under load, a busy
worker frees one prefetch slot at a time and spends a loop turn and a Redis round trip on every message.
Here a worker with its acknowledgements kept in memory (ack emulation off, as `celeryconfig` runs it) asks
for more only once half its prefetch window is free, and then takes up to all the free slots' worth in one
`BLMPOP`, in the order `BRPOP` would have taken them (Redis 7; an older server gets kombu's `BRPOP`). The
window is never exceeded, and a worker that holds nothing asks at once, so a lone message waits no longer.

`celeryconfig` selects this transport for `redis://` brokers (`transport_for`). The messages and keys are
kombu's own, so workers on this transport and on the stock one share queues without noticing each other.
"""
from __future__ import annotations

from contextlib import contextmanager
from queue import Empty
from time import monotonic

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads


class HalfWindowQoS(virtual.QoS):
    """Prefetch limits as kombu's, but the poller fetches again only when the channel holds nothing or at
    least half its window is free: the refill then comes as one batch instead of one message per freed slot.

    Half of the smallest window set, not of the current one: Celery widens the window by one for every
    message it holds for later (a retry's countdown), and those must not count against the refill."""

    _base_window = 0

    @property
    def prefetch_count(self):
        return self._window

    @prefetch_count.setter
    def prefetch_count(self, value):
        self._window = value
        if value and (not self._base_window or value < self._base_window):
            self._base_window = value

    def can_consume(self):
        window = self._window
        held = len(self._delivered) - len(self._dirty)
        return not window or held == 0 or window - held >= max(1, self._base_window // 2)


class Channel(kombu_redis.Channel):
    _command_client = None
    _popping = "BRPOP"
    _server_pops_many: bool | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.ack_emulation:
            self.QoS = HalfWindowQoS

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        pool = self.pool
        if self._command_client is None or self._command_client.connection_pool is not pool:
            self._command_client = self._create_client()
        yield self._command_client

    def _pops_many(self) -> bool:
        """Whether the server has BLMPOP (Redis 7); asked once per channel. Older ones get kombu's BRPOP."""
        if self._server_pops_many is None:
            with self.conn_or_acquire() as client:
                major = str(client.info("server").get("redis_version", "0")).split(".")[0]
            self._server_pops_many = major.isdigit() and int(major) >= 7
        return self._server_pops_many

    def _brpop_start(self, timeout=None):
        free = self.qos.can_consume_max_estimate()
        if not free or free < 2 or not self._pops_many():
            self._popping = "BRPOP"
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        # The keys in BRPOP's order (by priority, then queue), each under the global prefix: kombu's
        # prefixing client knows BRPOP's arguments, not BLMPOP's.
        keys = [self.global_keyprefix + self._q_for_pri(queue, pri)
                for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._popping = "BLMPOP"
        self.client.connection.send_command(
            "BLMPOP", self.brpop_timeout if timeout is None else timeout, len(keys), *keys,
            "RIGHT", "COUNT", free)

    def _brpop_read(self, **options):
        if self._popping != "BLMPOP":
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next turn reconnects, as kombu's BRPOP does
                raise
            if not reply:
                raise Empty()
            key, items = reply
            dest = bytes_to_str(key)[len(self.global_keyprefix):].rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            for item in items:
                self.connection._deliver(loads(bytes_to_str(item)), dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """Celery's `broker_transport` for `broker_url`: this transport for `redis://`, else None (kombu picks by
    the URL's scheme). `rediss://` stays on kombu's own, which derives its TLS defaults from that name."""
    return f"{__name__}:Transport" if broker_url.startswith("redis://") else None
