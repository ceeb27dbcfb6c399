"""Submits per second over one smsc.ru SMPP session, with a window of submits in flight, beside one at a time.

Two measurements, against the SMSC simulator answering every `submit_sm` after `--latency` seconds (each
answer delayed on its own, as an SMSC answering a window does):

1. `session` (default): the SMPP client alone. `--threads` threads of one process share one `SmscClient`
   and send `--messages` one-part messages; printed for each `--windows` value (1 is one submit at a time,
   what the client did before it kept a window; measured over at most 200 messages).
2. `--worker`: the whole pipeline, as deployed: `--messages` asterCC rows due at once on a throw-away
   MariaDB database, `celery beat`, a dispatch worker, and ONE sending worker
   (`celery -A tasks worker -Q send.smsc --pool threads --concurrency 64`) holding one session. Printed:
   messages per second from the first submit to the last, whether each part reached the SMSC once, the
   binds, and whether every row ended `success`. The rate limit is raised (`SMS_SMSC_RATE=100000`) and the
   identical-request rule turned off so that neither caps the figure.

    .venv/bin/python bench/smpp_window.py --latency 0.05 --windows 1,64,300
    .venv/bin/python bench/smpp_window.py --worker --latency 0.05 --messages 1500
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet_rate import database, redis_prefix  # noqa: E402
from providers.base import OutgoingMessage  # noqa: E402
from providers.smsc import SmscClient  # noqa: E402
from simulators.smsc import SmscSimulator  # noqa: E402
from smsctl.processes import CeleryProcess, stop_all  # noqa: E402


def session_rate(latency_s: float, window: int, threads: int, messages: int) -> float:
    """Submits per second of `threads` threads sharing one client (one session) with `window`."""
    simulator = SmscSimulator(receipts=False, latency_s=latency_s, identical_window_s=0).start()
    client = SmscClient(host="127.0.0.1", port=simulator.port, system_id=simulator.system_id,
                        password=simulator.password, window=window, timeout=3600)
    try:
        client.send(OutgoingMessage(0, "79000000000", "bind first"))
        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda n: client.send(OutgoingMessage(n, f"7900{n:07d}", f"Order {n} is ready")),
                          range(1, messages + 1)))
        return messages / (time.monotonic() - started)
    finally:
        client.close()
        simulator.stop()


def insert_due_rows(url: str, count: int) -> None:
    from sqlalchemy import text

    from db.engine import engine_for

    with engine_for(url).begin() as conn:
        for n in range(count):
            archive = conn.execute(text(
                "INSERT INTO cc10_batchcontact_archives (archivetype, content) VALUES ('sms', :c)"),
                {"c": f"Order {n} is ready for pickup"}).lastrowid
            conn.execute(text(
                "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
                " created) VALUES (:a, :t, 'new', '0000-00-00 00:00:00', 'bench', NOW())"),
                {"a": archive, "t": f"+7 916 {n // 10_000:03d}-{(n // 100) % 100:02d}-{n % 100:02d}"})


def row_statuses(url: str) -> Counter:
    from sqlalchemy import text

    from db.engine import engine_for

    with engine_for(url).connect() as conn:
        return Counter(conn.execute(text("SELECT status FROM cc10_batchcontacts")).scalars())


def worker_run(args) -> int:
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    simulator = SmscSimulator(latency_s=args.latency, receipts=False, identical_window_s=0)
    with ExitStack() as stack:
        db_url = stack.enter_context(database(args.mariadb))
        prefix = stack.enter_context(redis_prefix(redis_url))
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smpp-window-")))
        simulator.start()
        stack.callback(simulator.stop)
        insert_due_rows(db_url, args.messages)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "CELERY_"))}
        env.update(PYTHONUNBUFFERED="1", SMS_DATABASE_URL=db_url, CELERY_BROKER_URL=redis_url,
                   SMS_REDIS_PREFIX=prefix, SMS_THROTTLE_PREFIX=prefix, SMS_VAR_DIR=str(log_dir),
                   SMS_DEFAULT_PROVIDER="smsc",
                   SMS_SMSC_HOST="127.0.0.1", SMS_SMSC_PORT=str(simulator.port),
                   SMS_SMSC_SYSTEM_ID=simulator.system_id, SMS_SMSC_PASSWORD=simulator.password,
                   SMS_SMSC_WINDOW=str(args.window), SMS_SMSC_RATE="100000", SMS_SMSC_IDENTICAL_S="0",
                   SMS_DISPATCH_INTERVAL_S="1", SMS_DISPATCH_BATCH="2000")
        name = uuid.uuid4().hex[:6]
        processes = [
            CeleryProcess(["beat", "-l", "info", "-s", str(log_dir / "beat")], env, log_dir / "beat.log"),
            CeleryProcess(["worker", "-l", "info", "-Q", "dispatch", "--pool", "threads", "--concurrency", "2",
                           "-n", f"dispatch-{name}@%h", "--without-mingle", "--without-gossip"],
                          env, log_dir / "dispatch.log"),
            CeleryProcess(["worker", "-l", "info", "-Q", "send.smsc", "--pool", "threads", "--concurrency",
                           str(args.concurrency), "-n", f"smsc-{name}@%h", "--without-mingle",
                           "--without-gossip"], env, log_dir / "smsc.log"),
        ]
        stack.callback(stop_all, processes)
        deadline = time.monotonic() + args.timeout
        while sum(row_statuses(db_url)[s] for s in ("success", "failed", "error")) < args.messages:
            if time.monotonic() > deadline:
                print(f"timed out after {args.timeout:g} s: {row_statuses(db_url)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        statuses = row_statuses(db_url)

    submits = simulator.events("submit")
    times = sorted(e["time"] for e in submits)
    per_part = Counter((e["destination_addr"], e["short_message"]) for e in submits)
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    print(f"one worker, --pool threads --concurrency {args.concurrency}, window {args.window}, "
          f"SMSC latency {args.latency * 1000:g} ms, {args.messages} one-part messages")
    print(f"messages/s (first to last submit)  {rate:.0f}")
    print(f"submits {len(submits)}, parts sent more than once {sum(n > 1 for n in per_part.values())}, "
          f"binds {[e['mode'] for e in simulator.events('bind')]}, most in flight at once {simulator.max_in_flight}")
    print(f"rows by status                     {dict(statuses)}")
    return 0 if statuses == Counter(success=args.messages) and max(per_part.values()) == 1 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="the SMSC's delay per answer, s")
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=64, help="session mode: threads sharing the client")
    parser.add_argument("--windows", default="1,64,300", help="session mode: windows to measure, comma-separated")
    parser.add_argument("--worker", action="store_true", help="the whole pipeline with one sending worker")
    parser.add_argument("--concurrency", type=int, default=64, help="worker mode: threads of the sending worker")
    parser.add_argument("--window", type=int, default=300, help="worker mode: SMS_SMSC_WINDOW")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--mariadb", default=os.environ.get("SMS_TEST_MARIADB", "mysql+mysqldb://root@127.0.0.1:3306"))
    parser.add_argument("--redis-db", type=int, default=13)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_run(args)
    print(f"one SMPP session, {args.threads} threads, {args.messages} one-part messages, "
          f"SMSC latency {args.latency * 1000:g} ms")
    print("window  submits/s")
    for window in (int(w) for w in args.windows.split(",")):
        # one at a time takes latency × messages: 200 of them tell its rate as well
        count, label = (min(args.messages, 200), "  (one at a time)") if window == 1 else (args.messages, "")
        print(f"{window:>6}  {session_rate(args.latency, window, args.threads, count):9.0f}{label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
