"""A worker stopped cleanly gives back every message it held.

Redis keeps no copy of a delivered message (`ack_emulation` off in `celeryconfig`): what a worker holds,
such as a send waiting for its retry countdown, lives in its memory only. Stopping the worker must put it
back on the queue. (What a killed worker held is taken up by the reaper: `test_spine`.)
"""
import base64
import json

import redis

from tests.conftest import REDIS_PREFIX, idle_worker_env, publish, wait_until

HELD = 20


def test_a_stopped_worker_puts_back_the_sends_it_held(db, mariadb_url, redis_url, celery):
    env = idle_worker_env(mariadb_url, redis_url)
    ids = list(range(3 * 10**9, 3 * 10**9 + HELD))
    queue = f"{REDIS_PREFIX}send.mobilgroup"
    client = redis.Redis.from_url(redis_url)
    try:
        worker = celery("worker", env, "-P", "threads", "-c", "4")
        # Sends due in an hour, as a retry's countdown makes them: the worker takes them and waits.
        script = ("from tasks.jobs import send\n"
                  f"for i in {ids!r}: send.apply_async((i,), countdown=3600, queue='send.mobilgroup')")
        publish(redis_url, script)
        wait_until(lambda: client.llen(queue) == 0, 60, interval_s=0.1, what="the worker to take every send")
        assert "Traceback" not in worker.log()

        worker.stop()

        back = [json.loads(m) for m in client.lrange(queue, 0, -1)]
    finally:
        client.close()
    assert sorted(_row_id(m) for m in back) == ids
    assert all(m["headers"]["eta"] for m in back), "a message came back without its countdown"


def _row_id(message: dict) -> int:
    args, _, _ = json.loads(base64.b64decode(message["body"]))
    return args[0]
