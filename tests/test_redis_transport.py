"""The Redis broker transport that keeps one command client per channel (`redis_transport.py`).

Against the real Redis: it must speak kombu's own format (a worker on the stock transport and one on ours
share a queue during an upgrade), and keep publishing across what replaces kombu's connection pool.
"""
import pytest
from kombu import Connection

from tests.conftest import REDIS_PREFIX

OURS = "redis_transport:Transport"


def _connection(url: str, transport: str | None) -> Connection:
    return Connection(url, transport=transport, transport_options={"global_keyprefix": REDIS_PREFIX})


@pytest.mark.parametrize("publisher, consumer", [(OURS, None), (None, OURS)], ids=["ours->stock", "stock->ours"])
def test_messages_cross_between_our_transport_and_kombus(redis_url, publisher, consumer):
    with _connection(redis_url, publisher) as out, _connection(redis_url, consumer) as into:
        sent = out.SimpleQueue("transport-test")
        received = into.SimpleQueue("transport-test")
        for n in range(50):
            sent.put({"row": n})
        got = []
        for _ in range(50):
            message = received.get(timeout=5)
            got.append(message.payload["row"])
            message.ack()
        sent.close()
        received.close()
    assert got == list(range(50))


def test_one_client_per_channel_rebuilt_when_kombu_replaces_the_pool(redis_url):
    with _connection(redis_url, OURS) as conn:
        channel = conn.default_channel
        assert type(channel).__module__ == "redis_transport"
        queue = conn.SimpleQueue("transport-test", channel=channel)
        queue.put("a")
        first = channel._command_client
        queue.put("b")
        assert channel._command_client is first

        channel._after_fork()  # what kombu does in a forked pool process: drop the inherited pool
        queue.put("c")
        assert channel._command_client is not first
        assert channel._command_client.connection_pool is channel.pool

        assert [queue.get(timeout=5).payload for _ in range(3)] == ["a", "b", "c"]
        queue.close()

