"""The Redis broker transport that keeps one command client per channel and takes messages in batches
(`celery_ext/redis_transport.py`).

Against the real Redis: it must speak kombu's own format (a worker on the stock transport and one on ours
share a queue during an upgrade), keep publishing across what replaces kombu's connection pool, and take
messages off a queue in kombu's order, within the prefetch window, in fewer round trips than messages.
"""
import pytest
import redis
from kombu import Connection, Queue

from tests.conftest import REDIS_PREFIX, idle_worker_env, publish, wait_until

OURS = "celery_ext.redis_transport:Transport"


def _connection(url: str, transport: str | None, **options) -> Connection:
    return Connection(url, transport=transport, transport_options={"global_keyprefix": REDIS_PREFIX, **options})


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
        assert type(channel).__module__ == "celery_ext.redis_transport"
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



def _count_pops(channel) -> list[str]:
    """The blocking pops `channel` sends from now on (`BRPOP` or `BLMPOP`), as its poller starts them: counted
    at the channel, since the server's own statistics count every other client's pops too."""
    sent: list[str] = []
    start = channel._brpop_start

    def counted(timeout=None):
        start(timeout)
        sent.append(channel._popping)

    channel._brpop_start = counted
    return sent


@pytest.mark.parametrize("publisher, server_pops_many", [(OURS, None), (None, None), (OURS, False)],
                         ids=["ours->ours", "stock->ours", "redis<7"])
def test_a_busy_consumer_refills_its_window_in_batches(redis_url, publisher, server_pops_many):
    """As a worker's loop: it takes messages while the channel lets it, else its pool finishes the oldest
    task held (an acknowledgement). Every message arrives once and in order, never more than the window at
    a time, and the refills come in batches rather than one pop per message (kombu's own: one per message).
    A server older than Redis 7 (told so: none runs here) is asked with kombu's BRPOP, one per message."""
    window, count = 8, 200
    held, seen, most_held = [], [], 0

    def on_message(body, message):
        nonlocal most_held
        held.append(message)
        seen.append(body["n"])
        most_held = max(most_held, len(held))

    with _connection(redis_url, publisher) as out, _connection(redis_url, OURS, ack_emulation=False) as into:
        queue = Queue("transport-batch-test")
        with out.Producer() as producer:
            for n in range(count):
                producer.publish({"n": n}, routing_key=queue.name, declare=[queue], serializer="json")
        sent = _count_pops(into.default_channel)
        if server_pops_many is not None:
            into.default_channel._server_pops_many = server_pops_many
        with into.Consumer(queue, callbacks=[on_message], prefetch_count=window):
            qos = into.default_channel.qos
            while len(seen) < count:
                if qos.can_consume():
                    into.drain_events(timeout=5)
                else:
                    held.pop(0).ack()
        pops = len(sent)
        while held:
            held.pop(0).ack()
        queue(into.default_channel).delete()

    assert seen == list(range(count))
    assert most_held <= window
    if server_pops_many is False:
        assert pops == count
    else:
        assert pops <= count / 3, f"{pops} pops for {count} messages"


def test_messages_held_for_later_do_not_stop_the_refill(redis_url):
    """Celery widens the window by one for every message it keeps for later (a retry's countdown) and
    acknowledges none of them for now: the consumer must go on taking messages."""
    count = 40
    held = []
    with _connection(redis_url, OURS, ack_emulation=False) as conn:
        queue = Queue("transport-eta-test")
        with conn.Producer() as producer:
            for n in range(count):
                producer.publish({"n": n}, routing_key=queue.name, declare=[queue], serializer="json")
        with conn.Consumer(queue, callbacks=[lambda body, message: held.append(message)], prefetch_count=8):
            channel = conn.default_channel
            while len(held) < count:
                if not channel.qos.can_consume():
                    pytest.fail(f"stopped taking messages after {len(held)} held for later")
                conn.drain_events(timeout=5)
                channel.basic_qos(prefetch_count=8 + len(held))  # as Celery's increment for each one held
        for message in held:
            message.ack()
        queue(conn.default_channel).delete()
    assert sorted(m.payload["n"] for m in held) == list(range(count))


def test_a_worker_goes_on_taking_messages_after_its_redis_connections_are_cut(db, mariadb_url, redis_url, celery):
    """What a Redis restart does to a busy worker: every connection it has drops mid-batch. It reconnects
    and drains the queue (sends for rows that do not exist: each finds nothing to do). Only the test
    database's connections are cut."""
    queue = f"{REDIS_PREFIX}send.mobilgroup"
    client = redis.Redis.from_url(redis_url)
    try:
        worker = celery("worker", idle_worker_env(mariadb_url, redis_url), "-P", "threads", "-c", "8")
        publish(redis_url, "from tasks.jobs import enqueue_sends; "
                           "enqueue_sends(list(range(4 * 10**9, 4 * 10**9 + 3000)), 'mobilgroup')")
        wait_until(lambda: client.llen(queue) < 2500, 60, interval_s=0.01, what="the worker to start taking sends")
        own, db = client.client_id(), client.connection_pool.connection_kwargs["db"]
        theirs = [c["id"] for c in client.client_list() if c["db"] == str(db) and c["id"] != str(own)]
        assert theirs
        for client_id in theirs:
            client.client_kill_filter(_id=client_id)
        wait_until(lambda: client.llen(queue) == 0, 60, interval_s=0.1, what="the worker to drain the queue")
        assert "Traceback" not in worker.log()
    finally:
        client.close()
