"""Publishing one task per row id (`tasks.jobs.enqueue_sends`), through the real Redis broker: every row's
task arrives, carrying the row id and nothing else, however many go out in one pipelined batch."""
import base64
import json

import redis
from celery.utils.saferepr import saferepr

from tests.conftest import REDIS_PREFIX, publish

def test_every_row_gets_one_send_task_carrying_only_its_id(redis_url):
    ids = list(range(1001, 3501))  # more than one batch (kombu flushes every 1,000 commands)
    publish(redis_url, f"from tasks.jobs import enqueue_sends; enqueue_sends({ids!r}, 'mobilgroup')")

    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(REDIS_PREFIX + "send.mobilgroup", 0, -1)
    client.close()
    messages = [json.loads(m) for m in reversed(raw)]  # LPUSH: the newest first
    assert [m["headers"]["task"] for m in messages] == ["sms.send"] * len(ids)
    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    assert [args for args, kwargs, _ in bodies] == [[i] for i in ids]
    assert all(kwargs == {} for _, kwargs, _ in bodies)
    # What Flower and the task events show: the same as Celery's own rendering of these arguments.
    assert [(m["headers"]["argsrepr"], m["headers"]["kwargsrepr"]) for m in messages] == [
        (saferepr((i,)), saferepr({})) for i in ids]
