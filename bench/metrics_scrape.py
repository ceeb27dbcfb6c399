"""How long one `smsctl metrics` scrape (and so one `smsctl status` screen) takes on a big `sms_dispatch`.

Makes a throw-away MariaDB database with our tables, fills `sms_dispatch` with `--rows` rows spread over the
retention period as a busy deployment leaves them (most final, a backlog waiting, an hour's sends and
reports), then times `--scrapes` scrapes through the real collector and prints the figures. The database is
dropped at the end.

    .venv/bin/python bench/metrics_scrape.py --rows 1000000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import bench_database  # noqa: E402
from db import stats  # noqa: E402
from db.engine import engine_for  # noqa: E402
from settings import load_settings  # noqa: E402
from smsctl.metrics import registry  # noqa: E402

# Row n's provider, state and wait reason, by n modulo 100: 4 providers; 1 % waiting (a backlog), 0.3 %
# in flight, the rest final, most of them delivered.
FILL = """
INSERT INTO sms_dispatch (batchcontact_id, claim_token, provider, state, wait_reason, attempts, parts, polls,
    resends, unknowns, failures, due_at, claimed_at, accepted_at, created_at, updated_at)
SELECT seq, 'bench', ELT(1 + seq % 4, 'mobilgroup', 'accolades', 'ozeki', 'smsc'),
    CASE WHEN seq % 100 = 0 THEN 'waiting' WHEN seq % 1000 IN (1, 2, 3) THEN 'queued'
         WHEN seq % 100 IN (5, 6) THEN 'failed' WHEN seq % 100 = 7 THEN 'error'
         WHEN seq % 100 < 20 THEN 'accepted' WHEN seq % 100 < 30 THEN 'unconfirmed' ELSE 'delivered' END,
    IF(seq % 100 = 0, ELT(1 + seq % 3, 'room', 'retry', 'throttled'), NULL), 1, 1, 0, 0, 0, 0,
    NOW() - INTERVAL (seq * :span DIV :rows) SECOND, NOW() - INTERVAL (seq * :span DIV :rows) SECOND,
    IF(seq % 100 IN (0, 7) OR seq % 1000 IN (1, 2, 3), NULL, NOW() - INTERVAL (seq * :span DIV :rows) SECOND + INTERVAL 3 SECOND),
    NOW() - INTERVAL (seq * :span DIV :rows) SECOND, NOW() - INTERVAL (seq * :span DIV :rows) SECOND + INTERVAL 40 SECOND
FROM seq_1_to_{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mariadb", default="mysql+mysqldb://root@127.0.0.1:3306")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90, help="the rows' due times spread over this many days")
    parser.add_argument("--scrapes", type=int, default=10)
    args = parser.parse_args()

    with bench_database(args.mariadb) as bench:
        url = bench.admin_url
        engine = engine_for(url)
        began = time.monotonic()
        with engine.begin() as conn:
            conn.execute(text(FILL.format(rows=args.rows)), {"span": args.days * 86_400, "rows": args.rows})
            conn.execute(text("ANALYZE TABLE sms_dispatch"))
        print(f"filled sms_dispatch with {args.rows:,} rows over {args.days} days in {time.monotonic() - began:.1f} s")
        settings = load_settings(database_url=url, default_provider="mobilgroup", routes="40=accolades,44=ozeki,49=smsc")
        collector = registry(settings, engine)
        times = []
        for _ in range(args.scrapes):
            began = time.monotonic()
            samples = sum(len(family.samples) for family in collector.collect())
            times.append(time.monotonic() - began)
        print(f"{args.scrapes} scrapes of {samples} samples: median {statistics.median(times) * 1000:.0f} ms, "
              f"slowest {max(times) * 1000:.0f} ms")
        parts = {"messages (retention totals)": lambda: stats.messages(engine, 90),
                 "open rows by reason": lambda: stats.open_rows(engine), "last hour": lambda: stats.last_hour(engine),
                 "due-to-sent histogram": lambda: stats.due_to_sent(engine),
                 "report-delay histogram": lambda: stats.report_delay(engine)}
        for what, read in parts.items():
            took = []
            for _ in range(3):
                began = time.monotonic()
                read()
                took.append(time.monotonic() - began)
            print(f"  {what}: median {statistics.median(took) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
