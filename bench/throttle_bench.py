"""Measure the fleet-wide throttle itself (`workflow.throttle`): several processes draining one account's backlog.

Each process takes the next request from a shared queue, asks the throttle, waits for its slot
(`Permit.wait()`; a refused request is retried after the reported wait), and records when it would have
reached the provider: when the send starts plus an optional random network delay (`--jitter-ms`).
`--late-share` of the sleeps overrun by up to `--late-ms`, as on a busy host. It prints the achieved rate,
the largest one-second window, how long the batch took against count/rate, the smallest gap between grants of
identical requests (the first `--duplicates` requests share one recipient and text), and how late the
senders woke (p50 / p99 / max) and how many slots they gave back for it.

    .venv/bin/python bench/throttle_bench.py --backend redis --processes 8 --rate 20 --count 400
    .venv/bin/python bench/throttle_bench.py --backend local --processes 4 --rate 20 --jitter-ms 20 --guard-s 0
    .venv/bin/python bench/throttle_bench.py --processes 4 --rate 20 --late-share 0.3 --late-ms 250

`largest_window` and `smallest_gap` are also what the tests assert with.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workflow.throttle import GUARD_S, SEND_WITHIN_S, LocalThrottle, RedisThrottle, identity_of  # noqa: E402


def largest_window(times: list[float], weights: list[int] | None = None, length: float = 1.0) -> int:
    """The largest total weight of events in any half-open window [t, t + length)."""
    events = sorted(zip(times, weights or [1] * len(times)))
    best = total = start = 0
    for at, weight in events:
        total += weight
        while events[start][0] <= at - length:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best


def smallest_gap(times: list[float]) -> float | None:
    """The smallest gap between consecutive times, or None for fewer than two."""
    ordered = sorted(times)
    return min((b - a for a, b in zip(ordered, ordered[1:])), default=None)


def _worker(args, store, taken, shared, results, go):
    throttle = _make_throttle(args, store)
    rng = random.Random()

    def sleep(seconds):
        late = rng.uniform(0, args.late_ms / 1000) if rng.random() < args.late_share else 0
        time.sleep(seconds + late)

    go.wait(30)
    arrivals = []
    try:
        while True:
            with taken.get_lock():
                n = taken.value
                taken.value += 1
            if n >= args.count:
                break
            identity = shared if n < args.duplicates else None
            while True:
                permit = throttle.acquire(args.account, args.rate, cost=args.cost, identity=identity,
                                          identical_s=args.identical_s, max_wait_s=args.max_wait_s).wait(sleep)
                if permit.reserved:
                    arrivals.append((time.time() + rng.uniform(0, args.jitter_ms / 1000), identity))
                    break
                time.sleep(permit.wait_s)
    finally:
        throttle.close()
        results.put(arrivals)


def _make_throttle(args, store):
    """`store` is the Redis key prefix or the SQLite file of this run."""
    if args.backend == "redis":
        return RedisThrottle(args.redis_url, prefix=store, guard_s=args.guard_s, send_within_s=args.send_within_s)
    return LocalThrottle(store, guard_s=args.guard_s, send_within_s=args.send_within_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["redis", "local"], default="redis")
    parser.add_argument("--redis-url", default=os.environ.get("SMS_REDIS_URL", "redis://127.0.0.1:6379/2"))
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--cost", type=int, default=1, help="parts per message")
    parser.add_argument("--duplicates", type=int, default=3, help="how many requests share one identity")
    parser.add_argument("--identical-s", type=float, default=2.0)
    parser.add_argument("--max-wait-s", type=float, default=2.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="random delay added to each arrival")
    parser.add_argument("--guard-s", type=float, default=GUARD_S, help="send start to arrival margin of the window")
    parser.add_argument("--send-within-s", type=float, default=SEND_WITHIN_S, help="how late a send may start")
    parser.add_argument("--late-share", type=float, default=0.0, help="share of the sleeps that overrun")
    parser.add_argument("--late-ms", type=float, default=250.0, help="how far they overrun, at most")
    parser.add_argument("--account", default="bench:1")
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("fork")
    shared = identity_of("70000000000", "the same text", b"bench")
    taken = context.Value("i", 0)
    with tempfile.TemporaryDirectory() as tmp:
        store = (f"sms:throttle:bench-{uuid.uuid4().hex}:" if args.backend == "redis"
                 else str(Path(tmp) / "throttle.sqlite3"))
        results, go = context.Queue(), context.Event()
        workers = [context.Process(target=_worker, args=(args, store, taken, shared, results, go))
                   for _ in range(args.processes)]
        for worker in workers:
            worker.start()
        started = time.time()
        go.set()
        arrivals = [arrival for _ in workers for arrival in results.get()]
        for worker in workers:
            worker.join()
        throttle = _make_throttle(args, store)
        throttled = throttle.throttled_count(args.account)
        given_back, lateness = throttle.given_back_count(args.account), sorted(throttle.lateness(args.account))
        throttle.close()
        if args.backend == "redis":
            client = redis.Redis.from_url(args.redis_url)
            for key in client.scan_iter(match=store + "*"):
                client.delete(key)
            client.close()

    times = [at for at, _ in arrivals]
    elapsed = max(times) - started
    ideal = args.count * args.cost / args.rate
    gap = smallest_gap([at for at, identity in arrivals if identity == shared])
    print(f"backend {args.backend}, {args.processes} processes, limit {args.rate:g}/s, "
          f"{args.count} messages of {args.cost} part(s), send within {args.send_within_s:g} s, guard "
          f"{args.guard_s:g} s, jitter {args.jitter_ms:g} ms, {args.late_share:.0%} of sleeps up to "
          f"{args.late_ms:g} ms late")
    print(f"achieved rate            {args.count * args.cost / elapsed:.2f} parts/s")
    print(f"largest one-second window {largest_window(times, [args.cost] * len(times))} parts "
          f"(limit {args.rate:g})")
    print(f"total time               {elapsed:.2f} s = {elapsed / ideal:.1%} of count/rate ({ideal:.2f} s)")
    print("smallest identical gap   " + (f"{gap:.3f} s (rule {args.identical_s:g} s)" if gap is not None
                                          else "n/a (fewer than two duplicates)"))
    print(f"told to wait             {throttled} acquire calls")
    if len(lateness) > 1:
        cuts = statistics.quantiles(lateness, n=100, method="inclusive")
        print(f"wake-up after slot       p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms, max "
              f"{lateness[-1] * 1000:.1f} ms over {len(lateness)} wake-ups; {given_back} slot(s) given back")


if __name__ == "__main__":
    main()
