"""A campaign day, measured: two campaigns and an agent's single messages through real workers, beat, Redis,
MariaDB and the Mobilgroup simulator at the provider's rate limit.

The scenario (`play`): campaign A (`--first` rows) falls due at T; campaign B (`--second` rows) at
T + `--second-after`; a single message falls due every `--singles-every` seconds from T + 1 until A's rows
are done, every other one created by A's own `creby`. Printed: each single's time from falling due to the
provider's acceptance (p50, p99, max), B's share of the provider's sends in its first `--window` seconds,
the share of the rate limit used from the first campaign row sent to the last, and how many requests reached the
provider twice. `tests/test_campaigns.py` runs a shorter version and asserts it.

    .venv/bin/python bench/campaign_day.py                         # 3,000 + 1,500 rows at 40 msg/s
    .venv/bin/python bench/campaign_day.py --first 20000 --second 0 --rate 40   # singles beside 20,000 rows
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Figures:
    singles_s: list[float]
    """Each single's seconds from falling due to the provider's acceptance (inf: never accepted)."""
    second_share: float | None
    """Of the sends in B's first `window_s` seconds, the share that were B's (None: no B)."""
    used: float
    """Campaign and single sends from the first campaign row's acceptance to the last one's, over that time ×
    the rate (the rate limit's share used while a backlog waits)."""
    twice: int
    """Rows whose request the provider accepted more than once."""
    sent: int
    rows: int

    def lines(self, window_s: float) -> list[str]:
        singles = sorted(self.singles_s)
        q = statistics.quantiles(singles, n=100, method="inclusive") if len(singles) > 1 else singles * 99
        out = [f"singles: {len(singles)}, due → accepted p50 {q[49]:.2f} s, p99 {q[98]:.2f} s, max {singles[-1]:.2f} s",
               f"rate limit used: {self.used:.1%}",
               f"rows sent: {self.sent} of {self.rows}; sent twice: {self.twice}"]
        if self.second_share is not None:
            out.insert(1, f"second campaign's share of the sends in its first {window_s:g} s: {self.second_share:.1%}")
        return out


def number(i: int) -> str:
    """Distinct valid Russian mobile numbers, typed as agents type them."""
    return f"+7 916 {300 + i // 10_000:03d}-{(i // 100) % 100:02d}-{i % 100:02d}"


def play(engine, sim, *, rate: float, first: int, second: int, second_after_s: float, window_s: float,
         singles_every_s: float, timeout_s: float, lead_s: float = 3) -> Figures:
    """Insert the scenario's rows into asterCC's tables (`engine`), T `lead_s` from now on a whole second,
    while beat and workers already run against `sim`; wait until every row is final; return the figures."""
    from db import store
    from tests.conftest import insert_campaign

    start = int(time.time() + lead_s) + 1
    t_first, t_second = start, start + second_after_s
    a = insert_campaign(engine, [number(i) for i in range(first)], "Spring sale: 20% off all week",
                        due=datetime.fromtimestamp(t_first))
    b = insert_campaign(engine, [number(100_000 + i) for i in range(second)], "New branch opens on Monday",
                        due=datetime.fromtimestamp(t_second)) if second else []
    singles: dict[int, float] = {}
    count = int(first / rate / singles_every_s)
    for k in range(max(count, 1)):
        due = start + 1 + k * singles_every_s
        [row] = insert_campaign(engine, [number(200_000 + k)], f"Your courier arrives at {10 + k % 8}:00",
                                creby="campaigns" if k % 2 else f"agent{k}", due=datetime.fromtimestamp(due))
        singles[row] = due
    rows = len(a) + len(b) + len(singles)
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = store.counts(engine)
        open_rows = statuses.get("new", 0) + statuses.get("pending", 0)
        if not open_rows:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{open_rows} rows still open after {timeout_s} s")
        time.sleep(0.5)

    accepted = [e for e in sim.events("send") if e["outcome"] == "accepted"]
    first_at: dict[int, float] = {}
    for event in accepted:
        first_at.setdefault(int(event["id"]), event["time"])
    ours = set(a) | set(b) | set(singles)
    first_at = {i: t for i, t in first_at.items() if i in ours}
    twice = sum(n > 1 for n in Counter(int(e["id"]) for e in accepted).values())
    singles_s = [first_at.get(row, float("inf")) - due for row, due in singles.items()]
    share = None
    if b:
        in_window = [int(e["id"]) for e in accepted if t_second <= e["time"] < t_second + window_s]
        b_ids = set(b)
        share = sum(i in b_ids for i in in_window) / max(len(in_window), 1)
    campaign_ids = set(a) | set(b)
    sent_at = sorted(first_at[i] for i in campaign_ids if i in first_at)
    used = sum(1 for t in first_at.values() if sent_at[0] <= t <= sent_at[-1]) / ((sent_at[-1] - sent_at[0]) * rate)
    return Figures(singles_s, share, used, twice, len(first_at), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mariadb", default="mysql+mysqldb://root@127.0.0.1:3306")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--first", type=int, default=3000)
    parser.add_argument("--second", type=int, default=1500)
    parser.add_argument("--second-after", type=float, default=30)
    parser.add_argument("--window", type=float, default=20)
    parser.add_argument("--singles-every", type=float, default=5)
    parser.add_argument("--dispatch-interval", type=float, default=2)
    args = parser.parse_args()

    import redis
    from sqlalchemy import create_engine, text

    from db import schema
    from db.engine import engine_for
    from simulators.mobilgroup import MobilgroupSimulator
    from smsctl.processes import CeleryProcess, stop_all
    from tests.conftest import app_env

    name = f"sms_campaigns_{uuid.uuid4().hex[:8]}"
    prefix = f"{name}:"
    admin = create_engine(args.mariadb + "/", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    url = f"{args.mariadb}/{name}?charset=utf8mb4"
    sim = MobilgroupSimulator()
    processes = []
    try:
        engine = engine_for(url)
        schema.create_astercc(engine)
        schema.upgrade(url)
        sim.start()
        env = app_env(url, args.redis, SMS_REDIS_PREFIX=prefix, SMS_DEFAULT_PROVIDER="mobilgroup",
                      SMS_MOBILGROUP_URL=sim.api_url, SMS_MOBILGROUP_USER_ID=sim.user_id,
                      SMS_MOBILGROUP_USER=sim.user, SMS_MOBILGROUP_PASSWORD=sim.password,
                      SMS_MOBILGROUP_RATE=args.rate, SMS_DISPATCH_INTERVAL_S=args.dispatch_interval)
        logs = Path(tempfile.mkdtemp(prefix="campaign-day-"))
        processes.append(CeleryProcess(["worker", "-l", "info", "-Q", "dispatch,send.mobilgroup",
                                        "--without-mingle", "--without-gossip"], env, logs / "worker.log"))
        processes.append(CeleryProcess(["beat", "-l", "info", "-s", str(logs / "beat")], env, logs / "beat.log"))
        time.sleep(6)  # the worker's start-up (imports, connections), before anything falls due
        figures = play(engine, sim, rate=args.rate, first=args.first, second=args.second,
                       second_after_s=args.second_after, window_s=args.window, singles_every_s=args.singles_every,
                       timeout_s=(args.first + args.second) / args.rate * 3 + 120)
        print(f"campaign A {args.first} rows at T, campaign B {args.second} rows at T+{args.second_after:g} s, "
              f"rate limit {args.rate:g}/s, dispatch every {args.dispatch_interval:g} s (logs: {logs})")
        for line in figures.lines(args.window):
            print(line)
    finally:
        stop_all(processes)
        sim.stop()
        client = redis.Redis.from_url(args.redis)
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


if __name__ == "__main__":
    main()
