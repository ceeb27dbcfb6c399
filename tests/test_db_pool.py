"""The connection pool's liveness check (`db/engine.py`): connections idle for a while are pinged before
use, so a MariaDB restart or a killed connection costs nothing; connections in steady use are not, which
saves two round trips per message.

Against the real MariaDB: the server side of a pooled connection is killed with `KILL`.
"""
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from db import engine as db_engine
from db import schema
from tests.conftest import insert_rows, kill_connections


@pytest.fixture
def pool_of_one(mariadb_url):
    """A new engine used one connection at a time, so that its pool only ever holds one connection."""
    engine = db_engine._create(mariadb_url)
    yield engine
    engine.dispose()


def _kill_pooled_connection(engine, database_url: str) -> None:
    with engine.connect() as conn:
        victim = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
    kill_connections(database_url, [victim])


def test_an_idle_connection_killed_by_the_server_is_replaced_unnoticed(pool_of_one, mariadb_url, monkeypatch):
    monkeypatch.setattr(db_engine, "PING_IDLE_S", 0.0)
    _kill_pooled_connection(pool_of_one, mariadb_url)
    with pool_of_one.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_a_connection_in_steady_use_is_not_pinged(pool_of_one, mariadb_url, monkeypatch):
    monkeypatch.setattr(db_engine, "PING_IDLE_S", 3600.0)
    _kill_pooled_connection(pool_of_one, mariadb_url)
    # No ping, so the statement itself meets the dead connection; the error invalidates the pool ...
    with pytest.raises(OperationalError), pool_of_one.connect() as conn:
        conn.execute(text("SELECT 1"))
    # ... and the next use opens a fresh connection.
    with pool_of_one.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_a_connection_used_in_astercc_s_permissive_mode_goes_back_to_the_pool_in_the_server_s_mode(
        pool_of_one, db):
    """Creating asterCC's tables, or writing a row as asterCC does, needs its permissive `sql_mode`; our own
    statements must not inherit it from a pooled connection (they would store a truncated value where the
    server refuses one everywhere else)."""
    def mode() -> str:
        with pool_of_one.connect() as conn:
            return conn.scalar(text("SELECT @@SESSION.sql_mode"))

    strict = mode()
    assert "STRICT_TRANS_TABLES" in strict, f"the server's own mode is not strict: {strict!r}"
    schema.create_astercc(pool_of_one)
    assert mode() == strict
    insert_rows(pool_of_one, [("+7 916 100-00-01", "hello")])
    assert mode() == strict
