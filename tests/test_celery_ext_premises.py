"""What `celery_ext/` relies on in the pinned Celery and kombu, checked name by name: a new release that
renames or reshapes one of these internals fails here, before a worker misbehaves in production.

The behaviour of each override is tested beside it (`tests/test_celery_ext_*.py`); this file holds the
premises those tests would only show indirectly.
"""
from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest

import celery_ext


@pytest.mark.parametrize("package", sorted(celery_ext.WRITTEN_AGAINST))
def test_the_installed_version_is_the_one_the_overrides_were_written_against(package):
    installed = ".".join(version(package).split(".")[:2])
    assert installed == celery_ext.WRITTEN_AGAINST[package]


def test_pool_premises():
    """`celery_ext.pool` replaces `on_apply` of Celery's thread pool: Celery passes the task's name as the
    first of `args`, keeps its executor as `executor` and its size as `limit`, and wraps futures in
    `ApplyResult`; `apply_target` runs one task."""
    from celery.concurrency import base, thread

    on_apply = inspect.signature(thread.TaskPool.on_apply)
    assert list(on_apply.parameters)[:6] == ["self", "target", "args", "kwargs", "callback", "accept_callback"]
    assert hasattr(thread, "ApplyResult")
    assert list(inspect.signature(base.apply_target).parameters)[:5] == [
        "target", "args", "kwargs", "callback", "accept_callback"]
    assert "self.executor = " in inspect.getsource(thread.TaskPool.__init__)
    assert "self.limit" in inspect.getsource(base.BasePool.__init__)
    # The task's name as the first argument: what the worker's strategy hands the pool.
    from celery.app import trace

    assert "name" == list(inspect.signature(trace.trace_task_ret).parameters)[0]


def test_events_premises():
    """`celery_ext.events` takes over the flush of the consumer's event dispatcher: the `Events` step it
    requires exists, and the dispatcher flushes on `on_send_buffered` and at `buffer_limit`."""
    from celery.events.dispatcher import EventDispatcher
    from celery.worker.consumer import events

    assert hasattr(events, "Events")
    source = inspect.getsource(EventDispatcher)
    for name in ("on_send_buffered", "buffer_limit", "def flush"):
        assert name in source, name


def test_redis_transport_premises():
    """`celery_ext.redis_transport` replaces kombu's per-command client (`conn_or_acquire`, `_create_client`,
    rebuilt when `pool` changes), and its `BRPOP` poll (`_brpop_start`, `_brpop_read`, with the queue cycle,
    priority steps and the global key prefix), and its QoS window (`_delivered`, `_dirty`,
    `can_consume_max_estimate`)."""
    from kombu.transport import redis, virtual

    channel = redis.Channel
    for name in ("conn_or_acquire", "_create_client", "_brpop_start", "_brpop_read", "_q_for_pri",
                 "_flush_brpop_reauth", "priority_steps", "global_keyprefix", "ack_emulation",
                 "sep", "pool", "client"):
        assert hasattr(channel, name), name
    assert list(inspect.signature(channel.conn_or_acquire).parameters) == ["self", "client"]
    assert list(inspect.signature(channel._brpop_start).parameters) == ["self", "timeout"]
    assert "_queue_cycle" in inspect.getsource(channel)
    assert "_in_poll" in inspect.getsource(channel)
    assert "brpop_timeout" in inspect.getsource(redis)  # an option of the transport, read as the pop's timeout
    qos_source = inspect.getsource(virtual.QoS)
    for name in ("_delivered", "_dirty", "def can_consume_max_estimate", "def can_consume", "prefetch_count"):
        assert name in qos_source, name
    assert "QoS" in inspect.getsource(redis.Channel.__init__) or hasattr(channel, "QoS")


def test_filesystem_transport_premises():
    """`celery_ext.filesystem_transport` writes under a name kombu's consumer skips: `_get` only takes
    files whose names end in `<queue>.msg`, and `_put` is what publishes."""
    from kombu.transport import filesystem

    assert list(inspect.signature(filesystem.Channel._put).parameters)[:3] == ["self", "queue", "payload"]
    assert ".msg" in inspect.getsource(filesystem.Channel._get)
