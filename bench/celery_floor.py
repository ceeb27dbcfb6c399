"""Celery's own cost per task on this machine: a no-op task under the dispatcher's Celery settings.

Every `sms.send` pays this before any of our code runs, so it bounds what `bench/e2e.py` can reach with one
task per message. With the project's `celeryconfig` (Redis broker under a key prefix of the run's own,
late acks, prefetch 1, JSON) and its worker step that sends task events in batches, for each event setting
in turn it starts `--workers` workers (`--pool`, `--concurrency`), publishes `--tasks` no-op tasks over one
producer in pipelined batches as the dispatch task does, and waits until every one has run (each
increments a Redis counter). It prints tasks/s, and the CPU per task of the workers (parent and pool
together), of the publisher and of the Redis server (other clients of that Redis count too):

    .venv/bin/python bench/celery_floor.py --workers 2 --pool prefork --concurrency 8

Event settings: `worker+sent` (task events and the task-sent event), `worker` (task events only: the
project's setting, what Flower needs), `none`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import redis
from celery import Celery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import redis_cpu, self_cpu  # noqa: E402
from smsctl.processes import pool_option  # noqa: E402
from celery_ext.redis_transport import transport_for  # noqa: E402
from celery_ext.events import BatchedTaskEvents  # noqa: E402

EVENTS = {"worker+sent": (True, True), "worker": (True, False), "none": (False, False)}

app = Celery("celery_floor")
app.config_from_object("celeryconfig")
app.steps["consumer"].add(BatchedTaskEvents)
_worker_events, _sent_event = EVENTS[os.environ.get("FLOOR_EVENTS", "worker")]
app.conf.update(worker_send_task_events=_worker_events, task_send_sent_event=_sent_event)


@app.task(name="floor.noop", ignore_result=True)
def noop(_n: int) -> None:
    _counter().incr(_done_key())


def _done_key() -> str:
    return os.environ["SMS_REDIS_PREFIX"] + "floor:done"


_redis = None


def _counter() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def run(args, events: str, broker: str, log_dir: Path) -> tuple[float, float, float, float]:
    """Tasks/s, and CPU ms per task of the workers, the publisher and Redis, for one event setting."""
    from smsctl.processes import CeleryProcess, stop_all

    prefix = f"sms_floor_{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "CELERY_BROKER_URL": broker, "SMS_REDIS_PREFIX": prefix, "FLOOR_EVENTS": events,
           "SMS_VAR_DIR": str(log_dir)}
    store = redis.Redis.from_url(broker, socket_timeout=5)
    workers = [CeleryProcess(["worker", "-Q", "dispatch", "-P", pool_option(args.pool), "-c", str(args.concurrency), "-l", "warning",
                              "-n", f"floor{n}-{uuid.uuid4().hex[:6]}@%h", "--without-mingle", "--without-gossip"],
                             env, log_dir / f"{events}-worker{n}.log", app="bench.celery_floor")
               for n in range(args.workers)]
    publisher = Celery("floor-publisher", broker=broker)
    publisher.config_from_object("celeryconfig")
    publisher.conf.update(broker_url=broker, broker_transport=transport_for(broker),
                          task_send_sent_event=EVENTS[events][1],
                          broker_transport_options={"global_keyprefix": prefix})
    try:
        deadline = time.monotonic() + 60
        while len(publisher.control.ping(timeout=0.5)) < args.workers:
            if time.monotonic() > deadline or any(not w.running() for w in workers):
                raise RuntimeError(f"workers did not start; see {log_dir}")
        # A first round reaches every pool process, so that imports and connections are not measured.
        warm = args.workers * args.concurrency * 2
        for n in range(warm):
            publisher.send_task("floor.noop", (n,), queue="dispatch")
        _wait_count(store, prefix, warm, args.timeout)
        store.set(prefix + "floor:done", 0)
        cpu0, pub0, redis0 = tree_cpu([w.pid for w in workers]), self_cpu(), redis_cpu(store)
        start = time.monotonic()
        with publisher.producer_or_acquire() as producer, producer.batch():
            for n in range(args.tasks):
                publisher.send_task("floor.noop", (n,), queue="dispatch", producer=producer)
        published = self_cpu() - pub0
        _wait_count(store, prefix, args.tasks, args.timeout)
        elapsed = time.monotonic() - start
        worker_cpu = tree_cpu([w.pid for w in workers]) - cpu0
        redis_used = redis_cpu(store) - redis0
    finally:
        publisher.close()
        stop_all(workers)
        for key in store.scan_iter(match=prefix + "*", count=1000):
            store.delete(key)
        store.close()
    per_task_ms = [cpu / args.tasks * 1000 for cpu in (worker_cpu, published, redis_used)]
    return args.tasks / elapsed, *per_task_ms


def _wait_count(store: redis.Redis, prefix: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while int(store.get(prefix + "floor:done") or 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{store.get(prefix + 'floor:done')} of {count} tasks ran in {timeout_s:g} s")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--pool", default="prefork", choices=("prefork", "threads", "solo"))
    p.add_argument("--events", nargs="+", default=list(EVENTS), choices=list(EVENTS))
    p.add_argument("--redis", default=os.environ.get("SMS_BENCH_REDIS", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=15)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    broker = f"{args.redis}/{args.redis_db}"
    print(f"{args.tasks} no-op tasks, {args.workers} workers x {args.concurrency} ({args.pool})")
    print(f"{'events':<14}{'tasks/s':>10}{'worker CPU ms/task':>20}{'publish CPU ms/task':>21}"
          f"{'Redis CPU ms/task':>19}")
    with tempfile.TemporaryDirectory(prefix="sms-floor-") as tmp:
        for events in args.events:
            rate, worker_ms, publish_ms, redis_ms = run(args, events, broker, Path(tmp))
            print(f"{events:<14}{rate:>10.0f}{worker_ms:>20.3f}{publish_ms:>21.3f}{redis_ms:>19.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
