"""Engines and the database clock.

`engine_for(url)` gives one engine per URL per process, made safe across `fork()` (Celery's prefork pool
forks after the parent may have connected), and `wait_until_reachable(url, …)` waits for its database to
come up; `autocommit_twin(engine)` the same database without transactions of SQLAlchemy's, for the
statements `db.store` sends as one packet and for one-row reads.

Time is read off the database's clock, never a worker's (workers may run elsewhere with skewed clocks), on two
scales. asterCC's columns (`schedulertime`, `contacttime`) hold local time as asterCC writes it, compared with
`db_local_now()`. Every column of our own (leases, backoffs, the account circuit, retry windows, report
timeouts, and `due_at`, the due time converted at the claim) is UTC: `db_now()`, `db_now_plus(seconds)` and
`seconds_since(column)`, so a daylight-saving change on a server that keeps local time moves none of it.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from sqlalchemy import DateTime, Integer, create_engine, event, literal
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

DB_POOL_SIZE = 32
"""Most connections one process keeps to MariaDB (a 64-thread worker rarely has more than half its threads
in the database at once; a 33rd waits for a free one)."""

PING_IDLE_S = 5.0
"""A pooled connection idle for longer than this is pinged before use. One used more recently is not: under
load that saves two round trips per message, and a connection that worked a moment ago is as likely to
fail on its next statement as on a ping (a MariaDB restart breaks busy connections mid-use anyway; the
statement's error then invalidates the pool)."""

DB_CONNECT_TIMEOUT_S = 5
DB_READ_TIMEOUT_S = 60

REACH_RETRY_S = 2.0
"""Pause between two tries of `wait_until_reachable`."""

_engines: dict[str, Engine] = {}
_twins: dict[Engine, Engine] = {}
_lock = threading.Lock()


def engine_for(url: str) -> Engine:
    """The process's engine for `url`, created on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create(url)
        return engine


def wait_until_reachable(url: str, within_s: float, on_wait: Callable[[OperationalError], None]) -> None:
    """Return once the database at `url` accepts a connection; after `within_s` seconds of refusals, raise
    the last one. `on_wait` hears each refusal before the next try (every `REACH_RETRY_S`)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with engine_for(url).connect():
                return
        except OperationalError as exc:
            if time.monotonic() + REACH_RETRY_S > deadline:
                raise
            on_wait(exc)
            time.sleep(REACH_RETRY_S)



def autocommit_twin(engine: Engine) -> Engine:
    """An engine on `engine`'s database, with a pool of its own, whose connections commit every statement as
    it runs and go back to the pool without a ROLLBACK; disposed with `engine`.

    For work that is one statement, or a few sent together with their own `START TRANSACTION … COMMIT`
    (`db.store`): a transaction of `engine` ends in a COMMIT, or after a read in a ROLLBACK, and each is one
    more round trip to the server. A send has several of these; each costs both processes CPU (two system
    calls and a thread switch under the GIL on our side)."""
    twin = _twins.get(engine)
    if twin is None:
        with _lock:
            twin = _twins.get(engine)
            if twin is None:
                twin = _twins[engine] = _create(engine.url, autocommit=True)
                event.listen(engine, "engine_disposed", lambda _engine: twin.dispose())
    return twin


def _create(url, autocommit: bool = False) -> Engine:
    # skip_autocommit_rollback: without it SQLAlchemy still sends a ROLLBACK, which autocommit makes a no-op,
    # whenever a connection of the autocommit twin is closed.
    isolation = {"isolation_level": "AUTOCOMMIT", "skip_autocommit_rollback": True} if autocommit else {}
    # hide_parameters: a statement's error quotes its parameters, which hold recipients, reply texts and
    # provider ids; the error reaches logs, the result backend and Flower.
    options = {"hide_parameters": True, **isolation}
    if str(url).startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        # pool_recycle: MariaDB closes idle connections after wait_timeout; the ping of idle connections
        # (`_ping_if_idle`, instead of pool_pre_ping's ping on every checkout) catches restarts.
        # pool_reset_on_return=None: every use goes through a SQLAlchemy Connection, whose close() already
        # rolls back a transaction it left open; the pool's own ROLLBACK on every check-in was a second
        # round trip per transaction (2 of the 9 statements of a send).
        # pool_size: one connection per thread of a `--pool threads` worker that is in the database at the
        # same moment; connections open on demand, so a prefork child still holds one. Overflow connections
        # would be closed and reopened on every check-in under load.
        # Timeouts: a database host that drops packets must not hold a thread for minutes (the driver's
        # default is to wait for ever). The read timeout is above InnoDB's 50 s lock wait.
        engine = create_engine(url, pool_recycle=1800, pool_size=DB_POOL_SIZE, max_overflow=0,
                               pool_reset_on_return=None, pool_timeout=30,
                               connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S,
                                             "read_timeout": DB_READ_TIMEOUT_S, "write_timeout": DB_READ_TIMEOUT_S},
                               **options)
        event.listen(engine, "checkout", _ping_if_idle)
        event.listen(engine, "checkin", _note_return)
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    return engine


def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
    # A connection opened for this checkout has no return time: it needs no ping.
    if time.monotonic() - record.info.get("returned_at", float("inf")) < PING_IDLE_S:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:  # the pool discards this connection and checks out another (up to 3 times)
        raise DisconnectionError(f"stale pooled connection ({type(exc).__name__})") from exc


def _note_return(_dbapi_connection, record) -> None:
    record.info["returned_at"] = time.monotonic()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Beat, workers and the demo share one SQLite file: WAL lets readers run beside the one writer.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class db_now_plus(FunctionElement):  # noqa: N801 - reads as a SQL function
    """The database's UTC time plus `seconds` (may be negative or zero): the clock of our own columns.

    The offset travels as a bound parameter, not as literal SQL: SQLAlchemy caches compiled statements
    by their shape, and a literal would be cached with the first offset ever used."""

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0):
        super().__init__(literal(int(round(seconds)), Integer()))


def db_now() -> db_now_plus:
    return db_now_plus(0)


@compiles(db_now_plus)
def _now_default(element, compiler, **kw):
    return f"(UTC_TIMESTAMP() + INTERVAL {compiler.process(element.clauses, **kw)} SECOND)"


@compiles(db_now_plus, "sqlite")
def _now_sqlite(element, compiler, **kw):
    return f"datetime('now', {compiler.process(element.clauses, **kw)} || ' seconds')"


class db_local_now(FunctionElement):  # noqa: N801 - reads as a SQL function
    """The database's local time: the clock of asterCC's columns (`schedulertime`, `contacttime`)."""

    type = DateTime()
    inherit_cache = True


@compiles(db_local_now)
def _local_now_default(element, compiler, **kw):
    return "NOW()"


@compiles(db_local_now, "sqlite")
def _local_now_sqlite(element, compiler, **kw):
    # SQLite's 'now' is UTC unless asked for 'localtime'.
    return "datetime('now', 'localtime')"


class changed_before(FunctionElement):  # noqa: N801 - reads as a SQL function
    """How many rows the previous statement of this connection changed (MariaDB's `ROW_COUNT()`, SQLite's
    `changes()`): a statement can depend on the one just before it in the same transaction."""

    type = Integer()
    inherit_cache = True


@compiles(changed_before)
def _changed_before_default(element, compiler, **kw):
    return "ROW_COUNT()"


@compiles(changed_before, "sqlite")
def _changed_before_sqlite(element, compiler, **kw):
    return "changes()"


class plus_seconds(FunctionElement):  # noqa: N801 - reads as a SQL function
    """A time column plus `seconds` (a bound parameter, as in `db_now_plus`)."""

    type = DateTime()
    inherit_cache = True

    def __init__(self, column, seconds: float):
        super().__init__(column, literal(int(round(seconds)), Integer()))


@compiles(plus_seconds)
def _plus_seconds_default(element, compiler, **kw):
    column, seconds = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"({column} + INTERVAL {seconds} SECOND)"


@compiles(plus_seconds, "sqlite")
def _plus_seconds_sqlite(element, compiler, **kw):
    column, seconds = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"datetime({column}, {seconds} || ' seconds')"


class seconds_since(FunctionElement):  # noqa: N801 - reads as a SQL function
    """Whole seconds from a (UTC) time column of ours to the database's now; NULL when the column is."""

    type = Integer()
    inherit_cache = True


@compiles(seconds_since)
def _seconds_since_default(element, compiler, **kw):
    return f"TIMESTAMPDIFF(SECOND, {compiler.process(element.clauses, **kw)}, UTC_TIMESTAMP())"


@compiles(seconds_since, "sqlite")
def _seconds_since_sqlite(element, compiler, **kw):
    # Parenthesised: the expression may be negated or compared.
    return (f"(CAST(strftime('%s', 'now') AS INTEGER)"
            f" - CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER))")
