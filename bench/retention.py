"""Measure `db.retention.prune` on MariaDB: how long it takes to prune a backlog, and what a call costs when
nothing is due, as emptied records (which stay) pile up.

A throw-away database gets `--kept` emptied records (final, older than the retention), `--due` records to
prune (half Accolades, half Mobilgroup, each with two provider ids; all emptied) and `--recent` final
records inside the retention. It prints the time of the pruning calls (`--batch`
rows per transaction) and then of calls that find nothing to do.

    .venv/bin/python bench/retention.py --kept 200000 --due 20000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import func, insert, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import bench_database  # noqa: E402
from db.engine import engine_for  # noqa: E402
from db.models import Dispatch, MessageId  # noqa: E402
from db.retention import EMPTIED_MARK, prune  # noqa: E402

DAYS = 90
CHUNK = 5000


def fill(engine, start: int, count: int, *, provider: str, age_days: int, emptied: bool) -> None:
    for first in range(start, start + count, CHUNK):
        ids = range(first, min(first + CHUNK, start + count))
        with engine.begin() as conn:
            old = conn.scalar(select(func.now() - text(f"INTERVAL {age_days} DAY")))
            conn.execute(insert(Dispatch), [{
                "batchcontact_id": i, "claim_token": "b", "provider": provider, "state": "delivered",
                "recipient": None if emptied else "79031234567", "attempts": 1, "parts": 1,
                "provider_message_id": None if emptied else f"m{i}", "resends": 0,
                "created_at": old, "updated_at": EMPTIED_MARK if emptied else old} for i in ids])
            if not emptied:
                conn.execute(insert(MessageId), [{"provider": provider, "provider_message_id": f"m{i}-{k}",
                                                  "batchcontact_id": i} for i in ids for k in range(2)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mariadb", default="mysql+mysqldb://root@127.0.0.1:3306")
    parser.add_argument("--kept", type=int, default=200_000, help="emptied records already there")
    parser.add_argument("--due", type=int, default=20_000, help="records to prune")
    parser.add_argument("--recent", type=int, default=20_000, help="final records inside the retention")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--idle-calls", type=int, default=5)
    args = parser.parse_args()

    with bench_database(args.mariadb) as bench:
        engine = engine_for(bench.admin_url)
        fill(engine, 1, args.kept, provider="mobilgroup", age_days=DAYS + 200, emptied=True)
        half = args.due // 2
        fill(engine, args.kept + 1, half, provider="accolades", age_days=DAYS + 1, emptied=False)
        fill(engine, args.kept + half + 1, args.due - half, provider="mobilgroup", age_days=DAYS + 1,
             emptied=False)
        fill(engine, args.kept + args.due + 1, args.recent, provider="accolades", age_days=1, emptied=False)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE TABLE sms_dispatch, sms_message_ids"))

        started, pruned, calls = time.perf_counter(), 0, 0
        while True:
            done = prune(engine, DAYS, batch=args.batch, max_batches=1)
            calls += 1
            pruned += done
            if done < args.batch:
                break
        backlog_s = time.perf_counter() - started
        idle = []
        for _ in range(args.idle_calls):
            started = time.perf_counter()
            assert prune(engine, DAYS, batch=args.batch) == 0
            idle.append(time.perf_counter() - started)

        print(f"records: {args.kept} emptied ones kept, {args.due} due, {args.recent} recent")
        print(f"pruned                         {pruned}")
        print(f"backlog, total (s)             {backlog_s:.2f}")
        print(f"backlog, per {args.batch}-row batch (ms)  {1000 * backlog_s / calls:.1f}")
        print(f"call with nothing due (ms)     {1000 * statistics.median(idle):.1f}")


if __name__ == "__main__":
    main()
