"""The worker's pool (`celeryconfig.worker_pool`): Celery's thread pool, with the beat tasks on threads of
their own, and only as many sends running at once as the providers' answers call for.

Beat tasks. Celery's thread pool runs what a worker receives on one `ThreadPoolExecutor`, in the order it
came: a beat task (a dispatch tick, a reap) received behind the worker's prefetched sends waited until every
one of them had run: with a provider that hangs, each of those sends that finds no thread for it may
wait (`workflow.runtime.SLOT_WAIT_S`) before giving its row back, and the tick, and the rows of every other
provider with it, came late. Here the housekeeping tasks (`HOUSEKEEPING`) run on
`HOUSEKEEPING_THREADS` threads of their own and start as soon as they arrive.

Sends. A send mostly waits for its provider's answer, so a worker needs a thread per request in flight: 64
keep two workers at about 300 messages/s to a provider answering in 200 ms. Against a provider that answers
at once, though, 64 threads all want the interpreter at the same time, and each message cost a tenth to a
third more CPU than with 16 (`bench/e2e.py`, side by side). `ConcurrencyGate` lets through only
as many tasks as the time spent waiting for providers asks for, from `GATE_FLOOR` up to `-c`: Little's law,
the threads that wait plus `GATE_FLOOR` that work.

Written against Celery 5.7.0 (`celery.concurrency.thread.TaskPool`: `on_apply` receives the task's name as
the first of `args`); `tests/test_celery_ext_pool.py` checks that against the pinned Celery. `-P threads` still
selects Celery's own pool.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from celery.concurrency import thread
from celery.concurrency.base import apply_target

HOUSEKEEPING = frozenset({"sms.dispatch", "sms.poll_due", "sms.reap"})
"""The beat tasks: short, one at a time each, and everything else waits for them."""

HOUSEKEEPING_THREADS = 2
"""Enough for a dispatch tick to run beside a slow reap or poll claim; beat sends each at most once per tick."""

GATE_FLOOR = 12
"""Tasks that may run at once while none waits for a provider: enough to keep the interpreter busy between
the database, Redis and the provider's socket (16 threads did best against a provider answering at once)."""

RESIZE_EVERY_S = 1.0
"""How often the gate's limit follows the waits: often enough to open within a second for a provider that
slows down, seldom enough that one second's tasks are a fair sample."""

WAIT_SHARE_MAX = 0.95
"""The share of waiting the limit is worked out from at most (floor / (1 - share) stays finite; 0.95 gives
20 times the floor, past any `-c` in use)."""


class ConcurrencyGate:
    """Lets at most `limit` tasks run at once. Once a second (`RESIZE_EVERY_S`), `limit` is set from the
    share of the running tasks' time spent in `waiting()` over that second, running or finished:
    floor / (1 - share), between `floor` and `ceiling`, so that the tasks that wait leave `floor` that
    work. It grows at once when tasks were kept out, and shrinks by a third of the gap, so that the tasks
    let in meanwhile can show whether they were needed. Tasks kept out wake once a second to resize it, so
    a provider that hangs every call let in still gets the gate opened."""

    def __init__(self, floor: int, ceiling: int):
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.limit = self.floor
        self._cond = threading.Condition()
        self._inside = threading.local()
        self._running = self._waiting = 0
        self._running_area = self._waiting_area = 0.0  # task-seconds since the last resize
        self._kept_out = False
        self._changed_at = self._resized_at = time.monotonic()

    @contextmanager
    def entered(self):
        with self._cond:
            while self._running >= self.limit:
                self._kept_out = True
                self._resize_if_due()
                if self._running >= self.limit:
                    self._cond.wait(RESIZE_EVERY_S)
            self._count(running=+1)
        self._inside.yes = True
        try:
            yield
        finally:
            self._inside.yes = False
            with self._cond:
                self._count(running=-1)
                self._resize_if_due()
                self._cond.notify()

    @contextmanager
    def waiting(self):
        if not getattr(self._inside, "yes", False):  # not a gated task (a beat task): nothing to count
            yield
            return
        with self._cond:
            self._count(waiting=+1)
        try:
            yield
        finally:
            with self._cond:
                self._count(waiting=-1)

    def _count(self, running: int = 0, waiting: int = 0) -> None:
        now = time.monotonic()
        self._running_area += (now - self._changed_at) * self._running
        self._waiting_area += (now - self._changed_at) * self._waiting
        self._changed_at = now
        self._running += running
        self._waiting += waiting

    def _resize_if_due(self) -> None:
        if time.monotonic() - self._resized_at < RESIZE_EVERY_S:
            return
        self._count()
        if self._running_area > 0:
            share = min(self._waiting_area / self._running_area, WAIT_SHARE_MAX)
            target = max(self.floor, min(self.ceiling, round(self.floor / (1 - share))))
            if target > self.limit and self._kept_out:
                self._cond.notify(target - self.limit)
                self.limit = target
            elif target < self.limit:
                self.limit -= (self.limit - target + 2) // 3
        self._running_area = self._waiting_area = 0.0
        self._kept_out = False
        self._resized_at = self._changed_at


gate: ConcurrencyGate | None = None
"""This process's gate, once its pool exists (a worker started without `-P`); None elsewhere."""


@contextmanager
def waiting():
    """Mark a stretch of a task spent waiting for something outside this process (a provider's answer):
    the gate lets another task run meanwhile."""
    if gate is None:
        yield
        return
    with gate.waiting():
        yield


class TaskPool(thread.TaskPool):
    """Celery's thread pool, plus `HOUSEKEEPING_THREADS` threads that run only the `HOUSEKEEPING` tasks,
    and a `ConcurrencyGate` in front of the others."""

    def __init__(self, *args, **kwargs):
        global gate
        super().__init__(*args, **kwargs)
        self.housekeeping = ThreadPoolExecutor(max_workers=HOUSEKEEPING_THREADS, thread_name_prefix="housekeeping")
        self.gate = gate = ConcurrencyGate(GATE_FLOOR, self.limit)

    def on_stop(self) -> None:
        # Like Celery's own: what has not started is dropped (not acknowledged, and taken up again from the
        # database), what runs is waited for.
        self.housekeeping.shutdown(cancel_futures=True)
        super().on_stop()

    def on_apply(self, target, args=None, kwargs=None, callback=None, accept_callback=None, **_):
        if args and args[0] in HOUSEKEEPING:
            future = self.housekeeping.submit(apply_target, target, args, kwargs, callback, accept_callback)
        else:
            future = self.executor.submit(self._through_gate, target, args, kwargs, callback, accept_callback)
        return thread.ApplyResult(future)

    def _through_gate(self, *task):
        with self.gate.entered():
            return apply_target(*task)

    def _get_info(self):
        info = super()._get_info()
        info.update({"housekeeping-threads": len(self.housekeeping._threads), "running-limit": self.gate.limit})
        return info
