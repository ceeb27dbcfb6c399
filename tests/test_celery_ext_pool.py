"""The worker's pool (`celery_ext.pool.TaskPool`) against the pinned Celery: the beat tasks start while every
thread is busy with sends, where Celery's own thread pool makes them wait; and its `ConcurrencyGate`, which
runs few tasks at once while they do not wait and up to all of them while they do."""
from __future__ import annotations

import threading
import time

import pytest
from celery.concurrency import thread

from celery_ext import pool as ext_pool
from tests.conftest import wait_until

pytestmark = pytest.mark.timing


def started_while_sends_block(pool_cls) -> bool:
    """Two threads, four sends that block until released, then a dispatch tick: whether the tick ran
    within a second, while the sends still held every thread."""
    pool = pool_cls(limit=2)
    release, ticked = threading.Event(), threading.Event()
    sends_running = threading.Semaphore(0)

    def blocking_send(name, *_):
        sends_running.release()
        release.wait(10)

    try:
        for row_id in range(4):
            pool.apply_async(blocking_send, args=("sms.send", row_id))
        for _ in range(2):
            assert sends_running.acquire(timeout=5), "the sends did not start"
        pool.apply_async(lambda name, *_: ticked.set(), args=("sms.dispatch",))
        return ticked.wait(1)
    finally:
        release.set()
        pool.stop()


def test_a_dispatch_tick_starts_while_every_thread_is_busy_with_sends():
    assert started_while_sends_block(ext_pool.TaskPool)


def test_celerys_own_thread_pool_makes_it_wait():
    """The premise, checked against the pinned Celery: should it change, this override may be dropped."""
    assert not started_while_sends_block(thread.TaskPool)


def test_the_housekeeping_tasks_are_the_beat_tasks():
    from celeryconfig import beat_schedule

    assert {entry["task"] for entry in beat_schedule.values()} == ext_pool.HOUSEKEEPING


def test_a_worker_started_without_options_runs_this_pool():
    from celery.concurrency import get_implementation

    from tasks.app import app

    assert get_implementation(app.conf.worker_pool) is ext_pool.TaskPool


class Load:
    """`threads` threads each running tasks through `gate` until stopped; a task sleeps `work_s` outside
    `waiting()` and `wait_s` inside it (or, with `hang`, waits inside it until the load stops)."""

    def __init__(self, gate: ext_pool.ConcurrencyGate, threads: int, work_s: float, wait_s: float = 0,
                 hang: bool = False):
        self.gate, self.work_s, self.wait_s, self.hang = gate, work_s, wait_s, hang
        self.stop = threading.Event()
        self.running = self.most = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _loop(self):
        while not self.stop.is_set():
            with self.gate.entered():
                with self.lock:
                    self.running += 1
                    self.most = max(self.most, self.running)
                time.sleep(self.work_s)
                with self.gate.waiting():
                    if self.hang:
                        self.stop.wait(30)
                    else:
                        time.sleep(self.wait_s)
                with self.lock:
                    self.running -= 1

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_tasks_that_do_not_wait_run_floor_at_a_time():
    """A provider that answers at once: more threads would only take turns at the interpreter."""
    gate = ext_pool.ConcurrencyGate(floor=3, ceiling=12)
    load = Load(gate, threads=12, work_s=0.01, wait_s=0.0005)
    try:
        time.sleep(3.5)
        assert load.most <= 3 and gate.limit == 3
    finally:
        load.close()


def test_tasks_that_mostly_wait_open_the_gate_up_to_the_ceiling_and_it_closes_again_after():
    """A provider answering in 200 ms: a thread per request in flight. When the waits stop, the limit
    comes back down to the floor."""
    gate = ext_pool.ConcurrencyGate(floor=2, ceiling=10)
    load = Load(gate, threads=10, work_s=0.005, wait_s=0.2)
    try:
        wait_until(lambda: gate.limit == 10, 5, 0.05, "the gate to open to its ceiling")
        wait_until(lambda: load.most == 10, 2, 0.05, "ten tasks running at once")
    finally:
        load.close()
    quick = Load(gate, threads=10, work_s=0.01)
    try:
        wait_until(lambda: gate.limit == 2, 10, 0.05, "the gate to close to its floor")
    finally:
        quick.close()


def test_calls_that_never_return_still_open_the_gate():
    """A provider that hangs every call let in: no task finishes, and the ones kept out must still get in
    (each then meets its provider's share of the threads and gives its row back)."""
    gate = ext_pool.ConcurrencyGate(floor=2, ceiling=8)
    load = Load(gate, threads=8, work_s=0, hang=True)
    try:
        wait_until(lambda: load.running == 8, 5, 0.05, "every task let in although none returns")
    finally:
        load.close()


def test_waits_outside_a_gated_task_are_not_counted():
    """A beat task that calls a provider (failover asking about rows in doubt) does not open the gate."""
    gate = ext_pool.ConcurrencyGate(floor=2, ceiling=8)
    outside_done = threading.Event()

    def outside():
        with gate.waiting():
            outside_done.wait(10)

    beat_task = threading.Thread(target=outside, daemon=True)
    beat_task.start()
    load = Load(gate, threads=8, work_s=0.01)
    try:
        time.sleep(2.5)
        assert load.most <= 2 and gate.limit == 2
    finally:
        outside_done.set()
        load.close()
        beat_task.join(10)
