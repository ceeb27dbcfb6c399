"""Shared fixtures: a throw-away MariaDB database with asterCC's tables (made as asterCC makes them) and
ours, a Redis database for the broker and the throttle, and real `celery worker` / `celery beat`
subprocesses started with the environment a deployment would give them.

Nothing here skips: when MariaDB or Redis is missing, the fixtures raise and the tests fail, as they must
in CI. Every process started is stopped, every wait has a timeout, and the databases are dropped or
flushed afterwards.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest
import redis
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from db import schema
from db.engine import engine_for
from smsctl.processes import PROJECT_ROOT as ROOT  # noqa: F401 - the tests' name for it
from smsctl.processes import CeleryProcess, stop_all

MARIADB = os.environ.get("SMS_TEST_MARIADB", "mysql+mysqldb://root@127.0.0.1:3306")
REDIS = os.environ.get("SMS_TEST_REDIS", "redis://127.0.0.1:6379/11")
# Every Redis key of this test session carries this prefix, so two runs on one machine stay apart: the
# broker's (SMS_REDIS_PREFIX) and the rate limits' (SMS_THROTTLE_PREFIX, read by every in-process setting too).
REDIS_PREFIX = f"smstest-{uuid.uuid4().hex[:8]}:"
os.environ["SMS_THROTTLE_PREFIX"] = REDIS_PREFIX
CELERY_QUEUES = "dispatch,send.mobilgroup,send.accolades,send.ozeki,send.smsc"


@pytest.fixture(scope="session")
def mariadb_url():
    """A fresh MariaDB database with asterCC's tables (MyISAM, zero dates) and ours, dropped at the end."""
    name = f"sms_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(MARIADB + "/", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    url = f"{MARIADB}/{name}?charset=utf8mb4"
    schema.create_astercc(engine_for(url))
    schema.upgrade(url)
    yield url
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name}"))
    admin.dispose()


@pytest.fixture
def db(mariadb_url):
    """The test database's engine, with every table emptied before the test."""
    engine = engine_for(mariadb_url)
    with engine.begin() as conn:
        for table in ("cc10_batchcontacts", "cc10_batchcontact_archives", "sms_dispatch", "sms_message_ids",
                      "sms_breaker", "sms_meta", "sms_optout"):
            conn.execute(text(f"TRUNCATE TABLE {table}"))
    return engine


@pytest.fixture
def sqlite_db(tmp_path):
    """An SQLite database (the embedded default) with asterCC's tables and ours."""
    engine = engine_for(f"sqlite:///{tmp_path / 'sms.db'}")
    schema.create_astercc(engine)
    schema.upgrade(str(engine.url))
    yield engine
    engine.dispose()


@pytest.fixture
def redis_url():
    """Redis for broker and throttle; this session's keys are removed before and after the test."""
    client = redis.Redis.from_url(REDIS, socket_timeout=5)

    def clear():
        for key in client.scan_iter(match=REDIS_PREFIX + "*", count=1000):
            client.delete(key)

    clear()
    yield REDIS
    clear()
    client.close()


def insert_rows(engine, rows, schedule_sql: str = "'0000-00-00 00:00:00'") -> list[int]:
    """Insert asterCC rows as asterCC would: `rows` are (target, text or None for a missing archive)."""
    ids = []
    with engine.begin() as conn, schema.astercc_mode(conn):
        for target, body in rows:
            archive = 0
            if body is not None:
                archive = conn.execute(text(
                    "INSERT INTO cc10_batchcontact_archives (archivetype, content) VALUES ('sms', :c)"),
                    {"c": body}).lastrowid
            ids.append(conn.execute(text(
                "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
                f" created) VALUES (:a, :t, 'new', {schedule_sql}, 'agent', NOW())"),
                {"a": archive, "t": target}).lastrowid)
    return ids


def insert_campaign(engine, targets, body: str, *, creby: str = "campaigns", due=None) -> list[int]:
    """Insert a batch as asterCC stores a campaign: one archive row holding `body` and one row per target
    pointing at it, all created by `creby`, due at `due` (a local datetime, as asterCC writes them; default
    now). Works on MariaDB and SQLite alike. Returns the row ids in the order of `targets`."""
    from datetime import datetime

    from sqlalchemy import insert

    from db.models import BatchContact, BatchContactArchive

    due = due or datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content=body)
                               ).inserted_primary_key[0]
        rows = [dict(batchcontact_archive_id=archive, target=t, status="new", creby=creby, schedulertime=due,
                     created=datetime.now(), error_msg="", responsenote="") for t in targets]
        conn.execute(insert(BatchContact), rows)
        return list(conn.scalars(text("SELECT id FROM cc10_batchcontacts WHERE batchcontact_archive_id = :a"
                                      " ORDER BY id"), {"a": archive}))


@contextmanager
def deadlocks(engine, table: str, times: int):
    """MariaDB itself answers the next `times` UPDATEs of `table` with a deadlock error (errno 1213), from
    a trigger: a real deadlock between two sends cannot be timed in a test. The countdown table is MyISAM
    so that the victim's rollback does not undo it. Yields a function that tells how many are left."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE test_deadlocks (n INT NOT NULL) ENGINE=MyISAM"))
        conn.execute(text("INSERT INTO test_deadlocks VALUES (:n)"), {"n": times})
        conn.execute(text(
            f"CREATE TRIGGER test_deadlock BEFORE UPDATE ON {table} FOR EACH ROW BEGIN"
            " IF (SELECT n FROM test_deadlocks) > 0 THEN UPDATE test_deadlocks SET n = n - 1;"
            " SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'Deadlock found (test)'; END IF; END"))

    def left() -> int:
        with engine.connect() as conn:
            return conn.scalar(text("SELECT n FROM test_deadlocks"))

    try:
        yield left
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS test_deadlock"))
            conn.execute(text("DROP TABLE IF EXISTS test_deadlocks"))


def rows_by_id(engine) -> dict[int, dict]:
    with engine.connect() as conn:
        result = conn.execute(text(
            "SELECT b.id, b.status, b.error_msg, b.contacttime, b.responsenote, d.state, d.attempts, d.failures,"
            " d.unknowns, d.wait_reason, d.provider, d.accepted_at FROM cc10_batchcontacts b"
            " LEFT JOIN sms_dispatch d ON d.batchcontact_id = b.id"))
        return {row.id: row._asdict() for row in result}


def kill_connections(database_url: str, ids: list[int] | None = None) -> None:
    """End MariaDB connections server-side, as a restart would: those in `ids`, or else every connection to
    this database but the killer's own. Their clients only notice on their next statement or ping."""
    killer = create_engine(database_url, poolclass=NullPool)
    with killer.connect() as conn:
        if ids is None:
            ids = list(conn.scalars(text("SELECT ID FROM information_schema.PROCESSLIST"
                                         " WHERE DB = DATABASE() AND ID <> CONNECTION_ID()")))
        for victim in ids:
            conn.execute(text(f"KILL {int(victim)}"))
    killer.dispose()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (for a server to bind, or a connection to be refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def app_env(database_url: str, broker_url: str, **settings) -> dict[str, str]:
    """The environment of a deployment: our settings only, on top of this process's PATH and such."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "CELERY_"))}
    env.update({"SMS_DATABASE_URL": database_url, "CELERY_BROKER_URL": broker_url,
                "SMS_REDIS_PREFIX": REDIS_PREFIX, "SMS_THROTTLE_PREFIX": REDIS_PREFIX, "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in settings.items()})
    return env


def idle_worker_env(database_url: str, broker_url: str) -> dict[str, str]:
    """A deployment whose worker starts but never reaches a provider: for tests of Celery's plumbing, which
    send tasks for rows that do not exist (each send finds nothing to do and succeeds)."""
    return app_env(database_url, broker_url, SMS_DEFAULT_PROVIDER="mobilgroup",
                   SMS_MOBILGROUP_URL="http://127.0.0.1:9/extxml.php", SMS_MOBILGROUP_USER_ID="1",
                   SMS_MOBILGROUP_USER="user", SMS_MOBILGROUP_PASSWORD="secret")


def publish(broker_url: str, script: str) -> None:
    """Run `script` (Python that sends tasks, e.g. through `tasks.jobs`) in a process of its own, configured
    for the test broker, as the dispatcher would: the test process keeps no Celery app of its own."""
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "SMS_REDIS_PREFIX": REDIS_PREFIX}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=120, check=True)


WORKER_COMMAND = ["celery", "-A", "tasks", "worker"]


def compose_services() -> dict[str, dict]:
    """The services of docker-compose.yml, as written."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def compose_worker(service: str) -> list[str]:
    """The options of a worker service's `celery -A tasks worker` command in docker-compose.yml (pool,
    concurrency, queues), for tests that run the workers the deployment runs."""
    command = compose_services()[service]["command"]
    assert command[:4] == WORKER_COMMAND, f"{service} is not a dispatcher worker"
    return command[4:]


@pytest.fixture
def celery(tmp_path):
    """Start Celery processes: `celery("worker" | "beat" | "flower", env, *extra_args)`; all are stopped
    after the test. A worker consumes every queue unless `extra_args` name some with `-Q`."""
    started: list[CeleryProcess] = []

    def start(kind: str, env: dict[str, str], *extra: str) -> CeleryProcess:
        args = [kind]
        if kind == "worker":
            args += ["-l", "info", "-n", f"test{len(started)}-{uuid.uuid4().hex[:6]}@%h",
                     "--without-mingle", "--without-gossip"]
            if "-Q" not in extra:
                args += ["-Q", CELERY_QUEUES]
        elif kind == "beat":
            args += ["-l", "info", "-s", str(tmp_path / f"beat-{len(started)}")]
        process = CeleryProcess(args + list(extra), env, tmp_path / f"{kind}-{len(started)}.log")
        started.append(process)
        return process

    yield start
    stop_all(started)


@contextmanager
def started(server):
    """Run a simulator for the duration of a `with` block."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
