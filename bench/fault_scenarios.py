"""Bad days, driven end to end: deploys, crashes, Redis and MariaDB outages, and one provider's trouble beside
another's traffic, against real MariaDB, Redis, `celery worker` / `celery beat` subprocesses and the provider
simulators. Each scenario inserts asterCC rows, starts the processes, injects its fault at a point of the
batch, waits until every row is settled, and returns what happened as figures (`FaultRun`, `IsolationRun`).

The same drivers back the tests (`tests/test_faults.py`, `tests/test_isolation.py`, small sizes, asserting
the issues' promises) and the fault bench (`bench/faults.py`, larger sizes, printing the figures). Network
faults go through `simulators.proxy.FaultProxy` on loopback: processes whose `SMS_DATABASE_URL` or
`CELERY_BROKER_URL` point at the proxy see the server restart (`cut`) or swallow packets (`blackhole`).

What counts, at the provider's side (each simulator journals what it accepted): a row is *lost* when its
provider never accepted it, *sent twice* when it accepted it more than once.
"""
from __future__ import annotations

import glob
import os
import statistics
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import redis
from sqlalchemy import text

from simulators.accolades import AccoladesSimulator
from simulators.mobilgroup import MobilgroupSimulator
from simulators.ozeki import OzekiSimulator
from simulators.proxy import FaultProxy

OPEN_STATES = ("queued", "sending", "waiting")
FAST = {"SMS_DISPATCH_INTERVAL_S": 1, "SMS_RETRY_BASE_S": 0.5, "SMS_RETRY_MAX_S": 2,
        "SMS_ALLOWED_COUNTRIES": "7,40,44"}
"""Ticks every second (the compose default is 2 s) and short backoffs, so that a test sees recovery soon;
the scenarios' numbers are Russian, Romanian and British."""


class Process(Protocol):
    log_path: object

    def running(self) -> bool: ...
    def kill(self) -> None: ...
    def terminate(self) -> None: ...


@dataclass
class Stage:
    """Where a scenario plays: `engine` reads and writes the test database directly (never through a proxy);
    `database_url` and `redis_url` are what the processes get unless a scenario puts a proxy between;
    `env(database_url, broker_url, **settings)` makes a deployment's environment (this run's Redis prefix
    included); `start(kind, env, *args)` starts `celery worker|beat`, stopped by the caller afterwards;
    `scratch` is the processes' `TMPDIR` (kombu dumps there what it could not give back to a lost Redis)."""

    engine: object
    database_url: str
    redis_url: str
    redis_prefix: str
    env: Callable[..., dict[str, str]]
    start: Callable[..., Process]
    scratch: Path


# --- rows ------------------------------------------------------------------------------------------

def ro_number(i: int) -> str:
    """Distinct Romanian mobile numbers (routed to Accolades by `40=accolades`); none ends in 13."""
    return f"+40 721 {i // 1000 % 1000:03d} {i % 1000:03d}"


def ru_number(i: int) -> str:
    """Distinct Russian mobile numbers (Mobilgroup, the default route); none ends in 13."""
    return f"+7 916 {i // 10_000 % 1000:03d}-{i // 100 % 100:02d}-{50 + i % 40:02d}"


def uk_number(i: int) -> str:
    """Distinct British mobile numbers (routed to Ozeki by `44=ozeki`); none ends in 13."""
    return f"+44 7700 {i // 1000 % 1000:03d}{i % 1000:03d}"


def add_rows(engine, numbers: list[str], due: str = "NOW()") -> list[int]:
    """Insert asterCC rows to `numbers`, each with a text of its own, due at the SQL expression `due`;
    returns their ids in order."""
    ids = []
    with engine.begin() as conn:
        for i, number in enumerate(numbers):
            archive = conn.execute(text("INSERT INTO cc10_batchcontact_archives (archivetype, content)"
                                        " VALUES ('sms', :c)"), {"c": f"Your order {i} is on its way."}).lastrowid
            ids.append(conn.execute(text(
                "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
                f" created) VALUES (:a, :t, 'new', {due}, 'agent', NOW())"), {"a": archive, "t": number}).lastrowid)
    return ids


def states(engine, ids: list[int], wanted: tuple[str, ...] | None = None) -> dict[int, str]:
    """Each row's dispatch state (None while not claimed), or only the rows in one of `wanted`."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT b.id, d.state FROM cc10_batchcontacts b LEFT JOIN sms_dispatch d ON d.batchcontact_id = b.id"
            " WHERE b.id BETWEEN :lo AND :hi"), {"lo": min(ids), "hi": max(ids)}).all()
    wanted_ids = set(ids)
    return {r.id: r.state for r in rows if r.id in wanted_ids and (wanted is None or r.state in wanted)}


def outcomes(engine, ids: list[int]) -> dict[int, tuple[str, str, str]]:
    """(dispatch state, asterCC status, asterCC error_msg) per row."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT b.id, d.state, b.status, b.error_msg FROM cc10_batchcontacts b"
            " LEFT JOIN sms_dispatch d ON d.batchcontact_id = b.id WHERE b.id BETWEEN :lo AND :hi"),
            {"lo": min(ids), "hi": max(ids)}).all()
    wanted = set(ids)
    return {r.id: (r.state, r.status, r.error_msg) for r in rows if r.id in wanted}


def unknowns(engine, ids: list[int]) -> list[int]:
    """Rows whose send was ever settled as an unknown outcome."""
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT batchcontact_id FROM sms_dispatch WHERE unknowns > 0 AND"
                                      " batchcontact_id BETWEEN :lo AND :hi ORDER BY 1"),
                                 {"lo": min(ids), "hi": max(ids)}))


def due_epochs(engine, ids: list[int]) -> dict[int, float]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, UNIX_TIMESTAMP(schedulertime) FROM cc10_batchcontacts"
                                 " WHERE id BETWEEN :lo AND :hi"), {"lo": min(ids), "hi": max(ids)}).all()
    return {r[0]: float(r[1]) for r in rows}


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `predicate` until truthy; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def settle(engine, ids: list[int], timeout_s: float) -> float:
    """Wait until no row is new or open (every one accepted, delivered, failed, error or unconfirmed);
    returns when that was seen (epoch). TimeoutError, with the open rows' states, after `timeout_s`."""
    try:
        wait_for(lambda: not [i for i, s in states(engine, ids).items() if s is None or s in OPEN_STATES],
                 timeout_s, "every row to settle", interval_s=0.25)
    except TimeoutError as exc:
        left = Counter(s for s in states(engine, ids).values() if s is None or s in OPEN_STATES)
        with engine.connect() as conn:
            examples = conn.execute(text(
                "SELECT batchcontact_id, state, wait_reason, attempts, last_error, lease_until, NOW() AS now"
                " FROM sms_dispatch WHERE state IN ('queued', 'sending', 'waiting') AND batchcontact_id"
                " BETWEEN :lo AND :hi LIMIT 3"), {"lo": min(ids), "hi": max(ids)}).all()
        raise TimeoutError(f"{exc}; still open: {dict(left)}; for example "
                           f"{[tuple(map(str, row)) for row in examples]}") from None
    return time.time()


def sends_by_id(sim) -> dict[int, list[float]]:
    """When each send a simulator journalled arrived, per row id: the simulator journals a request after its
    `latency_s`, when it answers."""
    times: dict[int, list[float]] = {}
    for event in sim.events("send"):
        times.setdefault(int(event["id"]), []).append(event["time"] - sim.latency_s)
    return times


@contextmanager
def running(*servers):
    """Simulators and proxies started for the duration of a `with` block, stopped after it."""
    with ExitStack() as stack:
        for server in servers:
            if hasattr(server, "start"):
                server.start()
            stack.callback(server.stop)
        yield servers if len(servers) > 1 else servers[0]


def accolades_env(stage: Stage, sim: AccoladesSimulator, database_url: str | None = None,
                  broker_url: str | None = None, **settings) -> dict[str, str]:
    return stage.env(database_url or stage.database_url, broker_url or stage.redis_url,
                     **{"TMPDIR": str(stage.scratch), "SMS_DEFAULT_PROVIDER": "accolades",
                        "SMS_ACCOLADES_URL": sim.url, "SMS_ACCOLADES_ACCOUNT": sim.account,
                        "SMS_ACCOLADES_PASSWORD": sim.password,
                        **FAST, **settings})


def mobilgroup_settings(sim: MobilgroupSimulator) -> dict[str, str]:
    return {"SMS_MOBILGROUP_URL": sim.api_url, "SMS_MOBILGROUP_USER_ID": sim.user_id,
            "SMS_MOBILGROUP_USER": sim.user, "SMS_MOBILGROUP_PASSWORD": sim.password}


def log_of(process: Process) -> str:
    return open(process.log_path, errors="replace").read()


# --- issue 17: deploys, crashes, outages ------------------------------------------------------------

@dataclass
class FaultRun:
    """What one fault did to one batch, as the provider saw it."""

    scenario: str
    rows: int
    lost: list[int]
    """Rows the provider never accepted."""
    doubled: list[int]
    """Rows the provider accepted more than once."""
    in_flight: list[int]
    """Rows a worker was sending (`sending`) when the fault struck."""
    held: list[int]
    """Rows in the broker or a worker's prefetch (`queued`) when the fault struck."""
    waiting: list[int]
    """Rows waiting in the database (`waiting`) when the fault struck."""
    fault_at: float
    back_at: float
    """When the fault ended: the new worker started, the server reachable again."""
    settled_at: float
    sends: dict[int, list[float]] = field(repr=False)
    unknown: list[int] = field(default_factory=list)
    """Rows settled at least once as an unknown outcome (a lease ran out: the request may have left)."""
    sent_before_back: int = 0
    logs: list[str] = field(default_factory=list, repr=False)
    not_success: dict[int, tuple[str, str, str]] = field(default_factory=dict, repr=False)
    """Rows that did not end `success` in asterCC: (our state, asterCC's status, `error_msg`)."""

    @property
    def resumed_s(self) -> float | None:
        """Seconds from the fault's end to the provider's first accepted send after it."""
        after = [t for times in self.sends.values() for t in times if t > self.back_at]
        return min(after) - self.back_at if after else None

    @property
    def rest_s(self) -> float:
        """Seconds from the fault's end until every row was settled."""
        return self.settled_at - self.back_at

    def first_send_after_fault(self, ids: list[int]) -> dict[int, float]:
        """Seconds from the fault to each of `ids`' first send after it (rows not sent after it: absent)."""
        out = {}
        for i in ids:
            later = [t for t in self.sends.get(i, []) if t > self.fault_at]
            if later:
                out[i] = min(later) - self.fault_at
        return out


def _accolades_batch(stage: Stage, rows: int, start_fraction: float):
    """Insert `rows` Accolades rows due now; returns their ids and a function that waits until the provider
    accepted `start_fraction` of them."""
    ids = add_rows(stage.engine, [ro_number(i) for i in range(rows)])

    def mid_batch(sim, timeout_s: float = 120):
        wait_for(lambda: len(sim.events("send")) >= rows * start_fraction, timeout_s,
                 f"{start_fraction:.0%} of the batch to be sent", interval_s=0.05)
    return ids, mid_batch


def _result(scenario: str, stage: Stage, sim, ids: list[int], snapshot: dict[int, str], fault_at: float,
            back_at: float, sent_before_back: int, timeout_s: float, processes: list[Process]) -> FaultRun:
    settled_at = settle(stage.engine, ids, timeout_s)
    sends = sends_by_id(sim)
    ended = outcomes(stage.engine, ids)
    return FaultRun(
        scenario, len(ids), lost=[i for i in ids if i not in sends],
        doubled=sorted(i for i, times in sends.items() if len(times) > 1),
        in_flight=sorted(i for i, s in snapshot.items() if s == "sending"),
        held=sorted(i for i, s in snapshot.items() if s == "queued"),
        waiting=sorted(i for i, s in snapshot.items() if s == "waiting"),
        fault_at=fault_at, back_at=back_at, settled_at=settled_at, sends=sends, unknown=unknowns(stage.engine, ids),
        sent_before_back=sent_before_back, logs=[str(p.log_path) for p in processes],
        not_success={i: ended[i] for i in ids if ended[i][1] != "success"})


def deploy(stage: Stage, rows: int = 300, latency_s: float = 3.0, rate: float = 20, grace_s: float = 10,
           timeout_s: float = 120) -> FaultRun:
    """A deploy as `docker compose up -d` does it: SIGTERM to the worker in the middle of a batch to a
    provider answering in `latency_s`, SIGKILL `grace_s` later if it is still alive, then a new worker."""
    with running(AccoladesSimulator(latency_s=latency_s)) as sim:
        ids, mid_batch = _accolades_batch(stage, rows, 0.25)
        env = accolades_env(stage, sim, SMS_ACCOLADES_RATE=rate)
        old = stage.start("worker", env)
        beat = stage.start("beat", env)
        mid_batch(sim)
        fault_at = time.time()
        old.terminate()
        snapshot = states(stage.engine, ids)
        try:
            wait_for(lambda: not old.running(), grace_s, "the old worker to stop", interval_s=0.1)
        except TimeoutError:
            old.kill()
        new = stage.start("worker", env)
        back_at = time.time()
        return _result("deploy", stage, sim, ids, snapshot, fault_at, back_at, len(sim.events("send")),
                       timeout_s, [old, new, beat])


def crash(stage: Stage, rows: int = 300, latency_s: float = 3.0, rate: float = 20, lease_s: int = 30,
          identical_s: float = 60, timeout_s: float = 150) -> FaultRun:
    """SIGKILL to the worker in the middle of a batch (the machine lost, the OOM killer), a new worker started
    at once. `lease_s` shortens `SMS_SEND_LEASE_S` (default 180) so that the sends the dead worker had in
    flight come back in test time; their repeat waits out the identical-request rule (`identical_s`, 60 s by
    default: a request that may have arrived counts as sent)."""
    with running(AccoladesSimulator(latency_s=latency_s)) as sim:
        ids, mid_batch = _accolades_batch(stage, rows, 0.25)
        # A lease must outlast a provider call's deadline by 10 s (settings): a short lease needs a short deadline.
        env = accolades_env(stage, sim, SMS_ACCOLADES_RATE=rate, SMS_SEND_LEASE_S=lease_s,
                            SMS_HTTP_TIMEOUT_S=min(15, lease_s - 10), SMS_ACCOLADES_IDENTICAL_S=identical_s)
        old = stage.start("worker", env)
        beat = stage.start("beat", env)
        mid_batch(sim)
        old.kill()
        fault_at = time.time()
        snapshot = states(stage.engine, ids)  # the dead worker can change nothing any more
        new = stage.start("worker", env)
        back_at = time.time()
        return _result("crash", stage, sim, ids, snapshot, fault_at, back_at, len(sim.events("send")),
                       timeout_s, [old, new, beat])


def redis_loss(stage: Stage, rows: int = 600, latency_s: float = 0.2, rate: float = 20, outage_s: float = 15,
               timeout_s: float = 150) -> FaultRun:
    """Redis (broker and rate limiter) cut off for `outage_s` in the middle of a batch and emptied meanwhile,
    as a restart without persistence leaves it: only this run's keys (`redis_prefix`) are deleted."""
    host, port = _host_port(stage.redis_url, 6379)
    with running(FaultProxy(host, port), AccoladesSimulator(latency_s=latency_s)) as (proxy, sim):
        ids, mid_batch = _accolades_batch(stage, rows, 0.25)
        env = accolades_env(stage, sim, broker_url=proxy.url_for(stage.redis_url), SMS_ACCOLADES_RATE=rate)
        worker = stage.start("worker", env)
        beat = stage.start("beat", env)
        mid_batch(sim)
        proxy.cut()
        fault_at = time.time()
        snapshot = states(stage.engine, ids)
        empty_redis(stage)
        time.sleep(max(0.0, fault_at + outage_s - time.time()))
        sent = len(sim.events("send"))
        proxy.restore()
        back_at = time.time()
        return _result("Redis loss", stage, sim, ids, snapshot, fault_at, back_at, sent, timeout_s,
                       [worker, beat])


@contextmanager
def _batch_behind_database_proxy(stage: Stage, rows: int, latency_s: float, rate: float, **settings):
    """A worker and beat reaching MariaDB through a `FaultProxy`, a quarter of an Accolades batch (a provider
    answering in `latency_s`) sent: yields (proxy, simulator, row ids, their states then, the processes)."""
    host, port = _host_port(stage.database_url, 3306)
    with running(FaultProxy(host, port), AccoladesSimulator(latency_s=latency_s)) as (proxy, sim):
        ids, mid_batch = _accolades_batch(stage, rows, 0.25)
        env = accolades_env(stage, sim, database_url=proxy.url_for(stage.database_url), SMS_ACCOLADES_RATE=rate,
                            **settings)
        processes = [stage.start("worker", env), stage.start("beat", env)]
        mid_batch(sim)
        yield proxy, sim, ids, states(stage.engine, ids), processes


def database_loss(stage: Stage, rows: int = 400, latency_s: float = 0.2, rate: float = 20,
                  outage_s: float = 30, timeout_s: float = 150, name: str = "MariaDB loss",
                  **settings) -> FaultRun:
    """MariaDB cut off for `outage_s` in the middle of a batch, for the workers and beat (connections reset,
    new ones refused), as a database restart does. With a provider answering in `latency_s` of seconds, sends
    are in flight when it goes: their outcomes must be written once it is back, however long it was away."""
    with _batch_behind_database_proxy(stage, rows, latency_s, rate, **settings) as (proxy, sim, ids, snapshot,
                                                                                    processes):
        proxy.cut()
        fault_at = time.time()
        time.sleep(outage_s)
        sent = len(sim.events("send"))
        proxy.restore()
        back_at = time.time()
        return _result(name, stage, sim, ids, snapshot, fault_at, back_at, sent, timeout_s, processes)


def clock_jump(stage: Stage, rows: int = 300, latency_s: float = 2.0, rate: float = 20, timeout_s: float = 300,
               **settings) -> FaultRun:
    """The database's local clock an hour forward in the middle of a batch, as a daylight-saving change does
    on a server that keeps local time: its time zone offset changes (`SET GLOBAL time_zone`, put back
    afterwards: nothing else may run on that server meanwhile) and its connections reset."""
    with _batch_behind_database_proxy(stage, rows, latency_s, rate, **settings) as (proxy, sim, ids, snapshot,
                                                                                    processes):
        with stage.engine.begin() as conn:
            zone = conn.scalar(text("SELECT @@global.time_zone"))
            ahead_min = round(conn.scalar(text("SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())")) / 60) + 60
            sign = "+" if ahead_min >= 0 else "-"
            conn.execute(text(f"SET GLOBAL time_zone = '{sign}{abs(ahead_min) // 60:02d}:{abs(ahead_min) % 60:02d}'"))
        try:
            proxy.cut()
            fault_at = time.time()
            proxy.restore()
            back_at = time.time()
            return _result("clock +1 h", stage, sim, ids, snapshot, fault_at, back_at, len(sim.events("send")),
                           timeout_s, processes)
        finally:
            with stage.engine.begin() as conn:
                conn.execute(text("SET GLOBAL time_zone = :zone"), {"zone": zone})


def empty_redis(stage: Stage) -> None:
    """Delete this run's Redis keys (`redis_prefix`), as a restart without persistence loses them; never
    another run's."""
    direct = redis.Redis.from_url(stage.redis_url, socket_timeout=5)
    try:
        for key in direct.scan_iter(match=stage.redis_prefix + "*", count=1000):
            direct.delete(key)
    finally:
        direct.close()


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    authority = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    host, _, port = authority.partition(":")
    return host, int(port or default_port)


# --- issue 16: one provider's trouble beside another's traffic ---------------------------------------

@dataclass
class IsolationRun:
    """How a healthy provider's rows fared beside a troubled one's."""

    scenario: str
    healthy_delays: list[float]
    """Seconds from each healthy row's due time to its first arrival at its provider."""
    troubled_requests: list[float]
    """Arrival times of every request the troubled provider received (epoch)."""
    outcomes: dict[int, tuple[str, str, str]] = field(repr=False)
    healthy: list[int] = field(repr=False)
    troubled: list[int] = field(repr=False)
    logs: list[str] = field(default_factory=list, repr=False)
    stuck_connections: int = 0
    """Connections to the troubled provider left hanging when the healthy rows were done."""

    def percentile(self, q: float) -> float:
        ordered = sorted(self.healthy_delays)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def median(self) -> float:
        return statistics.median(self.healthy_delays)


def _delays(sends: dict[int, list[float]], due: dict[int, float], ids: list[int]) -> list[float]:
    return [min(sends[i]) - due[i] for i in ids if i in sends]


def paused_beside_healthy(stage: Stage, paused_rows: int = 300, healthy_rows: int = 30, inflight: int = 10,
                          retry_s: float = 5, window_s: int = 40, identical_s: float = 1,
                          timeout_s: float = 120) -> IsolationRun:
    """Mobilgroup answers "not enough money" (error 9) to every send, with its in-flight cap at `inflight`;
    `paused_rows` Mobilgroup rows fall due and, once Mobilgroup has refused the first, `healthy_rows`
    Accolades rows. The account pause (`SMS_ACCOUNT_RETRY_S`, 300 s by default) is shortened to `retry_s`,
    the window through which its rows wait (`SMS_ACCOUNT_RETRY_WINDOW_S`, a day) to `window_s`, so that they
    end in test time; and the identical-request rule (`SMS_MOBILGROUP_IDENTICAL_S`, 60 s) to `identical_s`,
    which must stay under the pause: a probe is the oldest waiting row, often one refused a pause ago."""
    broke, healthy_sim = MobilgroupSimulator(balance=0, price=1), AccoladesSimulator()
    with running(broke, healthy_sim):
        troubled = add_rows(stage.engine, [ru_number(i) for i in range(paused_rows)])
        env = accolades_env(stage, healthy_sim, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_ROUTES="40=accolades",
                            SMS_ACCOLADES_RATE=50, SMS_MOBILGROUP_MAX_INFLIGHT=inflight,
                            SMS_ACCOUNT_RETRY_S=retry_s, SMS_ACCOUNT_RETRY_WINDOW_S=window_s,
                            SMS_MOBILGROUP_IDENTICAL_S=identical_s, **mobilgroup_settings(broke))
        processes = [stage.start("worker", env), stage.start("beat", env)]
        wait_for(lambda: broke.events("send"), 60, "Mobilgroup's first refusal")
        healthy = add_rows(stage.engine, [ro_number(i) for i in range(healthy_rows)])
        settle(stage.engine, troubled + healthy, timeout_s)
        return IsolationRun("paused beside healthy",
                            _delays(sends_by_id(healthy_sim), due_epochs(stage.engine, healthy), healthy),
                            sorted(e["time"] for e in broke.events("send")),
                            outcomes(stage.engine, troubled + healthy), healthy, troubled,
                            [str(p.log_path) for p in processes])


def hung_beside_healthy(stage: Stage, hung_rows: int = 1000, healthy_rows: int = 50, hung_rate: float = 30,
                        hung_calls: int = 16, due_in_s: int = 2, timeout_s: float = 180) -> IsolationRun:
    """Ozeki accepts connections and never answers (a blackholed proxy in front of its simulator): `hung_rows`
    Ozeki rows due now; once `hung_calls` Ozeki calls hang, `healthy_rows` Mobilgroup rows due `due_in_s`
    later, in the same worker. Then Ozeki answers again and its rows drain (those whose call ran out of
    time are sent again: `SMS_OZEKI_ON_UNKNOWN=resend`)."""
    ozeki, mobilgroup = OzekiSimulator(), MobilgroupSimulator()
    with running(ozeki, mobilgroup, FaultProxy("127.0.0.1", ozeki.server_address[1])) as (_, _, proxy):
        proxy.blackhole()
        hung = add_rows(stage.engine, [uk_number(i) for i in range(hung_rows)])
        env = stage.env(stage.database_url, stage.redis_url, TMPDIR=str(stage.scratch),
                        SMS_DEFAULT_PROVIDER="mobilgroup", SMS_ROUTES="44=ozeki",
                        SMS_OZEKI_URL=proxy.url_for(ozeki.api_url), SMS_OZEKI_USERNAME=ozeki.username,
                        SMS_OZEKI_PASSWORD=ozeki.password,
                        SMS_OZEKI_RATE=hung_rate, SMS_MOBILGROUP_RATE=100, **FAST, **mobilgroup_settings(mobilgroup))
        processes = [stage.start("worker", env), stage.start("beat", env)]
        wait_for(lambda: proxy.accepted >= hung_calls, 60, f"{hung_calls} Ozeki calls to hang")
        healthy = add_rows(stage.engine, [ru_number(i) for i in range(healthy_rows)],
                           due=f"NOW() + INTERVAL {due_in_s} SECOND")
        settle(stage.engine, healthy, timeout_s)
        stuck = proxy.open_connections
        proxy.restore()
        settle(stage.engine, hung, timeout_s)
        return IsolationRun("hung beside healthy",
                            _delays(sends_by_id(mobilgroup), due_epochs(stage.engine, healthy), healthy),
                            [], outcomes(stage.engine, hung + healthy), healthy, hung,
                            [str(p.log_path) for p in processes], stuck_connections=stuck)


def ticks_beside_hung(stage: Stage, hung_rows: int = 600, hung_calls: int = 60,
                      probe_rows: int = 10, due_in_s: int = 2, timeout_s: float = 60) -> list[float]:
    """A worker that serves Ozeki alone (so Ozeki may hold all its threads but two in calls) while Ozeki
    accepts connections and never answers; `hung_rows` rows fall due, and once `hung_calls` calls hang,
    `probe_rows` more `due_in_s` later. Returns the seconds from each probe row's due time to its claim by a
    dispatch tick: how late the beat tasks run in a worker whose prefetched sends all wait for a thread."""
    ozeki = OzekiSimulator()
    with running(ozeki, FaultProxy("127.0.0.1", ozeki.server_address[1])) as (_, proxy):
        proxy.blackhole()
        add_rows(stage.engine, [uk_number(i) for i in range(hung_rows)])
        env = stage.env(stage.database_url, stage.redis_url, TMPDIR=str(stage.scratch),
                        SMS_DEFAULT_PROVIDER="ozeki", SMS_OZEKI_URL=proxy.url_for(ozeki.api_url),
                        SMS_OZEKI_USERNAME=ozeki.username, SMS_OZEKI_PASSWORD=ozeki.password,
                        SMS_OZEKI_RATE=100, **FAST)
        stage.start("worker", env)
        stage.start("beat", env)
        wait_for(lambda: proxy.accepted >= hung_calls, timeout_s, f"{hung_calls} Ozeki calls to hang")
        probes = add_rows(stage.engine, [uk_number(hung_rows + i) for i in range(probe_rows)],
                          due=f"NOW() + INTERVAL {due_in_s} SECOND")
        due = due_epochs(stage.engine, probes)
        claimed: dict[int, float] = {}

        def all_claimed() -> bool:
            now = time.time()
            for row_id, state in states(stage.engine, probes).items():
                if state is not None:
                    claimed.setdefault(row_id, now)
            return len(claimed) == len(probes)

        wait_for(all_claimed, timeout_s, "the probe rows to be claimed", interval_s=0.1)
        return [claimed[i] - due[i] for i in probes]


FAKETIME_SHIM = Path(__file__).resolve().parent / "faketime"
"""`sitecustomize` for a process under libfaketime: see `bench/faketime/sitecustomize.py`."""


def libfaketime() -> str:
    """The path of libfaketime's multithreaded library (Debian package `faketime`, `make deps`)."""
    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1")
    if not found:
        raise FileNotFoundError("libfaketime is not installed: run `make deps` (Debian package faketime)")
    return found[0]


def skewed_worker(stage: Stage, offset_s: int, rows: int = 20, due_in_s: int = 3,
                  timeout_s: float = 60) -> IsolationRun:
    """A worker whose wall clock is `offset_s` off (libfaketime, its monotonic clock true; beat, the database
    and the provider keep the true time): once it is up, `rows` Accolades rows due `due_in_s` later; their
    delays from due to the provider."""
    with running(AccoladesSimulator()) as sim, ExitStack() as stack:
        env = accolades_env(stage, sim, SMS_ACCOLADES_RATE=50)
        skewed = {**env, "LD_PRELOAD": libfaketime(), "FAKETIME": f"{offset_s:+d}s",
                  "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1",
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKETIME_SHIM), env.get("PYTHONPATH")]))}
        processes = [stage.start("worker", skewed), stage.start("beat", env)]
        stack.callback(lambda: [p.kill() for p in processes])
        wait_for(lambda: " ready." in log_of(processes[0]), 60, "the worker to start")
        ids = add_rows(stage.engine, [ro_number(i) for i in range(rows)], due=f"NOW() + INTERVAL {due_in_s} SECOND")
        settle(stage.engine, ids, timeout_s)
        delays = _delays(sends_by_id(sim), due_epochs(stage.engine, ids), ids)
        return IsolationRun(f"clock {offset_s:+d} s", delays, [], outcomes(stage.engine, ids), ids, [],
                            [str(p.log_path) for p in processes])


def refused_recipient(stage: Stage, rows: int = 200, rate: float = 20,
                      timeout_s: float = 90) -> tuple[IsolationRun, float]:
    """Accolades refuses one recipient with HTTP 403 (a destination the account may not send to) and accepts
    the rest: one refused row first, then `rows` others, at a limit of `rate`/s. Returns the run and the
    rate (messages/s) at which the others reached the provider, first to last."""
    refused_number = "+40 799 000 001"
    with running(AccoladesSimulator(forbidden=(refused_number.replace(" ", "").lstrip("+"),))) as sim:
        refused = add_rows(stage.engine, [refused_number])
        others = add_rows(stage.engine, [ro_number(i) for i in range(rows)])
        env = accolades_env(stage, sim, SMS_ACCOLADES_RATE=rate)
        processes = [stage.start("worker", env), stage.start("beat", env)]
        settle(stage.engine, refused + others, timeout_s)
        sends = sends_by_id(sim)
        arrivals = sorted(min(sends[i]) for i in others if i in sends)
        achieved = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
        run = IsolationRun("one recipient refused", _delays(sends, due_epochs(stage.engine, others), others),
                           [e["time"] for e in sim.events("reject")], outcomes(stage.engine, refused + others),
                           others, refused, [str(p.log_path) for p in processes])
        return run, achieved


# --- issue 26: a provider that loses its answers after processing -----------------------------------

@dataclass
class LossyRun:
    """How rows fared against a Mobilgroup that processes every request and loses a share of its answers."""

    rows: int
    settled_s: float
    """Seconds from the worker's start to every row settled."""
    outcomes: dict[int, tuple[str, str, str]] = field(repr=False)
    histories: dict[int, list[tuple[str, bool]]] = field(repr=False)
    """Per row, the commands of its request id as they came (`send`, `status`), each with whether its answer
    was lost."""
    accepted: Counter = field(repr=False)
    """How often Mobilgroup accepted each request id (a resend it already had is answered error 7)."""
    failures: dict[int, int] = field(repr=False)
    """Failed sends counted per row (the exponent of its backoff)."""
    logs: list[str] = field(default_factory=list, repr=False)

    @property
    def lost(self) -> Counter:
        return Counter(command for h in self.histories.values() for command, was_lost in h if was_lost)


def requests_of(sim: MobilgroupSimulator, request_id: str) -> list[tuple[str, bool]]:
    """The commands of `request_id` in the order they came, each with whether its answer was lost (the
    simulator journals a lost answer right after its command)."""
    history: list[tuple[str, bool]] = []
    for event in sim.events():
        if event.get("id") != request_id:
            continue
        if event["kind"] in ("send", "status"):
            history.append((event["kind"], False))
        elif event["kind"] == "fault" and history and history[-1] == (event["of"], False):
            history[-1] = (event["of"], True)
    return history


def lossy_mobilgroup(stage: Stage, rows: int = 200, lost_rate: float = 0.3, rate: float = 100,
                     timeout_s: float = 300, seed: int = 26) -> LossyRun:
    """Mobilgroup processes every request and loses `lost_rate` of its answers (HTTP 503 after processing);
    `rows` Mobilgroup rows, the default backoff (2 s doubling, at most 300 s)."""
    with running(MobilgroupSimulator(lost_rate=lost_rate, seed=seed)) as sim:
        ids = add_rows(stage.engine, [ru_number(i) for i in range(rows)])
        env = stage.env(stage.database_url, stage.redis_url,
                        **{"TMPDIR": str(stage.scratch), **FAST, "SMS_DEFAULT_PROVIDER": "mobilgroup",
                           "SMS_RETRY_BASE_S": 2, "SMS_RETRY_MAX_S": 300, "SMS_MOBILGROUP_RATE": rate,
                           "SMS_MOBILGROUP_IDENTICAL_S": 1, **mobilgroup_settings(sim)})
        began = time.time()
        processes = [stage.start("worker", env), stage.start("beat", env)]
        settled_at = settle(stage.engine, ids, timeout_s)
        time.sleep(2)  # anything still on its way for these rows reaches the simulator
        with stage.engine.connect() as conn:
            failures = dict(conn.execute(text("SELECT batchcontact_id, failures FROM sms_dispatch WHERE"
                                              " batchcontact_id BETWEEN :lo AND :hi"),
                                         {"lo": min(ids), "hi": max(ids)}).all())
        return LossyRun(rows, settled_at - began, outcomes(stage.engine, ids),
                        {i: requests_of(sim, str(i)) for i in ids},
                        Counter(e["id"] for e in sim.events("send") if e["outcome"] == "accepted"), failures,
                        [str(p.log_path) for p in processes])
