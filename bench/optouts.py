"""Ending a tick's opted-out campaign rows, measured: one transaction for all of them
(`db.store.refuse_waiting`, what the dispatch tick does) beside one `finish_failed` transaction per row (what
it did before), on the same rows of a fresh MariaDB database, each way `--repeats` times, alternating.

A campaign to a list where many numbers replied STOP ends up to 1,000 such rows per tick
(`store.opted_out_waiting`'s limit); every other provider's rows wait for that tick.

    .venv/bin/python bench/optouts.py                 # 1,000 rows, 3 repeats
    .venv/bin/python bench/optouts.py --rows 200 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, text, update  # noqa: E402

from bench.e2e import bench_database, engine_for  # noqa: E402
from db import store  # noqa: E402
from db.models import BatchContact, BatchContactArchive, Dispatch  # noqa: E402
from workflow.campaigns import optout_reason  # noqa: E402

def seed(engine, rows: int) -> dict[int, str]:
    """A campaign of `rows` rows, claimed and routed to Mobilgroup, every recipient opted out. Returns each
    row's reason, as the tick words it."""
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content="Sale")
                               ).inserted_primary_key[0]
        conn.execute(insert(BatchContact), [dict(
            batchcontact_archive_id=archive, target=f"+7916{i:07d}", status="new", creby="campaigns",
            schedulertime=now, created=now, error_msg="", responsenote="") for i in range(rows)])
    claimed = store.claim_due(engine, rows)
    store.assign_routes(engine, {c.id: ("mobilgroup", f"7916{i:07d}") for i, c in enumerate(claimed)})
    for i in range(rows):
        store.add_optout(engine, f"7916{i:07d}", "STOP")
    return {row_id: optout_reason(o.word, o.opted_at)
            for row_id, o in store.opted_out_waiting(engine, ["mobilgroup"], limit=rows)}


def reset(engine) -> None:
    with engine.begin() as conn:
        conn.execute(update(Dispatch).values(state="waiting", wait_reason="room", last_error=None))
        conn.execute(update(BatchContact).values(status="pending", error_msg=""))


def per_row(engine, reasons: dict[int, str]) -> int:
    return sum(store.finish_failed(engine, row_id, reason) for row_id, reason in reasons.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mariadb", default=os.environ.get("SMS_BENCH_MARIADB", "mysql+mysqldb://root@127.0.0.1:3306"))
    args = p.parse_args(argv)
    with bench_database(args.mariadb) as bench:
        engine = engine_for(bench.app_url)
        reasons = seed(engine, args.rows)
        assert len(reasons) == args.rows, f"{len(reasons)} opted-out rows of {args.rows}"
        times: dict[str, list[float]] = {"one transaction": [], "one per row": []}
        for _ in range(args.repeats):
            for label, end in (("one transaction", store.refuse_waiting), ("one per row", per_row)):
                reset(engine)
                start = time.perf_counter()
                ended = end(engine, reasons)
                times[label].append(time.perf_counter() - start)
                assert ended == args.rows, f"{label}: {ended} rows ended of {args.rows}"
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT COUNT(*) FROM cc10_batchcontacts WHERE status = 'failed'")) == args.rows
    best = {label: statistics.median(t) for label, t in times.items()}
    print(f"{args.rows} opted-out rows ended, median of {args.repeats}:")
    for label, seconds in best.items():
        print(f"{label:16} {seconds * 1000:9.1f} ms")
    print(f"ratio            {best['one per row'] / best['one transaction']:9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
