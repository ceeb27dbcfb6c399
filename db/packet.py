"""A transaction as one packet: how `db.store` sends its hot statements to MariaDB.

A send's lease and its record are each a short transaction of a few statements. Built once (the builders
in `db.store` are cached), rendered to the driver's SQL once per dialect (`run`), and on MariaDB sent as
one packet `START TRANSACTION; …; COMMIT` (`in_one_trip`): one round trip instead of one per statement, and
none of SQLAlchemy's per-execution CPU. Transactions, pooling and error types stay SQLAlchemy's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.exc import DBAPIError

from .engine import autocommit_twin


@dataclass(frozen=True)
class _Rendered:
    sql: str
    # One per parameter of `sql`, in order: the caller's name for it, or None and the value the statement
    # carries itself.
    slots: tuple[tuple[str | None, object], ...]

    def values(self, params: dict) -> tuple:
        return tuple(value if name is None else params[name] for name, value in self.slots)


@functools.lru_cache(maxsize=None)
def _render(statement, dialect) -> _Rendered:
    """`statement` as the driver's SQL for `dialect`. Only for statements whose parameters and columns the
    driver takes and gives as they are (no type conversion by SQLAlchemy) and without expanding IN lists:
    checked here, once, so that a statement changed later fails loudly instead of running differently."""
    compiled = statement.compile(dialect=dialect)
    slots, converted = [], []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if not bind.required:  # its value is known now: converted once, here
            slots.append((None, convert(bind.value) if convert else bind.value))
            continue
        slots.append((name, None))
        if convert:
            converted.append(name)
    converted += [column.name for column in getattr(statement, "selected_columns", ())
                  if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None]
    if not compiled.positional or "POSTCOMPILE" in compiled.string or converted:
        raise ValueError(f"cannot run as rendered SQL on {dialect.name}: {converted or compiled.string}")
    return _Rendered(compiled.string, tuple(slots))


def run(conn: Connection, statement, **params) -> CursorResult:
    """Run a statement built once (cached by its builder) with `params` for its named parameters. It goes to the driver as
    SQL rendered once per dialect, which skips about half a millisecond of SQLAlchemy's CPU per send (its
    cache lookup and parameter processing for compiled statements); transactions, pooling and error
    handling stay SQLAlchemy's."""
    rendered = _render(statement, conn.dialect)
    return conn.exec_driver_sql(rendered.sql, rendered.values(params))


@functools.lru_cache(maxsize=None)
def _transaction_packet(statements: tuple, dialect) -> _Rendered:
    parts = [_render(statement, dialect) for statement in statements]
    return _Rendered("; ".join(["START TRANSACTION", *(part.sql for part in parts), "COMMIT"]),
                     sum((part.slots for part in parts), ()))


def in_one_trip(engine: Engine, statements: tuple, **params) -> list[tuple[int, list[tuple]]]:
    """Run `statements` (each built once, `functools.lru_cache`) with `params` as one transaction; returns each one's row count
    and rows. On MariaDB the transaction goes to the server as one packet of statements (mysqlclient allows
    several per query), on a connection of `autocommit_twin` so that the packet's own `START TRANSACTION …
    COMMIT` is the only transaction: one round trip instead of one per statement and one for the COMMIT.

    The packet is run on the driver's cursor: SQLAlchemy reads only a query's first result, and an error in
    a later statement surfaces when it closes the cursor, where it only logs it. Errors are raised as
    SQLAlchemy's (`DBAPIError.instance`), as every other statement's are."""
    if engine.dialect.name != "mysql":
        with engine.begin() as conn:
            results = [run(conn, statement, **params) for statement in statements]
            return [(r.rowcount, r.fetchall() if r.returns_rows else []) for r in results]
    with autocommit_twin(engine).connect() as conn:
        packet = _transaction_packet(statements, conn.dialect)
        values = packet.values(params)
        dbapi, connection = conn.dialect.loaded_dbapi, conn.connection.dbapi_connection
        cursor = None
        try:
            cursor = connection.cursor()
            cursor.execute(packet.sql, values)  # START TRANSACTION's result
            results = []
            for _ in statements:
                cursor.nextset()
                results.append((cursor.rowcount, list(cursor.fetchall())))
            cursor.close()  # reads COMMIT's result
            return results
        except BaseException as exc:
            # The server stops a packet at its first failing statement, which leaves the transaction open on
            # this connection. Closing the connection makes the server roll it back; a retry starts afresh.
            conn.invalidate()
            if isinstance(exc, dbapi.Error):
                # `connection_invalidated` tells callers the connection was lost (a restart), as SQLAlchemy's own
                # errors do; dropping it here was only a precaution.
                lost = conn.dialect.is_disconnect(exc, connection, cursor)
                raise DBAPIError.instance(packet.sql, values, exc, dbapi.Error, connection_invalidated=lost,
                                          dialect=conn.dialect,
                                          hide_parameters=conn.engine.hide_parameters) from exc
            raise


