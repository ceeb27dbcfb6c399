"""Measure the fleet-wide rate limit and identical-request rule through the whole dispatcher, for any provider.

One invocation, against MariaDB and Redis on this machine:

1. creates a throw-away MariaDB database (asterCC's tables and ours) and inserts `--count` rows to distinct
   recipients, all due, the later ids due earlier (so the send order can be compared with the due order);
   the last `--identical` of them are inserted a second time, as identical messages (same recipient, text);
2. starts the provider's simulator in this process (`mobilgroup`, `accolades`, `ozeki`: HTTP; `smsc`: SMPP,
   which also refuses identical submits within `--identical-s` as smsc.ru does), then `celery beat` and
   `--workers` × `--concurrency` `celery worker` processes, on Redis DB `--redis-db` under a run prefix,
   beside `--busy` processes that only burn CPU (a busy host wakes sleeping senders late);
3. waits until every row is final (or `--timeout`), reads when each request reached the simulator, and prints
   the achieved rate, the largest one-second window, the batch time against count/rate, the smallest gap
   between identical requests, how often the send order followed the due order, the throttle's count, and
   how late the senders woke after their slots (p50 / p99 / max) and how many slots they gave back for it
   (`workflow.throttle.Permit.wait`: a send never starts more than `SEND_WITHIN_S` after its slot);
4. stops every process and the simulator, deletes the run's Redis keys and drops the database.

    .venv/bin/python bench/fleet_rate.py --provider mobilgroup --workers 2 --concurrency 2 --rate 20 --count 400
    .venv/bin/python bench/fleet_rate.py --provider smsc --workers 4 --concurrency 1 --rate 30 --identical 3
    .venv/bin/python bench/fleet_rate.py --workers 4 --concurrency 1 --rate 20 --busy 4

Provider limits: `SMS_<PROVIDER>_RATE` = `--rate`, `SMS_<PROVIDER>_IDENTICAL_S` = `--identical-s`.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throttle_bench import largest_window, smallest_gap
from db import schema
from db.engine import engine_for
from smsctl.processes import CeleryProcess, pool_option, stop_all
from workflow.throttle import KEY_PREFIX, SEND_WITHIN_S, RedisThrottle

PROVIDERS = ("mobilgroup", "accolades", "ozeki", "smsc")
FINAL = ("success", "failed", "error")
ORDER = re.compile(r"order (\d+) is ready")


def simulator(provider: str, args):
    """The provider's stand-in, not yet started, and the environment that points the dispatcher at it."""
    if provider == "mobilgroup":
        from simulators.mobilgroup import MobilgroupSimulator

        sim = MobilgroupSimulator(latency_s=args.latency)
        return sim, {"SMS_MOBILGROUP_URL": sim.api_url, "SMS_MOBILGROUP_USER_ID": sim.user_id,
                     "SMS_MOBILGROUP_USER": sim.user, "SMS_MOBILGROUP_PASSWORD": sim.password}
    if provider == "accolades":
        from simulators.accolades import AccoladesSimulator

        sim = AccoladesSimulator(latency_s=args.latency)
        return sim, {"SMS_ACCOLADES_URL": sim.url, "SMS_ACCOLADES_ACCOUNT": sim.account,
                     "SMS_ACCOLADES_PASSWORD": sim.password}
    if provider == "ozeki":
        from simulators.ozeki import OzekiSimulator

        sim = OzekiSimulator(latency_s=args.latency)
        return sim, {"SMS_OZEKI_URL": sim.url + "/api", "SMS_OZEKI_USERNAME": sim.username,
                     "SMS_OZEKI_PASSWORD": sim.password}
    from simulators.smsc import SmscSimulator

    sim = SmscSimulator(receipts=False, identical_window_s=args.identical_s, latency_s=args.latency)
    return sim, {"SMS_SMSC_HOST": "127.0.0.1", "SMS_SMSC_PORT": str(sim.port),
                 "SMS_SMSC_SYSTEM_ID": sim.system_id, "SMS_SMSC_PASSWORD": sim.password}


def account_of(provider: str, sim) -> str:
    """The throttle's account name, as `workflow.runtime.Runtime.account` builds it."""
    name = {"mobilgroup": "user_id", "accolades": "account", "ozeki": "username", "smsc": "system_id"}[provider]
    return f"{provider}:{getattr(sim, name)}"


def arrivals(provider: str, sim) -> tuple[list[tuple[float, tuple]], int]:
    """(time, (recipient, text)) of every request the provider accepted, and how many it refused as identical."""
    if provider == "smsc":
        submits = sim.events("submit")
        return ([(e["time"], (e["destination_addr"], e["text"])) for e in submits if e["status"] == 0],
                sum(bool(e["identical"]) for e in submits))
    recipient = "recipient" if provider == "ozeki" else "phone"
    events = [e for e in sim.events("send") if e.get("outcome", "accepted") == "accepted"]
    return [(e["time"], (e[recipient], e["message"])) for e in events], 0


@contextmanager
def database(server_url: str):
    """A fresh database with asterCC's tables and ours; dropped afterwards."""
    name = f"sms_fleet_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url + "/", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    url = f"{server_url}/{name}?charset=utf8mb4"
    try:
        schema.create_astercc(engine_for(url))
        schema.upgrade(url)
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@contextmanager
def redis_prefix(url: str):
    """A key prefix for this run on `url`; every key under it is deleted afterwards."""
    prefix = f"fleetbench-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url, socket_timeout=5)
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.close()


@contextmanager
def celery_processes(env: dict[str, str], args, log_dir: Path):
    """Beat and the workers, each in its own process group; all stopped on exit (SIGTERM, then SIGKILL)."""
    commands = [["beat", "-s", str(log_dir / "beat-schedule")]] + [
        ["worker", "-P", pool_option(args.pool), "-c", str(args.concurrency), "-Q", f"dispatch,send.{args.provider}",
         "-n", f"fleet{i}-{uuid.uuid4().hex[:6]}@%h", "--without-mingle", "--without-gossip"]
        for i in range(args.workers)]
    procs: list[CeleryProcess] = []
    try:
        for i, command in enumerate(commands):
            procs.append(CeleryProcess([*command, "-l", "info"], env, log_dir / f"{command[0]}-{i}.log"))
        yield
    finally:
        stop_all(procs)


def _burn(parent: int) -> None:
    while os.getppid() == parent:  # ends with the benchmark, however that ends
        for _ in range(100_000):
            pass


@contextmanager
def busy(processes: int):
    """`processes` processes that keep a core busy each, at normal priority, until exit."""
    burners = [multiprocessing.get_context("spawn").Process(target=_burn, args=(os.getpid(),), daemon=True)
               for _ in range(processes)]
    try:
        for burner in burners:
            burner.start()
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.join(timeout=5)


def insert_rows(url: str, count: int, identical: int) -> None:
    """`count` distinct due rows, message i due `i + 1` seconds ago (later ids due earlier), then
    copies of the last `identical` ones (sent just before them, so the rule is exercised), due now."""
    messages = [(f"+7 916 {400 + i // 10_000:03d}-{(i // 100) % 100:02d}-{i % 100:02d}", f"Your order {i} is ready.")
                for i in range(count)]
    messages += messages[count - identical:]
    with engine_for(url).begin() as conn:
        for n, (target, body) in enumerate(messages):
            due_ago = n + 1 if n < count else 0  # seconds before now: the later id, the earlier due
            archive = conn.execute(text(
                "INSERT INTO cc10_batchcontact_archives (archivetype, content) VALUES ('sms', :c)"),
                {"c": body}).lastrowid
            conn.execute(text(
                "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
                " created) VALUES (:a, :t, 'new', NOW() - INTERVAL :s SECOND, 'bench', NOW())"),
                {"a": archive, "t": target, "s": due_ago})


def statuses(url: str) -> dict[int, tuple[str, int | None]]:
    with engine_for(url).connect() as conn:
        return {r.id: (r.status, r.attempts) for r in conn.execute(text(
            "SELECT b.id, b.status, d.attempts FROM cc10_batchcontacts b"
            " LEFT JOIN sms_dispatch d ON d.batchcontact_id = b.id"))}


def due_order_share(due_order: list[int], sent_at: dict[int, float], samples: int = 200_000) -> float:
    """The share of message pairs (sampled) sent in their due order (`due_order`: keys of `sent_at`, oldest first)."""
    ranked = [sent_at[i] for i in due_order]
    if len(ranked) < 2:
        return 1.0
    rng = random.Random(1)
    pairs = [sorted(rng.sample(range(len(ranked)), 2)) for _ in range(samples)]
    return sum(ranked[a] <= ranked[b] for a, b in pairs) / samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=PROVIDERS, default="mobilgroup")
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
    parser.add_argument("--rate", type=float, default=20.0, help="SMS_<PROVIDER>_RATE, messages per second")
    parser.add_argument("--count", type=int, default=400, help="distinct messages")
    parser.add_argument("--identical", type=int, default=3, help="how many of them are sent a second time")
    parser.add_argument("--identical-s", type=float, default=10.0, help="SMS_<PROVIDER>_IDENTICAL_S")
    parser.add_argument("--latency", type=float, default=0.0, help="the simulator's delay per answer, s")
    parser.add_argument("--dispatch-batch", type=int, default=500, help="SMS_DISPATCH_BATCH")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--mariadb", default=os.environ.get("SMS_TEST_MARIADB", "mysql+mysqldb://root@127.0.0.1:3306"))
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--busy", type=int, default=0, help="processes burning CPU beside the run")
    args = parser.parse_args(argv)
    if not 0 <= args.identical <= args.count:
        parser.error("--identical must be between 0 and --count")

    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    with ExitStack() as stack:
        db_url = stack.enter_context(database(args.mariadb))
        prefix = stack.enter_context(redis_prefix(redis_url))
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-rate-")))
        sim, provider_env = simulator(args.provider, args)
        sim.start()
        stack.callback(sim.stop)
        insert_rows(db_url, args.count, args.identical)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "CELERY_"))}
        env.update(provider_env, PYTHONUNBUFFERED="1", SMS_DATABASE_URL=db_url, CELERY_BROKER_URL=redis_url,
                   SMS_REDIS_PREFIX=prefix, SMS_THROTTLE_PREFIX=prefix, SMS_VAR_DIR=str(log_dir),
                   SMS_DEFAULT_PROVIDER=args.provider,
                   SMS_DISPATCH_INTERVAL_S="1", SMS_DISPATCH_BATCH=str(args.dispatch_batch),
                   SMS_RETRY_BASE_S="0.5", SMS_RETRY_MAX_S="2",
                   **{f"SMS_{args.provider.upper()}_RATE": str(args.rate),
                      f"SMS_{args.provider.upper()}_IDENTICAL_S": str(args.identical_s)})
        stack.enter_context(busy(args.busy))
        stack.enter_context(celery_processes(env, args, log_dir))
        deadline = time.monotonic() + args.timeout
        while True:
            rows = statuses(db_url)
            if all(status in FINAL for status, _ in rows.values()):
                break
            if time.monotonic() > deadline:
                print(f"timed out after {args.timeout:g} s: {sum(s not in FINAL for s, _ in rows.values())} "
                      f"rows not final; logs were in {log_dir}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        throttle = RedisThrottle(redis_url, prefix=prefix + KEY_PREFIX)
        account = account_of(args.provider, sim)
        throttled = throttle.throttled_count(account)
        given_back, lateness = throttle.given_back_count(account), sorted(throttle.lateness(account))
        throttle.close()

    sent, refused_identical = arrivals(args.provider, sim)
    times = [at for at, _ in sent]
    by_message: dict[tuple, list[float]] = {}
    for at, key in sent:
        by_message.setdefault(key, []).append(at)
    gaps = [smallest_gap(group) for group in by_message.values() if len(group) > 1]
    distinct = sorted(min(group) for group in by_message.values())
    took = distinct[-1] - distinct[0] if len(distinct) > 1 else 0.0
    ideal = args.count / args.rate
    # Message i is due i + 1 seconds ago: the due order is i descending. i is read back from the text.
    first_by_number = {int(ORDER.search(str(key[1])).group(1)): min(group) for key, group in by_message.items()}
    in_due_order = due_order_share(sorted(first_by_number, reverse=True), first_by_number)
    not_success = sum(status != "success" for status, _ in rows.values())
    attempts = max((a or 0) for _, a in rows.values())

    print(f"provider {args.provider}, {args.workers} worker(s) x {args.concurrency} ({args.pool}), "
          f"limit {args.rate:g}/s, {args.count} messages + {args.identical} identical, rule {args.identical_s:g} s, "
          f"simulator latency {args.latency:g} s, dispatch batch {args.dispatch_batch}, {args.busy} CPU burner(s)")
    print(f"achieved rate             {(len(distinct) - 1) / took:.2f} messages/s" if took else "achieved rate n/a")
    widest = largest_window(times)
    ordered = sorted(times)
    at = next(t for t in ordered if largest_window([u for u in ordered if t <= u < t + 1]) == widest)
    print(f"largest one-second window {widest} (limit {args.rate:g}), from {at - ordered[0]:.2f} s into the run")
    print(f"batch time                {took:.2f} s = {took / ideal:.1%} of count/rate ({ideal:.2f} s)")
    print("smallest identical gap    " + (f"{min(gaps):.2f} s over {len(gaps)} message(s) (rule {args.identical_s:g} s)"
                                          if gaps else "n/a (no identical requests)"))
    if args.provider == "smsc":
        print(f"refused as identical      {refused_identical} submits")
    print(f"sent in due order         {in_due_order:.1%} of row pairs")
    print(f"told to wait (throttle)   {throttled} acquire calls")
    if len(lateness) > 1:
        cuts = statistics.quantiles(lateness, n=100, method="inclusive")
        print(f"wake-up after slot        p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms, "
              f"max {lateness[-1] * 1000:.1f} ms over {len(lateness)} wake-ups; {given_back} slot(s) given back "
              f"(woke over {SEND_WITHIN_S * 1000:g} ms late)")
    print(f"rows not success          {not_success}; most attempts on one row {attempts}")
    return 0 if not_success == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
