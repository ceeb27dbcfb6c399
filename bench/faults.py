"""The fault bench: a deploy, a crash, a Redis restart and a MariaDB outage in the middle of a batch, and a paused
provider beside a healthy one, each against real MariaDB, Redis, `celery worker` / `celery beat` processes
(the plain worker: threads, 64 of them, every queue) and the provider simulators; faults on loopback through
`simulators.proxy.FaultProxy`. The scenarios are `bench/fault_scenarios.py`'s, which the tests run smaller.

Prints, per fault: messages lost (never accepted by the provider), sent twice (accepted more than once), in
flight at the fault (rows a worker was sending), queued at the fault (rows in the broker or a worker's
prefetch), seconds from the fault's end (the new worker started, the server back) to the provider's next
accepted send, and to the last row settled; for the paused provider beside a healthy one, the healthy
provider's due→sent p50/p99 and how many requests the paused one received; and for a Mobilgroup that loses
30% of its answers after processing the request (`lossy`), how long the rows took to settle, how many were
accepted twice, sent again after a lost confirmation, or counted a lost confirmation as a failure.

    .venv/bin/python bench/faults.py
    .venv/bin/python bench/faults.py --only crash --log-dir /tmp/faults

Shortened settings, as in the tests: `SMS_SEND_LEASE_S=30` in the crash (180 s by default),
`SMS_ACCOUNT_RETRY_S=5` and `SMS_ACCOUNT_RETRY_WINDOW_S=60` for the paused provider (300 s and a day).
A throw-away database and user, and a Redis key prefix of the run's own, are removed at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import fault_scenarios as scenarios  # noqa: E402
from bench.e2e import bench_database  # noqa: E402
from smsctl.processes import CeleryProcess, stop_all  # noqa: E402
from workflow.send import CONFIRM_TRIES  # noqa: E402

QUEUES = "dispatch,send.mobilgroup,send.accolades,send.ozeki,send.smsc"
TABLES = ("cc10_batchcontacts", "cc10_batchcontact_archives", "sms_dispatch", "sms_message_ids", "sms_breaker")

FAULTS = {
    "deploy": lambda stage, n: scenarios.deploy(stage, rows=n, latency_s=3.0, timeout_s=600),
    "crash": lambda stage, n: scenarios.crash(stage, rows=n, latency_s=3.0, lease_s=30, timeout_s=600),
    "redis": lambda stage, n: scenarios.redis_loss(stage, rows=n * 2, rate=50, outage_s=15, timeout_s=600),
    "mariadb": lambda stage, n: scenarios.database_loss(stage, rows=n * 2, rate=50, outage_s=30, timeout_s=600),
    # Sends in flight (a provider answering in 2 s) while MariaDB is away for longer than half a send's lease.
    "mariadb-150s": lambda stage, n: scenarios.database_loss(stage, rows=n // 2, latency_s=2.0, rate=20,
                                                             outage_s=150, timeout_s=900, name="MariaDB 150 s"),
    "clock": lambda stage, n: scenarios.clock_jump(stage, rows=n // 2, latency_s=2.0, rate=20, timeout_s=600),
}


class Processes:
    """`start(kind, env, *args)` for the scenarios: Celery processes logging to `log_dir`, all stopped by
    `stop()`."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[CeleryProcess] = []

    def __call__(self, kind: str, env: dict[str, str], *extra: str) -> CeleryProcess:
        n = len(self.started)
        if kind == "worker":
            args = ["worker", "-l", "info", "-n", f"fault{n}-{uuid.uuid4().hex[:6]}@%h", "--without-mingle",
                    "--without-gossip", "-Q", QUEUES]
        else:
            args = [kind, "-l", "info", "-s", str(self.log_dir / f"beat-{n}")]
        process = CeleryProcess(args + list(extra), env, self.log_dir / f"{kind}-{n}.log")
        self.started.append(process)
        return process

    def stop(self) -> None:
        stop_all(self.started)
        self.started.clear()


def env_maker(prefix: str, var_dir: Path):
    def env(database_url: str, broker_url: str, **settings) -> dict[str, str]:
        out = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "CELERY_"))}
        out.update(PYTHONUNBUFFERED="1", SMS_VAR_DIR=str(var_dir), SMS_DATABASE_URL=database_url,
                   CELERY_BROKER_URL=broker_url, SMS_REDIS_PREFIX=prefix, SMS_THROTTLE_PREFIX=prefix)
        out.update({k: str(v) for k, v in settings.items()})
        return out
    return env


def reset(stage: scenarios.Stage) -> None:
    """Empty the tables and this run's Redis keys between scenarios."""
    with stage.engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"TRUNCATE TABLE {table}"))
    scenarios.empty_redis(stage)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_faults(runs: list[scenarios.FaultRun]) -> None:
    print(f"\n{'fault':<14}{'rows':>6}{'lost':>6}{'sent twice':>12}{'not success':>13}{'in flight':>11}{'queued':>8}"
          f"{'unknown':>9}{'resumed (s)':>13}{'all done (s)':>14}")
    for run in runs:
        print(f"{run.scenario:<14}{run.rows:>6}{len(run.lost):>6}{len(run.doubled):>12}{len(run.not_success):>13}"
              f"{len(run.in_flight):>11}{len(run.held):>8}{len(run.unknown):>9}{fmt(run.resumed_s):>13}"
              f"{fmt(run.rest_s):>14}")
    print("not success: rows whose asterCC status is not `success` at the end; "
          "in flight / queued: rows being sent / in the broker at the fault; unknown: rows settled as unknown "
          "outcomes (a lease ran out); resumed: from the fault's end (new worker started, server back) to the "
          "provider's next accepted send; all done: to the last row settled")


def print_isolation(run: scenarios.IsolationRun, paused: int, healthy: int) -> None:
    print(f"\npaused provider beside a healthy one: {paused} Mobilgroup rows refused 'no money' (error 9), "
          f"{healthy} Accolades rows")
    print(f"{'Accolades due→sent p50 (s)':<34}{run.percentile(0.5):>8.2f}")
    print(f"{'Accolades due→sent p99 (s)':<34}{run.percentile(0.99):>8.2f}")
    print(f"{'Mobilgroup requests':<34}{len(run.troubled_requests):>8}")
    ends = sorted({run.outcomes[i][0] for i in run.troubled})
    print(f"{'Mobilgroup rows ended':<34}{', '.join(ends):>8}")


def print_lossy(run: scenarios.LossyRun) -> None:
    # Sent again after a lost confirmation: only once the send's own and CONFIRM_TRIES more were all lost.
    resent = [i for i, h in run.histories.items()
              if any(c == "send" and prev == ("status", True) for prev, (c, _) in zip(h, h[1:]))]
    overcounted = [i for i, h in run.histories.items() if run.failures[i] > h.count(("send", True))]
    print(f"\nMobilgroup losing 30% of its answers after processing: {run.rows} rows")
    print(f"{'all settled after (s)':<44}{run.settled_s:>8.1f}")
    print(f"{'rows success':<44}{sum(1 for _, st, _ in run.outcomes.values() if st == 'success'):>8}")
    print(f"{'request ids accepted twice':<44}{sum(1 for n in run.accepted.values() if n > 1):>8}")
    print(f"{'answers lost: sends / confirmations':<44}{run.lost['send']:>8} / {run.lost['status']}")
    print(f"{f'rows sent again after {1 + CONFIRM_TRIES} lost confirmations':<44}{len(resent):>8}")
    print(f"{'rows counting a lost confirmation a failure':<44}{len(overcounted):>8}")
    print(f"{'most failures of one row':<44}{max(run.failures.values()):>8}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=600,
                   help="rows of the deploy and crash batches (Redis and MariaDB: twice as many; default 600)")
    p.add_argument("--paused-rows", type=int, default=1000)
    p.add_argument("--healthy-rows", type=int, default=200)
    p.add_argument("--lossy-rows", type=int, default=2000)
    p.add_argument("--only", choices=[*FAULTS, "paused", "lossy"], action="append", help="run only these scenarios")
    p.add_argument("--log-dir", help="keep the Celery logs here (default: a temporary folder)")
    p.add_argument("--mariadb", default=os.environ.get("SMS_BENCH_MARIADB", "mysql+mysqldb://root@127.0.0.1:3306"))
    p.add_argument("--redis", default=os.environ.get("SMS_BENCH_REDIS", "redis://127.0.0.1:6379/15"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = args.only or [*FAULTS, "paused", "lossy"]
    with ExitStack() as stack:
        bench = stack.enter_context(bench_database(args.mariadb))
        log_root = Path(args.log_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sms-faults-")))
        prefix = f"{bench.name}:"
        runs, isolation, lossy = [], None, None
        for name in chosen:
            log_dir = log_root / name
            log_dir.mkdir(parents=True, exist_ok=True)
            processes = Processes(log_dir)
            stage = scenarios.Stage(bench.admin, bench.app_url, args.redis, prefix, env_maker(prefix, log_dir),
                                    processes, log_dir)
            reset(stage)
            print(f"{name}…", flush=True)
            try:
                if name == "paused":
                    isolation = scenarios.paused_beside_healthy(stage, args.paused_rows, args.healthy_rows,
                                                                window_s=60, timeout_s=600)
                elif name == "lossy":
                    lossy = scenarios.lossy_mobilgroup(stage, args.lossy_rows, lost_rate=0.3, timeout_s=900)
                else:
                    runs.append(FAULTS[name](stage, args.rows))
            finally:
                processes.stop()
        reset(stage)
        if runs:
            print_faults(runs)
        if isolation:
            print_isolation(isolation, args.paused_rows, args.healthy_rows)
        if lossy:
            print_lossy(lossy)
        print(f"\nsettings shortened for time: SMS_SEND_LEASE_S=30 (crash); SMS_ACCOUNT_RETRY_S=5, "
              f"SMS_ACCOUNT_RETRY_WINDOW_S=60, SMS_MOBILGROUP_IDENTICAL_S=1 (paused); {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
