"""Publishing one task per row id (`tasks.jobs.enqueue_sends`), through the real Redis broker: every row's
task arrives, carrying the row id and nothing else, however many go out in one pipelined batch, in the
message Celery's own `apply_async` would have sent."""
import base64
import json

import redis
from celery.utils.saferepr import saferepr

from tests.conftest import REDIS_PREFIX, publish


def _queued(client, queue: str) -> list[dict]:
    """The messages waiting on `queue`, oldest first (kombu pushes each on the left)."""
    return [json.loads(m) for m in reversed(client.lrange(REDIS_PREFIX + queue, 0, -1))]


def _without_ids(message: dict) -> dict:
    """The message without what differs by task id or row id (a task sent from outside a task is its own
    root)."""
    headers = {k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "argsrepr")}
    properties = {k: v for k, v in message["properties"].items() if k not in ("correlation_id", "delivery_tag")}
    return {**message, "headers": headers, "properties": properties, "body": None}


def test_every_row_gets_one_send_task_carrying_only_its_id(redis_url):
    ids = list(range(1001, 3501))  # more than one batch (kombu flushes every 1,000 commands)
    publish(redis_url, f"from tasks.jobs import enqueue_sends; enqueue_sends({ids!r}, 'mobilgroup')")

    client = redis.Redis.from_url(redis_url)
    messages = _queued(client, "send.mobilgroup")
    client.close()
    assert [m["headers"]["task"] for m in messages] == ["sms.send"] * len(ids)
    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    assert [args for args, kwargs, _ in bodies] == [[i] for i in ids]
    assert all(kwargs == {} for _, kwargs, _ in bodies)
    # What Flower and the task events show: the same as Celery's own rendering of these arguments.
    assert [(m["headers"]["argsrepr"], m["headers"]["kwargsrepr"]) for m in messages] == [
        (saferepr((i,)), saferepr({})) for i in ids]


def test_a_send_and_a_poll_go_out_as_apply_async_would_send_them(redis_url):
    publish(redis_url, "from tasks.jobs import enqueue_sends, _enqueue_each, send, poll; "
                       "enqueue_sends([7], 'mobilgroup'); send.apply_async((8,), queue='send.mobilgroup'); "
                       "_enqueue_each(poll, [9]); poll.apply_async((10,))")
    client = redis.Redis.from_url(redis_url)
    ours_send, celerys_send, ours_poll, celerys_poll = _queued(client, "send.mobilgroup")
    client.close()
    for ours, celerys, row_id in ((ours_send, celerys_send, 7), (ours_poll, celerys_poll, 9)):
        assert _without_ids(ours) == _without_ids(celerys)
        assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
        assert ours["headers"]["id"] != celerys["headers"]["id"]
        assert json.loads(base64.b64decode(ours["body"]))[0] == [row_id]
