"""End-to-end benchmark of the dispatcher, side by side with the cron-script approach asterCC suggests.

One invocation, against MariaDB and Redis on this machine:

1. creates a throw-away database (asterCC's MyISAM tables and ours) and a throw-away MariaDB user, so that
   `information_schema.USER_STATISTICS` counts exactly the statements of the processes under test (other
   people's tests on the same server do not blur the figures; `userstat` is switched on for the run);
2. optionally buries everything under `--filler` finished rows, seeded with `INSERT … SELECT` from
   MariaDB's sequence engine;
3. starts the Mobilgroup simulator in this process (`--latency` seconds per answer), `celery beat` and
   `--workers` `celery worker` processes (`--pool`, `--concurrency`) on Redis DB `--redis-db`, every key
   under a prefix of this run's own (`SMS_REDIS_PREFIX`), deleted at the end;
4. light load: `--light-rows` rows fall due at `--light-rate` per second; the due-to-provider latency is
   measured (row due time → when the simulator received the request); before it, a warm-up batch that
   is not reported gives every pool process its first task (imports, connections);
5. burst: `--rows` rows fall due at one whole second; the run ends when every row is final. Measured:
   messages/s, latency p50/p99, statements per message (our user's `USER_STATISTICS`), peak
   RSS of each worker process, CPU seconds per 1,000 messages of workers + beat (psutil), of MariaDB (our
   user's `CPU_TIME`), of the simulator (this process) and of the Redis server (`INFO cpu`: other clients
   of that Redis count too), their sum, and the rate at which that sum would keep every core busy: the
   ceiling of this machine for this pipeline;
6. stops Celery, sets the same rows back to `new` and runs the baseline: what the seed's PHP cron script
   does (select the due rows, then per row mark it `pending`, POST it, write the outcome), in one thread,
   with the same HTTP client, stopping after `--baseline-max-s` (its rate is measured on what it did,
   its latency quantiles count the rows it never reached as later than that);
7. prints one table with both and their ratio, and drops the database and the user.

    .venv/bin/python bench/e2e.py --rows 6000 --workers 2 --plain --latency 0.2    # `celery -A tasks worker`
    .venv/bin/python bench/e2e.py --rows 10000 --workers 2 --concurrency 16 --pool threads --latency 0
    .venv/bin/python bench/e2e.py --tick-only --filler 1000000          # the dispatch tick alone

The provider's rate limit (`SMS_MOBILGROUP_RATE`) is raised and the identical-request rule turned off
(`SMS_MOBILGROUP_IDENTICAL_S=0`) so that neither caps the figures; the table says so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import MySQLdb
import psutil
import redis
from celery import Celery
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import redis_cpu, self_cpu  # noqa: E402
from db import schema, store  # noqa: E402
from db.engine import engine_for  # noqa: E402
from providers.base import OutgoingMessage, PermanentError, ProviderError  # noqa: E402
from providers.mobilgroup import MobilgroupClient  # noqa: E402
from simulators.mobilgroup import MobilgroupSimulator  # noqa: E402
from smsctl.processes import CeleryProcess, pool_option, stop_all  # noqa: E402

FINAL = ("success", "failed", "error")
QUEUES = "dispatch,send.mobilgroup"
UNCAPPED_RATE = 100_000
NOT_DUE = "2100-01-01 00:00:00"
CORES = os.cpu_count() or 1
STAT_COLUMNS = ("SELECT_COMMANDS", "UPDATE_COMMANDS", "OTHER_COMMANDS", "CPU_TIME")


# --- the database -------------------------------------------------------------------------------

@dataclass
class BenchDb:
    name: str
    admin_url: str      # root, on the bench database: seeding, progress, resets
    app_url: str        # the bench user: everything measured
    user: str

    @property
    def admin(self):
        return engine_for(self.admin_url)

    def user_stats(self) -> dict[str, float]:
        """This run's user's counters (statements, commits, CPU seconds) in MariaDB."""
        with self.admin.connect() as conn:
            row = conn.execute(text(f"SELECT {', '.join(STAT_COLUMNS)} FROM information_schema.USER_STATISTICS"
                                    " WHERE USER = :u"), {"u": self.user}).first()
        return dict(zip(STAT_COLUMNS, map(float, row))) if row else dict.fromkeys(STAT_COLUMNS, 0.0)


@contextmanager
def bench_database(server_url: str):
    """A fresh database with asterCC's tables and ours, and a user of its own; both dropped afterwards."""
    name = f"sms_bench_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    server = create_engine(server_url + "/", isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        userstat_was = conn.scalar(text("SELECT @@GLOBAL.userstat"))
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
        conn.execute(text(f"CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY '{password}'"))
        conn.execute(text(f"GRANT ALL ON {name}.* TO '{name}'@'127.0.0.1'"))
        conn.execute(text("SET GLOBAL userstat = 1"))
    host = server_url.split("@", 1)[1]
    bench = BenchDb(name, f"{server_url}/{name}?charset=utf8mb4",
                    f"mysql+mysqldb://{name}:{password}@{host}/{name}?charset=utf8mb4", name)
    try:
        schema.create_astercc(bench.admin)
        schema.upgrade(bench.admin_url)
        yield bench
    finally:
        for url in (bench.admin_url, bench.app_url):
            engine_for(url).dispose()
        with server.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            conn.execute(text(f"DROP USER IF EXISTS '{name}'@'127.0.0.1'"))
            if not userstat_was:
                conn.execute(text("SET GLOBAL userstat = 0"))
        server.dispose()


def seed_filler(bench: BenchDb, count: int) -> None:
    """`count` finished rows as a busy asterCC accumulates them: mostly zero-date `success`, some
    failed or error, scheduled over the last 90 days, each with its own archive row."""
    if count <= 0:
        return
    with bench.admin.begin() as conn:
        conn.execute(text("SET SESSION sql_mode = ''"))
        first = conn.execute(text(
            "INSERT INTO cc10_batchcontact_archives (archivetype, content)"
            f" SELECT 'sms', CONCAT('Your order ', seq, ' has shipped.') FROM seq_1_to_{count}")).lastrowid
        conn.execute(text(
            "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime,"
            " contacttime, creby, created, error_msg)"
            f" SELECT {first} + seq - 1, CONCAT('7915', LPAD(seq, 7, '0')),"
            "  ELT(1 + (seq % 100 >= 90) + (seq % 100 >= 97), 'success', 'failed', 'error'),"
            "  IF(seq % 10 < 7, '0000-00-00 00:00:00', NOW() - INTERVAL (seq % 129600) MINUTE),"
            "  NOW() - INTERVAL (seq % 129600) MINUTE, 'agent', NOW() - INTERVAL (seq % 129600) MINUTE,"
            "  IF(seq % 100 >= 90, 'not delivered', '')"
            f" FROM seq_1_to_{count}"))


def seed_rows(bench: BenchDb, count: int) -> list[int]:
    """`count` rows waiting (scheduled far ahead) with distinct numbers and texts; returns their ids."""
    with bench.admin.begin() as conn:
        conn.execute(text("SET SESSION sql_mode = ''"))
        first_archive = conn.execute(text(
            "INSERT INTO cc10_batchcontact_archives (archivetype, content)"
            f" SELECT 'sms', CONCAT('Order ', seq, ' is ready for pickup.') FROM seq_1_to_{count}")).lastrowid
        first = conn.execute(text(
            "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
            f" created) SELECT {first_archive} + seq - 1, CONCAT('+7 916 ', LPAD(seq, 7, '0')), 'new',"
            f" '{NOT_DUE}', 'agent', NOW() FROM seq_1_to_{count}")).lastrowid
    return list(range(first, first + count))


def make_due(bench: BenchDb, ids: list[int], rate: float | None = None) -> float:
    """Set the rows `new` again, due from the next whole second on (all at once, or `rate` per second
    in id order); forget any dispatch record. Returns the epoch second the first falls due."""
    lo, hi = ids[0], ids[-1]
    due = float(int(time.time()) + 1)
    spread = f"FLOOR((id - {lo}) / {rate})" if rate else "0"
    with bench.admin.begin() as conn:
        conn.execute(text("SET SESSION sql_mode = ''"))
        conn.execute(text(f"DELETE FROM sms_dispatch WHERE batchcontact_id BETWEEN {lo} AND {hi}"))
        conn.execute(text(f"DELETE FROM sms_message_ids WHERE batchcontact_id BETWEEN {lo} AND {hi}"))
        conn.execute(text(
            "UPDATE cc10_batchcontacts SET status = 'new', error_msg = '', contacttime = '0000-00-00 00:00:00',"
            f" schedulertime = FROM_UNIXTIME({due:.0f} + {spread}) WHERE id BETWEEN {lo} AND {hi}"))
    return due


def due_times(bench: BenchDb, ids: list[int]) -> dict[int, float]:
    with bench.admin.connect() as conn:
        return {r[0]: float(r[1]) for r in conn.execute(text(
            "SELECT id, UNIX_TIMESTAMP(schedulertime) FROM cc10_batchcontacts"
            f" WHERE id BETWEEN {ids[0]} AND {ids[-1]}"))}


def open_rows(bench: BenchDb, ids: list[int]) -> int:
    with bench.admin.connect() as conn:
        return conn.scalar(text(
            f"SELECT COUNT(*) FROM cc10_batchcontacts WHERE id BETWEEN {ids[0]} AND {ids[-1]}"
            f" AND status NOT IN {FINAL}"))


def wait_final(bench: BenchDb, ids: list[int], timeout_s: float, what: str,
               sent: Callable[[], int] | None = None) -> float:
    """Poll until every row is final; returns when that was seen (epoch). Raises after `timeout_s`. With
    `sent` (how many requests the provider has), prints every second how many were sent and where the open
    rows are (waiting, by reason; queued; sending), so that a stall shows as it happens.

    Ten times a second, on one connection held for the wait, as a bare driver query: through a new
    SQLAlchemy connection each time it took about a third of the benchmark process's CPU, which counts
    in the simulator's column. Rows finish roughly in id order, so looking from the highest id usually
    stops at the first row read."""
    deadline = time.monotonic() + timeout_s
    query = (f"SELECT id FROM cc10_batchcontacts WHERE id BETWEEN {ids[0]} AND {ids[-1]}"
             f" AND status NOT IN {FINAL} ORDER BY id DESC LIMIT 1")
    where = (f"SELECT COALESCE(wait_reason, state), COUNT(*) FROM sms_dispatch WHERE batchcontact_id BETWEEN"
             f" {ids[0]} AND {ids[-1]} AND state IN ('waiting', 'queued', 'sending') GROUP BY 1 ORDER BY 1")
    connection = bench.admin.raw_connection()
    started = shown = time.monotonic()
    try:
        cursor = connection.cursor()
        while cursor.execute(query):
            connection.commit()  # the next query reads the table as it is then
            if sent is not None and time.monotonic() - shown >= 1:
                shown = time.monotonic()
                cursor.execute(where)
                counts = ", ".join(f"{reason} {n}" for reason, n in cursor.fetchall()) or "none"
                print(f"  {what} +{shown - started:4.0f} s: sent {sent():>6}; open: {counts}", flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {open_rows(bench, ids)} of {len(ids)} rows still open after "
                                   f"{timeout_s:g} s")
            time.sleep(0.1)
        return time.time()
    finally:
        connection.close()


def start_simulator(latency_s: float) -> MobilgroupSimulator:
    return MobilgroupSimulator(latency_s=latency_s, undeliverable_suffix="").start()


# --- processes and their resources --------------------------------------------------------------

class Sampler:
    """CPU time and peak RSS of process trees (a watched process and its descendants, such as prefork pool
    processes), measured so as to take little of the CPU it measures.

    CPU is read when asked (`cpu_total`): each watched process's own, that of its children that exited
    (the kernel adds them to the parent's `children_*` times when it reaps them), and its live
    descendants'. Peak RSS is the kernel's high-water mark of each process (`VmHWM`), read every
    `interval_s` and when stopping, so that a pool process that exits early still counts. Listing a
    process's descendants reads every process of the machine; doing that five times a second took about
    2% of a 2-core machine's CPU, inside the benchmark's own process."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.roots: dict[int, str] = {}          # pid -> role ("worker", "beat")
        self.peak_rss: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self._last_cpu: dict[int, float] = {}    # root pid -> its tree's CPU when last read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def watch(self, pid: int, role: str) -> None:
        self.roots[pid] = role

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _tree(self, pid: int) -> list[psutil.Process]:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)

    def sample(self) -> None:
        """Record the peak RSS so far of every process in the watched trees."""
        for pid, role in list(self.roots.items()):
            try:
                tree = self._tree(pid)
            except psutil.Error:
                continue
            for proc in tree:
                peak = _peak_rss(proc.pid)
                if peak is not None:
                    self.peak_rss[proc.pid] = max(peak, self.peak_rss.get(proc.pid, 0))
                    self.role[proc.pid] = role if proc.pid == pid else f"{role} child"

    def cpu_total(self) -> float:
        """CPU seconds (user + system) the watched trees have used so far; a tree whose root has exited
        counts with what it had used when last read."""
        for pid in list(self.roots):
            try:
                root, *descendants = self._tree(pid)
                times = root.cpu_times()
                used = times.user + times.system + times.children_user + times.children_system
            except psutil.Error:
                continue
            for proc in descendants:
                try:
                    times = proc.cpu_times()
                except psutil.Error:  # exited just now: its time reaches the parent's children_* once reaped
                    continue
                used += times.user + times.system
            self._last_cpu[pid] = used
        return sum(self._last_cpu.values())


def _peak_rss(pid: int) -> int | None:
    """The process's peak resident set size in bytes (`VmHWM`, Linux), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def app_env(args, bench: BenchDb, sim: MobilgroupSimulator, broker: str, prefix: str,
            var_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "CELERY_"))}
    env.update(
        PYTHONUNBUFFERED="1", SMS_VAR_DIR=str(var_dir), SMS_DATABASE_URL=bench.app_url, CELERY_BROKER_URL=broker,
        SMS_REDIS_PREFIX=prefix, SMS_THROTTLE_PREFIX=prefix,
        SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url, SMS_MOBILGROUP_USER_ID=sim.user_id,
        SMS_MOBILGROUP_USER=sim.user, SMS_MOBILGROUP_PASSWORD=sim.password,
        SMS_MOBILGROUP_RATE=str(UNCAPPED_RATE), SMS_MOBILGROUP_IDENTICAL_S="0",
        SMS_DISPATCH_INTERVAL_S=str(args.dispatch_interval),
    )
    if args.dispatch_batch:
        env["SMS_DISPATCH_BATCH"] = str(args.dispatch_batch)
    return env


def wait_workers(broker: str, prefix: str, count: int, timeout_s: float, processes: list[CeleryProcess]) -> None:
    """Until `count` workers answer a ping (or one of the processes died)."""
    control = Celery(broker=broker)
    control.conf.broker_transport_options = {"global_keyprefix": prefix}
    deadline = time.monotonic() + timeout_s
    try:
        while len(control.control.ping(timeout=0.5)) < count:
            dead = [p for p in processes if p.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"a Celery process exited; see {dead[0].log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} workers did not answer within {timeout_s:g} s")
    finally:
        control.close()


# --- measuring a phase --------------------------------------------------------------------------

@dataclass
class Result:
    label: str
    messages: int
    seconds: float
    latencies: list[float]
    db: dict[str, float]
    cpu_s: float                      # workers + beat (or the baseline's own thread)
    sim_cpu_s: float                  # this process: simulator (and, for the baseline, the loop itself)
    redis_cpu_s: float = 0.0          # the Redis server (the baseline uses none)
    note: str = ""
    unsent: int = 0                   # rows never sent (the baseline's time ran out): latency > `cut_s`
    cut_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """The `q` quantile of every row's latency; `inf` when it falls among the rows never sent."""
        ordered = sorted(self.latencies) + [float("inf")] * self.unsent
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def per_msg(self, key: str) -> float:
        return self.db[key] / self.messages if self.messages else float("nan")

    @property
    def all_cpu_s(self) -> float:
        return self.cpu_s + self.db["CPU_TIME"] + self.sim_cpu_s + self.redis_cpu_s

    @property
    def statements_per_msg(self) -> float:
        return sum(self.per_msg(k) for k in ("SELECT_COMMANDS", "UPDATE_COMMANDS", "OTHER_COMMANDS"))


def provider_latencies(sim: MobilgroupSimulator, due: dict[int, float]) -> list[float]:
    """Due time → the simulator's receipt of the first accepted send, per row. The journal stamps
    the answer, after the simulated latency, so the latency is taken off."""
    first: dict[int, float] = {}
    for event in sim.events("send"):
        if event["outcome"] == "accepted":
            row = int(event["id"])
            first.setdefault(row, event["time"] - sim.latency_s)
    return [first[i] - due[i] for i in due if i in first]


def reset_simulator(sim: MobilgroupSimulator) -> None:
    """Forget what was sent, so the same ids are accepted again (not answered 'already sent')."""
    with sim.lock:
        sim.journal.clear()
    with sim._state:
        sim.requests.clear()


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def run_phase(label: str, bench: BenchDb, sim: MobilgroupSimulator, sampler: Sampler, redis_client: redis.Redis,
              ids: list[int], rate: float | None, timeout_s: float) -> Result:
    reset_simulator(sim)
    db0, cpu0, sim0, redis0 = bench.user_stats(), sampler.cpu_total(), self_cpu(), redis_cpu(redis_client)
    start = make_due(bench, ids, rate)
    done = wait_final(bench, ids, timeout_s, label, sent=lambda: len(sim.events("send")))
    latencies = provider_latencies(sim, due_times(bench, ids))
    return Result(label, len(ids), done - start, latencies, delta(bench.user_stats(), db0),
                  sampler.cpu_total() - cpu0, self_cpu() - sim0, redis_cpu(redis_client) - redis0)


def peak_by_role(sampler: Sampler) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for pid, rss in sampler.peak_rss.items():
        role = sampler.role[pid]
        peaks[role] = max(rss, peaks.get(role, 0))
    return peaks


# --- the baseline: the seed's cron script -------------------------------------------------------

def run_baseline(bench: BenchDb, sim: MobilgroupSimulator, ids: list[int], max_s: float) -> Result:
    """What asterCC's PHP example does on each cron run: one SELECT of the due rows with their texts,
    then one at a time: mark `pending`, POST to the provider, write `success`/`failed` and the time.
    Plain mysqlclient with autocommit, one keep-alive HTTP session (kinder to it than PHP's curl_init per
    message). Stops after `max_s`; unsent rows are left `new`."""
    reset_simulator(sim)
    db0, cpu0, loop0 = bench.user_stats(), self_cpu(), time.thread_time()
    user, rest = bench.app_url.split("//", 1)[1].split(":", 1)
    password, rest = rest.split("@", 1)
    host_port, name = rest.split("/", 1)
    host, port = host_port.split(":")
    conn = MySQLdb.connect(host=host, port=int(port), user=user, password=password, database=name.split("?")[0],
                           charset="utf8mb4", autocommit=True)
    client = MobilgroupClient(url=sim.api_url, user_id=sim.user_id, user=sim.user, password=sim.password)
    start = make_due(bench, ids)
    sent = 0
    try:
        while time.time() < start:
            time.sleep(0.01)
        deadline = start + max_s
        cur = conn.cursor()
        cur.execute(
            "SELECT b.id, b.target, a.content FROM cc10_batchcontacts b"
            " LEFT JOIN cc10_batchcontact_archives a ON a.id = b.batchcontact_archive_id"
            " WHERE b.status = 'new' AND b.schedulertime <= NOW()")
        for row_id, target, content in cur.fetchall():
            if time.time() >= deadline:
                break
            cur.execute("UPDATE cc10_batchcontacts SET status = 'pending' WHERE id = %s", (row_id,))
            digits = "".join(ch for ch in target if ch.isdigit())
            try:
                client.send(OutgoingMessage(reference=row_id, recipient=digits, text=content or ""))
                status, error = "success", ""
            except PermanentError as exc:
                status, error = "failed", str(exc)[:255]
            except ProviderError as exc:
                status, error = "error", str(exc)[:255]
            cur.execute("UPDATE cc10_batchcontacts SET status = %s, error_msg = %s, contacttime = NOW()"
                        " WHERE id = %s", (status, error, row_id))
            sent += 1
        end = time.time()
        loop_cpu = time.thread_time() - loop0
    finally:
        client.close()
        conn.close()
    latencies = provider_latencies(sim, {i: t for i, t in due_times(bench, ids).items()})
    sim_cpu = self_cpu() - cpu0 - loop_cpu
    note = "" if sent == len(ids) else f"stopped after {max_s:g} s: {sent} of {len(ids)} rows sent"
    return Result("baseline", sent, end - start, latencies, delta(bench.user_stats(), db0), loop_cpu, sim_cpu,
                  note=note, unsent=len(ids) - sent, cut_s=max_s)


# --- the dispatch tick on its own ---------------------------------------------------------------

def explain_due(bench: BenchDb, limit: int) -> list[str]:
    """EXPLAIN of the claim's search for due rows (`store.due_rows`), one line per table."""
    with bench.admin.connect() as conn:
        sql = store.due_rows(limit).compile(conn, compile_kwargs={"literal_binds": True})
        rows = conn.execute(text(f"EXPLAIN {sql}")).mappings().all()
    return ["  ".join(f"{k}={r[k]}" for k in ("table", "type", "key", "rows", "Extra")) for r in rows]


def time_ticks(bench: BenchDb, ids: list[int], repeats: int) -> tuple[float, float]:
    """Median seconds of `claim_due` claiming `len(ids)` due rows, and of an empty tick (nothing due)."""
    engine = engine_for(bench.app_url)
    full, empty = [], []
    for _ in range(repeats):
        due = make_due(bench, ids)
        time.sleep(max(0.0, due - time.time()) + 0.01)
        t = time.perf_counter()
        claimed = store.claim_due(engine, len(ids))
        full.append(time.perf_counter() - t)
        if len(claimed) != len(ids):
            raise RuntimeError(f"claimed {len(claimed)} of {len(ids)} due rows")
        t = time.perf_counter()
        if store.claim_due(engine, len(ids)):
            raise RuntimeError("an empty tick claimed rows")
        empty.append(time.perf_counter() - t)
    return statistics.median(full), statistics.median(empty)


def seed_finished_records(bench: BenchDb, count: int) -> None:
    """`count` dispatch records of finished rows (our own table's share of the filler), each its own batch."""
    with bench.admin.begin() as conn:
        conn.execute(text(
            "INSERT INTO sms_dispatch (batchcontact_id, claim_token, provider, recipient, state, attempts, parts,"
            " polls, resends, unknowns, failures, batch_id, creby, campaign, due_at, claimed_at, accepted_at,"
            " created_at, updated_at) SELECT 100000000 + seq, 'filler', 'mobilgroup', CONCAT('7915', LPAD(seq, 7,"
            " '0')), ELT(1 + (seq % 100 >= 90), 'delivered', 'failed'), 1, 1, 0, 0, 0, 0, 100000000 + seq,"
            " 'agent', 0, NOW() - INTERVAL (seq % 129600) MINUTE, NOW() - INTERVAL (seq % 129600) MINUTE,"
            " NOW() - INTERVAL (seq % 129600) MINUTE, NOW() - INTERVAL (seq % 129600) MINUTE,"
            f" NOW() - INTERVAL (seq % 129600) MINUTE FROM seq_1_to_{count}"))


def time_release(bench: BenchDb, ids: list[int], room: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one provider's release (`store.release_waiting`, fair turns) choosing `room` of
    `len(ids)` waiting rows, and of a release with nothing due."""
    engine = engine_for(bench.app_url)
    full, empty = [], []
    for _ in range(repeats):
        due = make_due(bench, ids)
        time.sleep(max(0.0, due - time.time()) + 0.01)
        claimed = store.claim_due(engine, len(ids))
        store.assign_routes(engine, {row.id: ("mobilgroup", f"7916{row.id:07d}") for row in claimed})
        t = time.perf_counter()
        released = store.release_waiting(engine, "mobilgroup", room, 30)
        full.append(time.perf_counter() - t)
        if len(released) != min(room, len(ids)):
            raise RuntimeError(f"released {len(released)} rows")
        with bench.admin.begin() as conn:  # nothing waits any more
            conn.execute(text("UPDATE sms_dispatch SET state = 'delivered' WHERE claim_token <> 'filler'"))
        t = time.perf_counter()
        store.release_waiting(engine, "mobilgroup", room, 30)
        empty.append(time.perf_counter() - t)
    return statistics.median(full), statistics.median(empty)


def tick_only(args, bench: BenchDb) -> None:
    ids = seed_rows(bench, args.tick_rows)
    if args.filler:
        seed_finished_records(bench, args.filler)
    room = 120
    full, empty = time_release(bench, ids, room, args.tick_repeats)
    print(f"release: {args.filler:,} finished records + {len(ids):,} waiting, release_waiting(limit={room}):"
          f" {full * 1000:.1f} ms; nothing waiting: {empty * 1000:.1f} ms")
    print(f"dispatch tick: {args.filler:,} finished rows + {len(ids):,} due, claim_due(limit={len(ids)}),"
          f" median of {args.tick_repeats}")
    for label, indexed in (("without index", False), ("with index", True)):
        if indexed:
            t = time.perf_counter()
            schema.add_astercc_index(bench.admin)
            print(f"  (adding the index took {time.perf_counter() - t:.1f} s)")
        print(f"  EXPLAIN ({label}):")
        for line in explain_due(bench, len(ids)):
            print("    " + line)
        full, empty = time_ticks(bench, ids, args.tick_repeats)
        print(f"  {label:<14} claim {len(ids)} due: {full * 1000:8.1f} ms   empty tick: {empty * 1000:8.1f} ms")


# --- output -------------------------------------------------------------------------------------

def print_table(args, runs: list[Result], light: Result | None, peaks: dict[str, int]) -> None:
    pipeline, baseline = runs[0], runs[1] if len(runs) > 1 else None
    mb = 1024 * 1024

    def cell(value, fmt, run):
        if value == float("inf"):
            return f"> {run.cut_s:g}"
        return format(value, fmt) if value == value else "-"

    rows = [
        ("messages", lambda r: r.messages, "d", False),
        ("messages/s", lambda r: r.rate, ".1f", True),
        ("due→provider p50 (s)", lambda r: r.pct(0.5), ".3f", False),
        ("due→provider p99 (s)", lambda r: r.pct(0.99), ".3f", False),
        ("DB statements / message", lambda r: r.statements_per_msg, ".2f", False),
        ("  selects", lambda r: r.per_msg("SELECT_COMMANDS"), ".2f", False),
        ("  inserts/updates/deletes", lambda r: r.per_msg("UPDATE_COMMANDS"), ".2f", False),
        ("  other (COMMIT, ROLLBACK, …)", lambda r: r.per_msg("OTHER_COMMANDS"), ".2f", False),
        ("CPU s / 1000 msg, ours", lambda r: r.cpu_s / r.messages * 1000, ".3f", False),
        ("CPU s / 1000 msg, MariaDB", lambda r: r.db["CPU_TIME"] / r.messages * 1000, ".3f", False),
        ("CPU s / 1000 msg, simulator", lambda r: r.sim_cpu_s / r.messages * 1000, ".3f", False),
        ("CPU s / 1000 msg, Redis", lambda r: r.redis_cpu_s / r.messages * 1000, ".3f", False),
        ("CPU s / 1000 msg, all", lambda r: r.all_cpu_s / r.messages * 1000, ".3f", False),
        (f"messages/s {CORES} cores allow", lambda r: CORES * r.messages / r.all_cpu_s, ".0f", False),
    ]
    print()
    shape = "plain `celery -A tasks worker`" if args.plain else f"pool={args.pool} concurrency={args.concurrency}"
    print(f"workers={args.workers} {shape} latency={args.latency:g}s "
          f"rows={args.rows} filler={args.filler:,} dispatch_interval={args.dispatch_interval:g}s "
          f"loglevel={args.loglevel}")
    print(f"SMS_MOBILGROUP_RATE={UNCAPPED_RATE} and SMS_MOBILGROUP_IDENTICAL_S=0 so that neither caps the run")
    header = f"{'':30} {'pipeline':>12} {'baseline':>12} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, get, fmt, ratio in rows:
        p = get(pipeline)
        line = f"{name:30} {cell(p, fmt, pipeline):>12}"
        if baseline is not None:
            b = get(baseline)
            line += f" {cell(b, fmt, baseline):>12}"
            if ratio and b:
                line += f" {p / b:7.1f}x"
        print(line)
    for role in sorted(peaks):
        print(f"{'peak RSS, ' + role + ' (MB)':30} {peaks[role] / mb:12.1f}")
    if light is not None:
        print(f"light load: {light.messages} rows due at {args.light_rate:g}/s: due→provider p50 "
              f"{light.pct(0.5):.3f} s, p99 {light.pct(0.99):.3f} s; statements/message "
              f"{light.statements_per_msg:.2f}")
    print("ours = workers + beat (pipeline) or the script's loop (baseline); the simulator runs in the benchmark's"
          " process")
    print(f"cores allow = {CORES} / all CPU per message: the rate at which this work would keep every core busy")
    if baseline is not None:
        print("baseline: loop started the moment the rows fell due; from cron (every minute) add 0–60 s "
              "(30 s on average) to its latency")
        if baseline.note:
            print(f"baseline: {baseline.note}")


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000, help="rows in the burst (default 10000)")
    p.add_argument("--workers", type=int, default=2, help="celery worker processes")
    p.add_argument("--concurrency", type=int, default=8, help="pool size of each worker")
    p.add_argument("--pool", default="prefork", choices=("prefork", "threads", "solo"))
    p.add_argument("--plain", action="store_true",
                   help="workers as a newcomer starts them: `celery -A tasks worker`, no pool, concurrency or queues")
    p.add_argument("--latency", type=float, default=0.0, help="simulator answer latency, seconds")
    p.add_argument("--filler", type=int, default=0, help="finished rows already in the table")
    p.add_argument("--light-rows", type=int, default=200, help="rows of the light-load phase (0: skip)")
    p.add_argument("--light-rate", type=float, default=20.0, help="rows falling due per second, light load")
    p.add_argument("--dispatch-interval", type=float, default=2.0, help="SMS_DISPATCH_INTERVAL_S")
    p.add_argument("--dispatch-batch", type=int, default=0, help="SMS_DISPATCH_BATCH (0: the default)")
    p.add_argument("--loglevel", default="warning", help="celery -l for workers and beat")
    p.add_argument("--log-dir", help="keep the Celery logs here (default: a temporary folder)")
    p.add_argument("--baseline-max-s", type=float, default=60.0, help="stop the baseline after this long")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a phase after this long")
    p.add_argument("--tick-only", action="store_true", help="time the dispatch tick only")
    p.add_argument("--tick-rows", type=int, default=1000, help="due rows for --tick-only")
    p.add_argument("--tick-repeats", type=int, default=5)
    p.add_argument("--mariadb", default=os.environ.get("SMS_BENCH_MARIADB", "mysql+mysqldb://root@127.0.0.1:3306"))
    p.add_argument("--redis", default=os.environ.get("SMS_BENCH_REDIS", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=15, help="Redis database (keys under a prefix of the run's own)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    broker = f"{args.redis}/{args.redis_db}"
    with ExitStack() as stack:
        bench = stack.enter_context(bench_database(args.mariadb))
        t = time.perf_counter()
        seed_filler(bench, args.filler)
        if args.filler:
            print(f"seeded {args.filler:,} finished rows in {time.perf_counter() - t:.1f} s", flush=True)
        if args.tick_only:
            tick_only(args, bench)
            return 0
        warm_ids = seed_rows(bench, max(50, 3 * args.workers * args.concurrency))
        light_ids = seed_rows(bench, args.light_rows) if args.light_rows else []
        ids = seed_rows(bench, args.rows)
        prefix = f"{bench.name}:"
        keys = redis.Redis.from_url(broker, socket_timeout=5)
        stack.callback(keys.close)
        stack.callback(lambda: [keys.delete(k) for k in keys.scan_iter(match=prefix + "*", count=1000)])
        sim = start_simulator(args.latency)
        stack.callback(sim.stop)
        var_dir = Path(args.log_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sms-bench-")))
        var_dir.mkdir(parents=True, exist_ok=True)
        env = app_env(args, bench, sim, broker, prefix, var_dir)
        sampler = Sampler().start()
        stack.callback(sampler.stop)
        processes: list[CeleryProcess] = []
        for n in range(args.workers):
            shape = [] if args.plain else ["-Q", QUEUES, "-P", pool_option(args.pool), "-c", str(args.concurrency)]
            worker = CeleryProcess(
                ["worker", "-l", args.loglevel, "-n", f"bench{n}-{uuid.uuid4().hex[:6]}@%h", *shape,
                 "--without-mingle", "--without-gossip"],
                env, var_dir / f"worker{n}.log")
            processes.append(worker)
            sampler.watch(worker.proc.pid, "worker")
        for process in processes:
            stack.callback(process.stop)
        wait_workers(broker, prefix, args.workers, 60, processes)
        beat = CeleryProcess(["beat", "-l", args.loglevel, "-s", str(var_dir / "beat-schedule")], env,
                             var_dir / "beat.log")
        stack.callback(beat.stop)
        processes.append(beat)
        sampler.watch(beat.proc.pid, "beat")
        print(f"{args.workers} workers ready; beat started", flush=True)

        # Every pool process imports, connects and opens its HTTP session on its first task: warm them
        # up, so that the phases measure a running service rather than its start.
        run_phase("warm-up", bench, sim, sampler, keys, warm_ids, None, args.timeout)
        light = None
        if light_ids:
            light = run_phase("light load", bench, sim, sampler, keys, light_ids, args.light_rate, args.timeout)
            print(f"light load done: p50 {light.pct(0.5):.3f} s", flush=True)
        pipeline = run_phase("burst", bench, sim, sampler, keys, ids, None, args.timeout)
        print(f"burst done: {pipeline.rate:.1f} msg/s", flush=True)
        peaks = peak_by_role(sampler)
        stop_all(processes)
        runs = [pipeline]
        if not args.no_baseline:
            runs.append(run_baseline(bench, sim, ids, args.baseline_max_s))
        print_table(args, runs, light, peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
