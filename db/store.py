"""Every read and write of the workflow, as short statements that hold no connection between them.

The claim works without transactions or row locks on asterCC's tables (they may be MyISAM): candidates are
read from asterCC, then inserted into `sms_dispatch`, whose primary key on the row id lets exactly one
claimer win each row; the winners are found by their claim token and only then marked `pending` in asterCC
by a conditional `UPDATE … WHERE status='new'`. Every later change of a row goes through a compare-and-set
on `sms_dispatch.state`, so a redelivered task, a second beat or a late report changes nothing it should not.

Functions take an `Engine` and return plain values; callers never hold a session across a provider call.
"""
from __future__ import annotations

import random
import re
import time
import functools
import uuid
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import and_, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from .engine import autocommit_twin, changed_before, db_now, db_now_plus, seconds_since
from .models import (
    ERROR_MSG_MAX,
    RESPONSENOTE_MAX,
    BatchContact,
    BatchContactArchive,
    Dispatch,
    DispatchState as S,
    MessageId,
)

# An operator who sets a finished row back to `new` in asterCC asks for a resend; a row must have been
# final this long before that is believed, so that a slower second beat cannot resend a row just finished.
RESEND_AFTER_S = 60
DEADLOCK_RETRIES = 5
DEADLOCK = 1213


@dataclass(frozen=True)
class Claimed:
    """A row this claimer won: its id and asterCC's `target` exactly as typed."""

    id: int
    target: str


@dataclass(frozen=True)
class SendJob:
    """What a send needs, loaded in one query after the lease was taken."""

    id: int
    provider: str
    recipient: str
    text: str | None          # None: the archive row is missing
    attempts: int
    age_s: int                # seconds since the first attempt
    resends: int              # operator resends of this row so far


@dataclass(frozen=True)
class NotYetDue:
    """The row waits for a retry that falls due in `in_s` seconds by the database's clock: the task that
    came for it runs early (the worker that scheduled it has a clock behind this one's)."""

    in_s: int


@functools.lru_cache(maxsize=None)
def _insert_ignore(model):
    """An INSERT into `model`'s table that skips rows whose key exists (the claim's arbiter), on MariaDB and
    SQLite alike."""
    return insert(model).prefix_with("IGNORE", dialect="mysql").prefix_with("OR IGNORE", dialect="sqlite")


_BEYOND_BMP = re.compile("[\U00010000-\U0010FFFF]")


def _fit(text: str, limit: int) -> str:
    """`text` as a `limit`-character column of asterCC's holds it: cut with an ellipsis, and every character
    beyond three bytes of UTF-8 (emoji, say) shown as U+FFFD. asterCC's tables are utf8, three bytes a
    character at most: MySQL in strict mode refuses the statement otherwise, and a reply that cannot be
    written is delivered again and again."""
    text = _BEYOND_BMP.sub("\ufffd", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- dispatch -------------------------------------------------------------------------------------

def due_rows(limit: int):
    """The query for the ids of up to `limit` due SMS rows, oldest due first: what every dispatch tick
    asks asterCC's table (`EXPLAIN` it to check the plan; see `schema.add_astercc_index`)."""
    bc, arc = BatchContact.__table__, BatchContactArchive.__table__
    return (
        select(bc.c.id)
        .select_from(bc.outerjoin(arc, arc.c.id == bc.c.batchcontact_archive_id))
        .where(bc.c.status == "new", bc.c.schedulertime <= db_now(),
               or_(arc.c.archivetype == "sms", arc.c.id.is_(None)))
        .order_by(bc.c.schedulertime, bc.c.id)
        .limit(limit)
    )


def _errno(exc: OperationalError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def retry_lock_conflicts(fn):
    """Run `fn` again (up to `DEADLOCK_RETRIES` times, after a short random pause) when InnoDB picks its
    transaction as a deadlock victim. Sends, claims and reports update the same `sms_dispatch` rows from
    many processes, so this happens under load; the victim's transaction was rolled back whole, so `fn` must
    be one transaction, or several that are each safe to run again. Without this the send task failed and
    the row waited for the reaper (`SMS_REQUEUE_AFTER_S`).

    A lock wait timeout (1205) is not retried: it has already waited `innodb_lock_wait_timeout` (50 s), and
    a few more such waits inside `record_accepted` could outlast the send lease and get a message sent twice."""
    @functools.wraps(fn)
    def retrying(*args, **kwargs):
        attempts = 1
        while True:
            try:
                return fn(*args, **kwargs)
            except OperationalError as exc:
                if _errno(exc) != DEADLOCK or attempts >= DEADLOCK_RETRIES:
                    raise
                attempts += 1
                time.sleep(random.uniform(0.01, 0.1))
    return retrying


def claim_due(engine: Engine, limit: int) -> list[Claimed]:
    """Claim up to `limit` due SMS rows (status `new`, `schedulertime <= NOW()`, zero date = now), oldest
    due first; mark them `pending`; return the ones this call won. Safe with several claimers at once.

    Two transactions: the first records the claim under a token of this call's own, the second marks the
    rows this token won `pending`; each is retried on its own, so a lock conflict in the second does not
    leave the first's rows behind (a dispatch killed between the two does: see `find_unrouted`)."""
    token = uuid.uuid4().hex
    if not _record_claims(engine, limit, token):
        return []
    return _take_won(engine, token)


@retry_lock_conflicts
def _record_claims(engine: Engine, limit: int, token: str) -> bool:
    with engine.begin() as conn:
        ids = list(conn.scalars(due_rows(limit)))
        if not ids:
            return False
        # The database's clock is read once and sent as a value: with a SQL function among the values,
        # mysqlclient sends one INSERT per row instead of one for the whole batch.
        now = conn.scalar(select(db_now()))
        conn.execute(_insert_ignore(Dispatch), [
            {"batchcontact_id": i, "claim_token": token, "state": S.QUEUED, "attempts": 0, "polls": 0,
             "parts": 1, "created_at": now, "updated_at": now} for i in ids
        ])
        # Rows already in sms_dispatch and final for a while, yet `new` again in asterCC: a resend.
        resent = (Dispatch.batchcontact_id.in_(ids), Dispatch.state.in_(S.FINAL + (S.ACCEPTED,)),
                  Dispatch.updated_at <= db_now_plus(-RESEND_AFTER_S))
        # The earlier send's provider ids go with it: a receipt that names one (smsc.ru's come late, or
        # again) is about that send and must not be taken for the new one's.
        conn.execute(delete(MessageId).where(
            MessageId.batchcontact_id.in_(select(Dispatch.batchcontact_id).where(*resent))))
        conn.execute(
            update(Dispatch)
            .where(*resent)
            .values(claim_token=token, state=S.QUEUED, attempts=0, polls=0, provider=None,
                    resends=Dispatch.resends + 1,
                    provider_message_id=None, last_error=None, first_attempt_at=None,
                    next_attempt_at=None, lease_until=None, accepted_at=None, poll_at=None,
                    updated_at=db_now())
        )
    return True


@retry_lock_conflicts
def _take_won(engine: Engine, token: str) -> list[Claimed]:
    bc = BatchContact.__table__
    with engine.begin() as conn:
        won = list(conn.scalars(select(Dispatch.batchcontact_id).where(Dispatch.claim_token == token)))
        if not won:
            return []
        conn.execute(update(BatchContact).where(BatchContact.id.in_(won), BatchContact.status == "new")
                     .values(status="pending"))
        # Oldest due first, so that a backlog drains in due order within a batch too.
        rows = conn.execute(select(bc.c.id, bc.c.target).where(bc.c.id.in_(won))
                            .order_by(bc.c.schedulertime, bc.c.id))
        return [Claimed(r.id, r.target or "") for r in rows]


def count_inflight(engine: Engine) -> int:
    """Rows claimed but not yet handed to a provider (queued, sending, waiting to retry)."""
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Dispatch)
                           .where(Dispatch.state.in_((S.QUEUED, S.SENDING, S.RETRY))))


ROUTES_PER_STATEMENT = 512
"""Rows whose route one UPDATE records: a batch of 500 (the default) in one statement, and 10,000 within
SQLite's 32,766 parameters per statement."""


@retry_lock_conflicts
def assign_routes(engine: Engine, routes: dict[int, tuple[str, str]]) -> None:
    """Record each claimed row's provider and normalised recipient: {row id: (provider, recipient)}."""
    if not routes:
        return
    by_provider: dict[str, list[tuple[int, str]]] = {}
    for row_id, (provider, recipient) in routes.items():
        by_provider.setdefault(provider, []).append((row_id, recipient))
    # An UPDATE per provider and up to 512 rows, not one per row (an executemany of UPDATEs is a round
    # trip per row). The rows go in padded to a power of two (the last row repeated, which changes
    # nothing), so that ten statements, each built and rendered once, serve every batch: building one for
    # every batch cost more CPU than sending its rows.
    with engine.begin() as conn:
        for provider, pairs in by_provider.items():
            for start in range(0, len(pairs), ROUTES_PER_STATEMENT):
                chunk = pairs[start:start + ROUTES_PER_STATEMENT]
                size = 1 << (len(chunk) - 1).bit_length()
                chunk += chunk[-1:] * (size - len(chunk))
                params = {"provider": provider}
                for k, (row_id, recipient) in enumerate(chunk):
                    params[f"i{k}"], params[f"r{k}"] = row_id, recipient
                _run(conn, _set_routes(size), **params)


@functools.lru_cache(maxsize=None)
def _set_routes(size: int):
    d = Dispatch.__table__
    ids = [bindparam(f"i{k}", type_=d.c.batchcontact_id.type) for k in range(size)]
    return (
        update(d).where(d.c.batchcontact_id.in_(ids))
        .values(provider=bindparam("provider"),
                recipient=case(*((d.c.batchcontact_id == ids[k], bindparam(f"r{k}")) for k in range(size))))
    )


# --- send -----------------------------------------------------------------------------------------

@retry_lock_conflicts
def begin_send(engine: Engine, row_id: int, lease_s: int) -> SendJob | NotYetDue | None:
    """Take the send lease on a row (compare-and-set) and load what the send needs, in one transaction (one
    round trip on MariaDB: `_in_one_trip`).

    Returns None when the row is not ours to send now: already sending under a live lease, accepted or
    final. That is what makes a redelivered or duplicated task a no-op. `NotYetDue` when it waits for a
    retry that is not due yet by the database's clock."""
    (taken, _), (_, rows) = _in_one_trip(engine, (_take_lease(lease_s), _send_job()), row_id=row_id)
    if not rows:
        return None
    provider, recipient, attempts, resends, age_s, astercc_id, content, state, due_in_s = rows[0]
    if not taken:
        return NotYetDue(due_in_s) if state in S.SENDABLE and (due_in_s or 0) > 0 else None
    if astercc_id is None:  # asterCC's row vanished under us
        finish_failed(engine, row_id, "the SMS row was deleted before it could be sent")
        return None
    return SendJob(row_id, provider, recipient or "", content, attempts, age_s or 0, resends)


# The statements of every send are built once (per lease or poll delay) with the row id as a parameter,
# and rendered to the driver's SQL once per dialect (`_run`): building a statement, and SQLAlchemy's work
# on a compiled one at each execution, cost more CPU than having MariaDB run it.

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


def _run(conn: Connection, statement, **params) -> CursorResult:
    """Run a statement built once below with `params` for its named parameters. It goes to the driver as
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


def _in_one_trip(engine: Engine, statements: tuple, **params) -> list[tuple[int, list[tuple]]]:
    """Run `statements` (built once below) with `params` as one transaction; returns each one's row count
    and rows. On MariaDB the transaction goes to the server as one packet of statements (mysqlclient allows
    several per query), on a connection of `autocommit_twin` so that the packet's own `START TRANSACTION …
    COMMIT` is the only transaction: one round trip instead of one per statement and one for the COMMIT.

    The packet is run on the driver's cursor: SQLAlchemy reads only a query's first result, and an error in
    a later statement surfaces when it closes the cursor, where it only logs it. Errors are raised as
    SQLAlchemy's (`DBAPIError.instance`), as every other statement's are."""
    if engine.dialect.name != "mysql":
        with engine.begin() as conn:
            results = [_run(conn, statement, **params) for statement in statements]
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


@functools.lru_cache(maxsize=None)
def _take_lease(lease_s: int):
    d = Dispatch
    return (
        update(d)
        .where(d.batchcontact_id == bindparam("row_id"), d.provider.is_not(None), or_(
            # Not `in_()`: its list is expanded at each execution, which `_run` does not do.
            and_(or_(*(d.state == state for state in S.SENDABLE)),
                 or_(d.next_attempt_at.is_(None), d.next_attempt_at <= db_now_plus(2))),
            and_(d.state == S.SENDING, d.lease_until < db_now()),
        ))
        .values(state=S.SENDING, attempts=d.attempts + 1, lease_until=db_now_plus(lease_s),
                first_attempt_at=func.coalesce(d.first_attempt_at, db_now()), updated_at=db_now())
    )


@functools.lru_cache(maxsize=None)
def _send_job():
    d, bc, arc = Dispatch, BatchContact.__table__, BatchContactArchive.__table__
    return (
        select(d.provider, d.recipient, d.attempts, d.resends, seconds_since(d.first_attempt_at).label("age_s"),
               bc.c.id.label("astercc_id"), arc.c.content, d.state,
               (-seconds_since(d.next_attempt_at)).label("due_in_s"))
        .select_from(d.__table__.outerjoin(bc, bc.c.id == d.batchcontact_id)
                     .outerjoin(arc, arc.c.id == bc.c.batchcontact_archive_id))
        .where(d.batchcontact_id == bindparam("row_id"))
    )


@functools.lru_cache(maxsize=None)
def _accept(poll_after_s: int | None):
    d = Dispatch
    return (
        update(d).where(d.batchcontact_id == bindparam("row_id"), d.state == S.SENDING)
        .values(state=S.ACCEPTED, provider_message_id=bindparam("p_ids"), parts=bindparam("p_parts"),
                accepted_at=db_now(), lease_until=None, last_error=None, updated_at=db_now(),
                poll_at=None if poll_after_s is None else db_now_plus(poll_after_s))
    )


@functools.lru_cache(maxsize=None)
def _contacted():
    """asterCC's side of `_accept`, right after it: `success` only if that UPDATE took the row, else (a
    report came first and set the outcome) just the contact time."""
    bc = BatchContact
    took = changed_before() > 0
    return (update(bc).where(bc.id == bindparam("row_id"))
            .values(contacttime=db_now(), status=case((took, "success"), else_=bc.status),
                    error_msg=case((took, ""), else_=bc.error_msg)))


@functools.lru_cache(maxsize=None)
def _index_ids(count: int):
    """File `count` provider ids (`m0`, `m1`, …) under the row (`row_id`, `provider`), keeping an existing
    entry."""
    return _insert_ignore(MessageId).values([
        {"provider": bindparam("provider"), "provider_message_id": bindparam(f"m{k}"),
         "batchcontact_id": bindparam("row_id")} for k in range(count)])


@retry_lock_conflicts
def record_accepted(engine: Engine, row_id: int, provider_message_ids: list[str], parts: int,
                    poll_after_s: int | None, *, provider: str, index_ids: bool) -> None:
    """`provider` took the message: asterCC `success` with `contacttime`; the provider's ids go on the
    dispatch record, and with `index_ids` also into `sms_message_ids`, where a report naming only one of
    them finds its row (a statement per message saved for providers whose reports carry our reference).

    A delivery report can arrive before this is recorded (fast callbacks); then the row is already final
    and only `contacttime` is filled in. One transaction (one round trip on MariaDB: `_in_one_trip`)."""
    indexed = provider_message_ids if index_ids else []
    statements = ((_index_ids(len(indexed)),) if indexed else ()) + (_accept(poll_after_s), _contacted())
    _in_one_trip(engine, statements, row_id=row_id, provider=provider, p_parts=parts,
                 p_ids=_fit(",".join(provider_message_ids), 255) or None,
                 **{f"m{k}": m for k, m in enumerate(indexed)})


def finish_failed(engine: Engine, row_id: int, reason: str) -> None:
    """The message can never be sent as it is: asterCC `failed` with the reason (unless a delivery report
    has already finished the row)."""
    _finish(engine, row_id, S.FAILED, "failed", reason)


def finish_error(engine: Engine, row_id: int, reason: str) -> None:
    """We gave up on a technical failure: asterCC `error` with the reason (unless a delivery report has
    already finished the row)."""
    _finish(engine, row_id, S.ERROR, "error", reason)


@retry_lock_conflicts
def _finish(engine: Engine, row_id: int, state: str, status: str, reason: str) -> None:
    # Only a row not yet accepted or final: a delivery report may have finished it while its send was still
    # failing (a callback that beat our timeout), and a final outcome is never overwritten.
    with engine.begin() as conn:
        moved = conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id,
                                                    Dispatch.state.in_((S.QUEUED, S.SENDING, S.RETRY)))
                             .values(state=state, last_error=_fit(reason, 255), lease_until=None,
                                     updated_at=db_now()))
        if moved.rowcount:
            conn.execute(update(BatchContact).where(BatchContact.id == row_id)
                         .values(status=status, error_msg=_fit(reason, ERROR_MSG_MAX)))


@retry_lock_conflicts
def schedule_retry(engine: Engine, row_id: int, delay_s: float, reason: str, *, count_attempt: bool) -> None:
    """Give the lease back; the row may be sent again after `delay_s`. A throttled or paused send is not
    a failed attempt (`count_attempt=False` takes back the attempt `begin_send` counted)."""
    d = Dispatch
    values = dict(state=S.RETRY, next_attempt_at=db_now_plus(delay_s), lease_until=None,
                  last_error=_fit(reason, 255), updated_at=db_now())
    if not count_attempt:
        values["attempts"] = case((d.attempts > 0, d.attempts - 1), else_=0)
    with engine.begin() as conn:
        conn.execute(update(d).where(d.batchcontact_id == row_id, d.state == S.SENDING).values(**values))


# --- delivery reports -----------------------------------------------------------------------------

OPEN_TO_REPORTS = (S.ACCEPTED, S.SENDING, S.RETRY)
"""States a delivery report may move a row out of (forward-only)."""


@dataclass(frozen=True)
class ReportTarget:
    id: int
    state: str
    resends: int


def find_report_target(engine: Engine, provider: str, *, reference: int | None = None,
                       provider_message_id: str | None = None, recipient: str | None = None) -> ReportTarget | None:
    """The dispatch record a report is about: by our row id, else by the provider's id, else (replies) the
    latest message this provider sent to `recipient`."""
    d = Dispatch
    query = select(d.batchcontact_id, d.state, d.resends).where(d.provider == provider)
    # A read of one row per report: on the autocommit twin it needs no ROLLBACK round trip afterwards.
    with autocommit_twin(engine).connect() as conn:
        if reference is not None:
            row = conn.execute(query.where(d.batchcontact_id == reference)).first()
        elif provider_message_id:
            row = conn.execute(query.join(MessageId, MessageId.batchcontact_id == d.batchcontact_id)
                               .where(MessageId.provider == provider,
                                      MessageId.provider_message_id == provider_message_id)).first()
        elif recipient:
            row = conn.execute(query.where(d.recipient == recipient, d.accepted_at.is_not(None))
                               .order_by(d.accepted_at.desc(), d.batchcontact_id.desc()).limit(1)).first()
        else:
            row = None
    return ReportTarget(row.batchcontact_id, row.state, row.resends) if row else None


@retry_lock_conflicts
def apply_final_report(engine: Engine, row_id: int, delivered: bool, reason: str) -> bool:
    """Move a row forward to `delivered` or `failed`, and asterCC's status with it; False when it was already
    final (forward-only). One transaction (one round trip on MariaDB: `_in_one_trip`)."""
    (moved, _), _ = _in_one_trip(engine, (_finalise(delivered), _outcome_to_astercc(delivered)), row_id=row_id,
                                 last_error=_fit(reason, 255), error_msg=_fit(reason, ERROR_MSG_MAX))
    return bool(moved)


@functools.lru_cache(maxsize=None)
def _finalise(delivered: bool):
    d = Dispatch
    return (
        update(d)
        .where(d.batchcontact_id == bindparam("row_id"), or_(*(d.state == state for state in OPEN_TO_REPORTS)))
        .values(state=S.DELIVERED if delivered else S.FAILED, lease_until=None, updated_at=db_now(),
                last_error=None if delivered else bindparam("last_error"))
    )


@functools.lru_cache(maxsize=None)
def _outcome_to_astercc(delivered: bool):
    """asterCC's side of `_finalise`, right after it: only if that UPDATE moved the row."""
    bc = BatchContact
    moved = changed_before() > 0
    values = {"status": case((moved, "success" if delivered else "failed"), else_=bc.status)}
    if not delivered:
        values["error_msg"] = case((moved, bindparam("error_msg")), else_=bc.error_msg)
    return update(bc).where(bc.id == bindparam("row_id")).values(**values)


@retry_lock_conflicts
def record_reply(engine: Engine, row_id: int, text: str) -> None:
    """A recipient's reply goes to asterCC's `responsenote`."""
    with engine.begin() as conn:
        conn.execute(update(BatchContact).where(BatchContact.id == row_id)
                     .values(responsenote=_fit(text, RESPONSENOTE_MAX)))


# --- polling (Mobilgroup) -------------------------------------------------------------------------

@retry_lock_conflicts
def claim_due_polls(engine: Engine, provider: str, limit: int, lease_s: int) -> list[int]:
    """Rows of `provider` accepted and past their poll time; their poll time is pushed `lease_s` ahead so
    that a second poller does not ask again meanwhile."""
    d = Dispatch
    with engine.begin() as conn:
        ids = list(conn.scalars(
            select(d.batchcontact_id)
            .where(d.provider == provider, d.state == S.ACCEPTED, d.poll_at <= db_now())
            .order_by(d.poll_at).limit(limit)
        ))
        if ids:
            conn.execute(update(d).where(d.batchcontact_id.in_(ids), d.poll_at <= db_now())
                         .values(poll_at=db_now_plus(lease_s)))
    return ids


def resends_of(engine: Engine, row_id: int) -> int:
    """How often an operator sent the row again (0 for a row sent once)."""
    with autocommit_twin(engine).connect() as conn:  # no ROLLBACK round trip after the read
        return conn.scalar(select(Dispatch.resends).where(Dispatch.batchcontact_id == row_id)) or 0


@retry_lock_conflicts
def poll_again(engine: Engine, row_id: int, after_s: int, max_polls: int) -> bool:
    """The status is still open: ask again after `after_s`, or stop at `max_polls` (the row keeps
    `success`, marked unconfirmed). Returns True when another poll is scheduled."""
    d = Dispatch
    with engine.begin() as conn:
        conn.execute(update(d).where(d.batchcontact_id == row_id, d.state == S.ACCEPTED)
                     .values(polls=d.polls + 1, updated_at=db_now(), poll_at=db_now_plus(after_s)))
        gave_up = conn.execute(update(d).where(d.batchcontact_id == row_id, d.state == S.ACCEPTED,
                                               d.polls >= max_polls)
                               .values(state=S.UNCONFIRMED, poll_at=None)).rowcount
    return not gave_up


@retry_lock_conflicts
def stop_polling(engine: Engine, row_id: int, reason: str) -> None:
    """The provider cannot tell what became of an accepted row: it keeps `success`, marked unconfirmed with
    `reason`, and is not asked again."""
    d = Dispatch
    with engine.begin() as conn:
        conn.execute(update(d).where(d.batchcontact_id == row_id, d.state == S.ACCEPTED)
                     .values(state=S.UNCONFIRMED, poll_at=None, last_error=_fit(reason, 255),
                             updated_at=db_now()))


# --- self-healing ---------------------------------------------------------------------------------

@retry_lock_conflicts
def find_unrouted(engine: Engine, grace_s: int, limit: int) -> list[Claimed]:
    """Rows claimed more than `grace_s` ago and never routed: their dispatch died (or lost the database)
    between claiming and routing them. Left alone they would never be sent, and while still `new` in
    asterCC they would take the head of every claim without being won. Marks them `pending` in asterCC and
    touches their record (so the next sweep leaves them to this one); the caller routes and enqueues them."""
    d, bc = Dispatch, BatchContact.__table__
    with engine.begin() as conn:
        rows = conn.execute(select(bc.c.id, bc.c.target)
                            .join(d, d.batchcontact_id == bc.c.id)
                            .where(d.state == S.QUEUED, d.provider.is_(None), d.updated_at <= db_now_plus(-grace_s))
                            .order_by(bc.c.schedulertime, bc.c.id).limit(limit)).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        conn.execute(update(d).where(d.batchcontact_id.in_(ids)).values(updated_at=db_now()))
        conn.execute(update(BatchContact).where(BatchContact.id.in_(ids), BatchContact.status == "new")
                     .values(status="pending"))
    return [Claimed(r.id, r.target or "") for r in rows]


@retry_lock_conflicts
def find_stuck(engine: Engine, grace_s: int, limit: int) -> list[tuple[int, str]]:
    """Rows whose send task must have been lost: queued or due for retry more than `grace_s` ago, or
    sending with an expired lease (worker killed). Returns (row id, provider) and marks them retry-now so
    the next sweep does not pick them up again before their task ran."""
    d = Dispatch
    stuck = or_(
        and_(d.state == S.QUEUED, d.updated_at <= db_now_plus(-grace_s)),
        and_(d.state == S.RETRY, d.next_attempt_at <= db_now_plus(-grace_s)),
        and_(d.state == S.SENDING, d.lease_until < db_now()),
    )
    with engine.begin() as conn:
        rows = conn.execute(select(d.batchcontact_id, d.provider)
                            .where(stuck, d.provider.is_not(None)).limit(limit)).all()
        if rows:
            conn.execute(update(d).where(d.batchcontact_id.in_([r[0] for r in rows]), stuck)
                         .values(state=S.RETRY, next_attempt_at=db_now(), lease_until=None,
                                 updated_at=db_now()))
    return [(r[0], r[1]) for r in rows]


@retry_lock_conflicts
def expire_unreported(engine: Engine, timeout_s: int) -> int:
    """Accepted rows that waited `timeout_s` for a report that never came become unconfirmed (asterCC
    keeps `success`). Mobilgroup rows are left to the poller, which has its own bound."""
    d = Dispatch
    with engine.begin() as conn:
        return conn.execute(
            update(d).where(d.state == S.ACCEPTED, d.poll_at.is_(None),
                            d.accepted_at <= db_now_plus(-timeout_s))
            .values(state=S.UNCONFIRMED, updated_at=db_now())
        ).rowcount


def counts(engine: Engine, ids: Iterable[int] | None = None) -> dict[str, int]:
    """asterCC status counts (of `ids`, or of every row): for progress displays and checks."""
    query = select(BatchContact.status, func.count()).group_by(BatchContact.status)
    if ids is not None:
        query = query.where(BatchContact.id.in_(list(ids)))
    with engine.connect() as conn:
        return {status: n for status, n in conn.execute(query)}


def settle_delivered_part(engine: Engine, provider: str, provider_message_id: str) -> tuple[int, int] | None:
    """A receipt said the part `provider_message_id` (of a message sent in one or several parts) was
    delivered: forget that id and return (row id, how many of the row's part ids still await their receipt),
    or None when no row of `provider` has that id. Every statement commits on its own, so that of two parts
    settled at the same moment at least the later sees the other gone: the row's message is delivered
    once the count reaches 0. An undelivered part's id stays, for its receipt to find the row."""
    m = MessageId
    with autocommit_twin(engine).connect() as conn:
        row_id = conn.scalar(select(m.batchcontact_id).where(m.provider == provider,
                                                              m.provider_message_id == provider_message_id))
        if row_id is None:
            return None
        conn.execute(delete(m).where(m.provider == provider, m.provider_message_id == provider_message_id))
        left = conn.scalar(select(func.count()).select_from(m).where(m.provider == provider,
                                                                     m.batchcontact_id == row_id))
    return row_id, int(left)
