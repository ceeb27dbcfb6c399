"""Task events, what Flower shows, leave a worker in batches (`celery_ext/events.py`): every task's received,
started and succeeded events still arrive, in far fewer broker messages than events, and a worker stopped
right after its last task still sends that task's events.

Read off the real Redis as Flower reads them: a subscription to the worker's event exchange.
"""
import base64
import json
import threading
import time

import pytest
import redis
from celery import Celery

from celery_ext.events import BUFFER_LIMIT, FLUSH_EVERY_S
from tests.conftest import (
    REDIS_PREFIX,
    idle_worker_env,
    insert_rows,
    publish,
    wait_until,
)

pytestmark = pytest.mark.timing

TASKS = 60
EVENTS = ("task-received", "task-started", "task-succeeded")


class EventTap:
    """Every event-exchange message published under our Redis prefix, decoded, while the `with` lasts."""

    def __init__(self, redis_url: str):
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"{REDIS_PREFIX}*celeryev/*")
        self.messages: list[list[dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self):
        while not self._stop.is_set():
            raw = self._pubsub.get_message(timeout=0.2)
            if raw:
                body = json.loads(base64.b64decode(json.loads(raw["data"])["body"]))
                self.messages.append(body if isinstance(body, list) else [body])

    def events(self, kind: str) -> list[dict]:
        return [e for batch in list(self.messages) for e in batch if e["type"] == kind]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


def _enqueue_sends(redis_url: str, first_id: int, count: int = TASKS) -> None:
    """`count` sends for rows that do not exist: each runs, finds nothing to send and succeeds."""
    publish(redis_url, "from tasks.jobs import enqueue_sends; "
                       f"enqueue_sends(list(range({first_id}, {first_id + count})), 'mobilgroup')")


def _task_ids(tap: EventTap, kind: str) -> set[str]:
    return {e["uuid"] for e in tap.events(kind)}


def test_every_task_event_arrives_in_batches_one_per_flush_interval(db, mariadb_url, redis_url, celery):
    tasks = 300  # 900 events, fewer than BUFFER_LIMIT: only the timer and the worker's stop publish them
    with EventTap(redis_url) as tap:
        worker = celery("worker", idle_worker_env(mariadb_url, redis_url), "-P", "threads", "-c", "8")
        wait_until(lambda: tap.events("worker-online"), 60, what="the worker to come online")
        _enqueue_sends(redis_url, first_id=10**9, count=tasks)
        wait_until(lambda: len(_task_ids(tap, "task-succeeded")) == tasks, 60, what="every task to succeed")
        time.sleep(0.5)  # anything sent late would be counted too
        worker.stop()

    received = _task_ids(tap, "task-received")
    assert len(received) == tasks
    assert _task_ids(tap, "task-started") == received == _task_ids(tap, "task-succeeded")
    task_messages = [batch for batch in tap.messages if batch[0]["type"].startswith("task-")]
    # One publish per event unbatched (900 here), one per 24 events with Celery's own buffer limit (38 or
    # more); the timer's: one per interval while the tasks ran, give or take its first and last.
    assert tasks * len(EVENTS) < BUFFER_LIMIT
    stamps = [event["timestamp"] for batch in task_messages for event in batch]
    intervals = (max(stamps) - min(stamps)) / FLUSH_EVERY_S
    assert len(task_messages) <= intervals + 2, f"{len(task_messages)} messages in {intervals:.1f} intervals"


def test_a_stopped_worker_still_sends_its_last_tasks_events(db, mariadb_url, redis_url, celery):
    control = Celery(broker=redis_url)
    control.conf.broker_transport_options = {"global_keyprefix": REDIS_PREFIX}
    client = redis.Redis.from_url(redis_url)

    def every_task_ran():
        if client.llen(f"{REDIS_PREFIX}send.mobilgroup"):
            return False
        inspect = control.control.inspect(timeout=2, limit=1)
        stats = inspect.stats() or {}
        return (sum(s["total"].get("sms.send", 0) for s in stats.values()) == TASKS
                and not any((inspect.active() or {}).values()))

    try:
        with EventTap(redis_url) as tap:
            worker = celery("worker", idle_worker_env(mariadb_url, redis_url), "-P", "threads", "-c", "8")
            wait_until(lambda: tap.events("worker-online"), 60, what="the worker to come online")
            _enqueue_sends(redis_url, first_id=2 * 10**9)
            # Stop as soon as every task ran: their last events are most likely still in the buffer.
            wait_until(every_task_ran, 60, interval_s=0.01, what="every task to run")
            worker.stop()
            wait_until(lambda: tap.events("worker-offline"), 30, what="the worker to go offline")
    finally:
        client.close()
        control.close()

    assert len(_task_ids(tap, "task-succeeded")) == TASKS


def test_flower_links_each_send_to_the_dispatch_that_made_it(db, mariadb_url, redis_url, celery):
    ids = insert_rows(db, [(f"+7 916 100-00-0{i}", "hello") for i in range(3)])
    with EventTap(redis_url) as tap:
        worker = celery("worker", idle_worker_env(mariadb_url, redis_url), "-P", "threads", "-c", "4")
        wait_until(lambda: tap.events("worker-online"), 60, what="the worker to come online")
        publish(redis_url, "from tasks.jobs import dispatch; dispatch.delay()")
        wait_until(lambda: len({e["uuid"] for e in tap.events("task-received") if e["name"] == "sms.send"}) == 3,
                   60, what="the dispatch's three sends to arrive")
        worker.stop()

    received = tap.events("task-received")
    (dispatch,) = [e for e in received if e["name"] == "sms.dispatch"]
    sends = {e["uuid"]: e for e in received if e["name"] == "sms.send"}.values()
    assert sorted(e["args"] for e in sends) == [f"({i},)" for i in ids]
    assert {(e["parent_id"], e["root_id"]) for e in sends} == {(dispatch["uuid"], dispatch["uuid"])}
