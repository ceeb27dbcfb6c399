"""Every read and write of the workflow, as short statements that hold no connection between them.

The claim works without transactions or row locks on asterCC's tables (they may be MyISAM): candidates are
read from asterCC, then inserted into `sms_dispatch`, whose primary key on the row id lets exactly one
claimer win each row; the winners are found by their claim token and only then marked `pending` in asterCC
by a conditional `UPDATE … WHERE status='new'`. Every later change of a row goes through a compare-and-set
on `sms_dispatch.state`, so a redelivered task, a second beat or a late report changes nothing it should not.

Functions take an `Engine` and return plain values; callers never hold a session across a provider call.
"""
from __future__ import annotations

import math
import random
import re
import time
import functools
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Callable, Iterable

from sqlalchemy import (
    Integer, String, and_, bindparam, case, delete, exists, func, insert, literal, literal_column, or_, select,
    tuple_, union_all, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from .engine import (
    autocommit_twin, changed_before, db_local_now, db_now, db_now_plus, plus_seconds, seconds_since,
)
from .packet import in_one_trip, run
from .models import (
    ERROR_MSG_MAX,
    RESPONSENOTE_MAX,
    BatchContact,
    BatchContactArchive,
    Breaker,
    Dispatch,
    DispatchState as S,
    MessageId,
    Meta,
    OptOut,
    WaitReason as W,
)

# An operator who sets a finished row back to `new` in asterCC asks for a resend; a row must have been
# final this long before that is believed, so that a slower second beat cannot resend a row just finished.
RESEND_AFTER_S = 60
DEADLOCK_RETRIES = 5
DEADLOCK = 1213


@dataclass(frozen=True)
class Claimed:
    """A row this claimer won: its id, asterCC's `target` exactly as typed, and how long ago it fell due
    (seconds, by the database's clock; 0 for an operator's resend) and when (None: a zero date); whether it
    is a campaign row (its batch has more than one row, see `claim_due`)."""

    id: int
    target: str
    overdue_s: int = 0
    due_at: object = None
    campaign: bool = False


@dataclass(frozen=True)
class SendJob:
    """What a send needs, loaded in one query after the lease was taken."""

    id: int
    provider: str
    recipient: str
    text: str | None          # None: the archive row is missing
    token: int                # the lease's fencing token: every outcome written names it
    failures: int             # failed sends so far, this one not included
    age_s: int                # seconds since the row was claimed (the retry windows count from here)
    resends: int              # operator resends of this row so far
    unknowns: int             # earlier sends whose answer never came
    probe: bool               # the one send that tests a paused account
    campaign_zone: str | None = None  # a campaign row's recipient's time zone, while quiet hours are set
    opted_out: bool = False   # a campaign row whose recipient opted out


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

def due_rows(limit: int, latest_first: bool = False):
    """The query for up to `limit` due SMS rows (id, schedulertime, archive row, creby), oldest due first
    (asterCC's zero date, "now", counts as the oldest), or with `latest_first` the latest due first: what
    every dispatch tick asks asterCC's table (`EXPLAIN` it to check the plan; see `schema.add_astercc_index`).

    A row we already hold (a record not final, or final less than `RESEND_AFTER_S` ago) is left out even if
    asterCC shows it `new` (a claim interrupted between its two steps, an operator who reset a row in
    flight): such a row cannot be won, and at the head of every claim it would take the claim's room."""
    bc, arc, d = BatchContact.__table__, BatchContactArchive.__table__, Dispatch.__table__
    return (
        # asterCC's zero date (due at once) comes back as None: SQLite would hand it over as a text that is no date.
        select(bc.c.id, func.nullif(bc.c.schedulertime, literal_column("'0000-00-00 00:00:00'"),
                                    type_=bc.c.schedulertime.type).label("schedulertime"),
               bc.c.batchcontact_archive_id, bc.c.creby)
        .select_from(bc.outerjoin(arc, arc.c.id == bc.c.batchcontact_archive_id)
                     .outerjoin(d, d.c.batchcontact_id == bc.c.id))
        .where(bc.c.status == "new", bc.c.schedulertime <= db_local_now(),
               or_(arc.c.archivetype == "sms", arc.c.id.is_(None)),
               or_(d.c.batchcontact_id.is_(None), _resendable(d)))
        .order_by(*((bc.c.schedulertime.desc(), bc.c.id.desc()) if latest_first else (bc.c.schedulertime, bc.c.id)))
        .limit(limit)
    )


def _resendable(d):
    """A record whose row an operator may send again (set back to `new`): final, and for a while."""
    return and_(d.c.state.in_(S.FINAL + (S.ACCEPTED,)), d.c.updated_at <= db_now_plus(-RESEND_AFTER_S))


def _not_reset(status):
    """Where asterCC's row (its `status` column) may take our outcome: not set back to `new` by an operator
    since it was claimed. A reset row keeps `new`, and the claim takes it again as a resend once its record
    is final (`_resendable`); were it overwritten, asterCC would show the resend done, and it never goes."""
    return status != "new"


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


def claim_due(engine: Engine, limit: int, *, latest_first: bool = False) -> list[Claimed]:
    """Claim up to `limit` due SMS rows (status `new`, `schedulertime <= NOW()`, zero date = now), oldest
    due first (or the latest due first: `due_rows`); mark them `pending`; return the ones this call won.
    Safe with several claimers at once.

    Each record keeps its batch (asterCC's archive row) and `creby`. A row is a campaign row when its
    batch has another row: in this claim, among our records, or (only for a batch of which this claim holds
    one row and we hold no other, in practice an agent's single message) still `new` in asterCC's table.
    A row without an archive row (batch 0) is never a campaign row.

    Two transactions: the first records the claim under a token of this call's own, the second marks the
    rows this token won `pending`; each is retried on its own, so a lock conflict in the second does not
    leave the first's rows behind (a dispatch killed between the two does: see `find_unrouted`)."""
    token = uuid.uuid4().hex
    if not _record_claims(engine, limit, token, latest_first):
        return []
    return _take_won(engine, token)


@retry_lock_conflicts
def _record_claims(engine: Engine, limit: int, token: str, latest_first: bool = False) -> bool:
    with engine.begin() as conn:
        due = conn.execute(due_rows(limit, latest_first)).all()
        if not due:
            return False
        ids = [row.id for row in due]
        # The database's clock is read once and sent as a value: with a SQL function among the values,
        # mysqlclient sends one INSERT per row instead of one for the whole batch. asterCC's due times are
        # local; ours, `due_at` included, are UTC, converted with the offset the server keeps now.
        local_now, now = conn.execute(select(db_local_now(), db_now())).one()
        offset = _as_datetime(local_now) - _as_datetime(now)
        conn.execute(_insert_ignore(Dispatch), [
            {"batchcontact_id": row.id, "claim_token": token, "state": S.WAITING, "wait_reason": W.ROOM,
             "attempts": 0, "failures": 0, "unknowns": 0, "polls": 0, "parts": 1,
             "batch_id": row.batchcontact_archive_id or 0, "creby": _fit(row.creby or "", 50), "campaign": False,
             "due_at": row.schedulertime - offset if row.schedulertime else now, "claimed_at": now, "next_attempt_at": None,
             "created_at": now, "updated_at": now} for row in due
        ])
        # Rows already in sms_dispatch and final for a while, yet `new` again in asterCC: a resend.
        d = Dispatch.__table__
        resent = (d.c.batchcontact_id.in_(ids), _resendable(d))
        # The earlier send's provider ids go with it: a receipt that names one (smsc.ru's come late, or
        # again) is about that send and must not be taken for the new one's. `attempts` is kept: it is the
        # fencing token, and a writer left from the earlier send must never match the new send's lease.
        conn.execute(delete(MessageId).where(
            MessageId.batchcontact_id.in_(select(d.c.batchcontact_id).where(*resent))))
        conn.execute(
            update(d)
            .where(*resent)
            .values(claim_token=token, state=S.WAITING, wait_reason=W.ROOM, failures=0, unknowns=0,
                    polls=0, provider=None, resends=d.c.resends + 1, provider_message_id=None, last_error=None,
                    first_attempt_at=None, next_attempt_at=None, lease_until=None, accepted_at=None,
                    poll_at=None, queued_at=None, due_at=now, claimed_at=now, updated_at=now)
        )
    return True


@retry_lock_conflicts
def _take_won(engine: Engine, token: str) -> list[Claimed]:
    bc, d = BatchContact.__table__, Dispatch.__table__
    with engine.begin() as conn:
        won = list(conn.scalars(select(d.c.batchcontact_id).where(d.c.claim_token == token)))
        if not won:
            return []
        conn.execute(update(BatchContact).where(BatchContact.id.in_(won), BatchContact.status == "new")
                     .values(status="pending"))
        # Oldest due first, so that a backlog drains in due order within a batch too.
        rows = conn.execute(select(bc.c.id, bc.c.target, seconds_since(d.c.due_at).label("overdue_s"), d.c.due_at,
                                   d.c.batch_id)
                            .join(d, d.c.batchcontact_id == bc.c.id).where(bc.c.id.in_(won))
                            .order_by(d.c.due_at, bc.c.id)).all()
        campaigns = _campaign_batches(conn, {r.id: r.batch_id for r in rows if r.batch_id})
        if campaigns:
            conn.execute(update(d).where(d.c.claim_token == token, d.c.batch_id.in_(campaigns)).values(campaign=True))
        return [Claimed(r.id, r.target or "", max(r.overdue_s or 0, 0), r.due_at, r.batch_id in campaigns)
                for r in rows]


def _campaign_batches(conn, batch_of: dict[int, int]) -> set[int]:
    """Of the batches of claimed rows ({row id: batch}), those with more than one row: more than one among
    these, else another among our records, else (one statement, for the batches left, in practice single
    messages) another row of asterCC's still `new` (not due yet), which the claim's own search reads anyway
    (`schema.add_astercc_index`: asterCC's table has no index on the archive id)."""
    d, bc = Dispatch.__table__, BatchContact.__table__
    rows_per_batch = Counter(batch_of.values())
    campaigns = {batch for batch, n in rows_per_batch.items() if n > 1}
    alone = [batch for batch, n in rows_per_batch.items() if n == 1]
    if alone:
        campaigns.update(conn.scalars(select(d.c.batch_id).distinct().where(
            d.c.batch_id.in_(alone), d.c.batchcontact_id.not_in(list(batch_of)))))
        alone = [batch for batch in alone if batch not in campaigns]
    if alone:
        arc = bc.c.batchcontact_archive_id
        campaigns.update(conn.scalars(select(arc).distinct().where(bc.c.status == "new", arc.in_(alone),
                                                                   bc.c.id.not_in(list(batch_of)))))
    return campaigns


# --- release: from waiting in the database to the broker ------------------------------------------

@dataclass(frozen=True)
class ProviderLoad:
    """One provider's rows in flight (`queued` + `sending`) and how long the oldest `queued` one has been
    in the broker (None: none is)."""

    inflight: int
    oldest_queued_s: int | None


def provider_load(engine: Engine, provider: str) -> ProviderLoad:
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        row = conn.execute(
            select(func.count(), func.max(case((d.c.state == S.QUEUED, seconds_since(d.c.queued_at)))))
            .where(d.c.provider == provider, d.c.state.in_((S.QUEUED, S.SENDING)))).one()
    return ProviderLoad(row[0] or 0, row[1])


@retry_lock_conflicts
def requeue_lost(engine: Engine, provider: str, requeue_s: int, window_s: int, limit: int) -> tuple[list[int], int]:
    """Queued rows of `provider` whose task has not started `requeue_s` after it was put in the broker: the
    broker lost it (a Redis restart without persistence, a worker killed with what it had prefetched) or no
    worker takes that queue. Each is returned, to be enqueued again (a task that was only late finds the row
    taken by its twin and does nothing), and given as long again as it has already waited, at least
    `requeue_s`: a queue nobody consumes gets a row's task a handful of times an hour, not every
    `requeue_s`. Rows claimed more than `window_s` ago end `error` instead. Returns (ids to enqueue again,
    how many ended).

    Rows end in the transaction that chose them, and only under the fencing token they had then: a late task
    never sends a row that ends here (on MariaDB the chosen rows are locked: the task waits for this
    transaction, then finds the row ended and does nothing)."""
    d = Dispatch.__table__
    lost = and_(d.c.provider == provider, d.c.state == S.QUEUED, d.c.next_attempt_at <= db_now())
    with engine.begin() as conn:
        rows = conn.execute(select(d.c.batchcontact_id, d.c.attempts, seconds_since(d.c.queued_at).label("queued_s"),
                                   (seconds_since(d.c.claimed_at) > window_s).label("old"))
                            .where(lost).limit(limit).with_for_update(skip_locked=True)).all()
        again: dict[int, list[int]] = {}
        for r in rows:
            if not r.old:  # the next wait: requeue_s doubled until it is as long as the wait so far
                wait = requeue_s * 2 ** max(0, math.floor(math.log2(max(r.queued_s or 0, requeue_s) / requeue_s)))
                again.setdefault(wait, []).append(r.batchcontact_id)
        for wait, ids in again.items():
            conn.execute(update(d).where(d.c.batchcontact_id.in_(ids), lost)
                         .values(next_attempt_at=db_now_plus(wait)))
        ended = _end_error(conn, [(r.batchcontact_id, r.attempts) for r in rows if r.old], lost,
                           f"no worker took it from queue send.{provider} (is a worker for it running?)")
    return [row_id for ids in again.values() for row_id in ids], len(ended)


def _end_error(conn, chosen: list[tuple[int, int]], still, reason: str, **values) -> list[int]:
    """End the `chosen` rows (row id, fencing token), picked by a sweep in this transaction, `error` with
    `reason`, and asterCC's status with them: each only while `still` holds and its token is the one it had
    when chosen. Returns the ids that ended."""
    if not chosen:
        return []
    d = Dispatch.__table__
    ids = [row_id for row_id, _ in chosen]
    conn.execute(update(d).where(d.c.batchcontact_id.in_(ids), tuple_(d.c.batchcontact_id, d.c.attempts).in_(chosen),
                                 still)
                 .values(state=S.ERROR, wait_reason=None, lease_until=None, last_error=_fit(reason, 255),
                         updated_at=db_now(), **values))
    # Every chosen row was open when chosen (and is locked, on MariaDB): those `error` now are the ones ended.
    ended = list(conn.scalars(select(d.c.batchcontact_id).where(d.c.batchcontact_id.in_(ids), d.c.state == S.ERROR)))
    if ended:
        conn.execute(update(BatchContact).where(BatchContact.id.in_(ended), _not_reset(BatchContact.status))
                     .values(status="error", error_msg=_fit(reason, ERROR_MSG_MAX)))
    return ended


LEASE_CLOCK = "lease_clock"
"""`sms_meta` name under which every dispatch tick, as it starts, records the database's time
(`stretch_leases`)."""


@retry_lock_conflicts
def stretch_leases(engine: Engine, missed_after_s: float) -> int:
    """Leases run only while dispatch ticks reach the database. Called as every tick starts: when the tick
    before was more than `missed_after_s` ago (the database was away, or no tick ran), every lease under way
    is pushed back by that long. A send whose outcome waited for the database to come back
    (`workflow.send`, whose writes retry until they land) thus finds its lease still its own, rather than
    taken by the first tick back (`expire_leases`) and its message sent again. Returns by how many seconds
    (0: the ticks ran on time, or this is the first). One transaction, the clock's row locked: two ticks at
    once push the leases back once."""
    m, d = Meta.__table__, Dispatch.__table__
    with engine.begin() as conn:
        gap = conn.scalar(select(seconds_since(m.c.value)).where(m.c.name == LEASE_CLOCK).with_for_update())
        if gap is None:
            conn.execute(_insert_ignore(Meta).values(name=LEASE_CLOCK, value=db_now()))
            return 0
        conn.execute(update(m).where(m.c.name == LEASE_CLOCK).values(value=db_now()))
        if gap <= missed_after_s:
            return 0
        conn.execute(update(d).where(d.c.state == S.SENDING).values(lease_until=plus_seconds(d.c.lease_until, gap)))
    return gap


@retry_lock_conflicts
def expire_leases(engine: Engine, provider: str, *, resend: bool, limit: int) -> tuple[int, list[int]]:
    """Sending rows of `provider` whose lease ran out: their worker died or hung, and whether their request
    reached the provider is unknown. With `resend` they wait (reason `unknown`) to be sent again; else they
    end `error`, in the transaction that chose them and under their lease's token (should the send come back
    with the provider's acceptance after all, `record_accepted` turns the row `success`). Returns (how many
    wait again, the ids that ended)."""
    d = Dispatch.__table__
    expired = and_(d.c.provider == provider, d.c.state == S.SENDING, d.c.lease_until < db_now())
    with engine.begin() as conn:
        rows = conn.execute(select(d.c.batchcontact_id, d.c.attempts).where(expired).limit(limit)
                            .with_for_update(skip_locked=True)).all()
        if not resend:
            return 0, _end_error(conn, [tuple(r) for r in rows], expired,
                                 f"{provider} may or may not have this message: the worker sending it stopped "
                                 f"before the answer came (SMS_{provider.upper()}_ON_UNKNOWN=error)",
                                 unknowns=d.c.unknowns + 1)
        if rows:
            conn.execute(update(d).where(d.c.batchcontact_id.in_([r.batchcontact_id for r in rows]), expired)
                         .values(state=S.WAITING, wait_reason=W.UNKNOWN, unknowns=d.c.unknowns + 1,
                                 next_attempt_at=db_now(), lease_until=None, updated_at=db_now(),
                                 last_error="no answer: the worker sending it stopped (its lease ran out)"))
    return len(rows), []


@dataclass(frozen=True)
class Released:
    """A row put in the broker by `release_waiting`, and its batch (asterCC's archive row)."""

    id: int
    batch: int


@retry_lock_conflicts
def release_waiting(engine: Engine, provider: str, limit: int, requeue_s: int, *,
                    probe: bool = False, quiet: Callable[[str], bool] | None = None) -> list[Released]:
    """Move up to `limit` waiting rows of `provider` that are due to `queued`, to be put in the broker, which
    gives them `requeue_s` to start, in fair turns: the oldest due row of each batch (rows sharing an archive
    row), then each batch's second, and so on, oldest batch first within a turn. So a single message (a batch
    of one) goes in the first turn however large the campaigns before it, and campaigns due together share
    the room evenly. One statement to choose, one to move, whatever the backlog (a window function over the
    provider's due waiting rows, read from `ix_sms_dispatch_fair`).

    With `probe`, the one row is the probe of a paused account: of the rows waiting for the pause (or
    otherwise due), one refused the fewest times, the oldest of those.

    A campaign row whose recipient opted out, or whose time zone is in quiet hours now (`quiet(zone)`), is
    never moved, whatever the tick's own checks ended or held before: rows routed since by another tick or
    the reaper, and opt-outs beyond what one tick ends, wait for the next tick's checks. Returns the rows
    moved."""
    if limit <= 0:
        return []
    d = Dispatch.__table__
    # NULL: waiting since its claim, for its provider's room.
    due = or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= db_now())
    # A probe may be a row waiting for the pause to end whatever its time says (the circuit decides), but
    # not one held back for its own reason (a rate-limit slot, the identical-request rule, a backoff).
    ready = and_(d.c.provider == provider, d.c.state == S.WAITING,
                 or_(d.c.wait_reason == W.PAUSED, due) if probe else due)
    token = uuid.uuid4().hex
    with engine.begin() as conn:
        if probe:
            # A probe is best a row never refused yet: one refused a pause ago would meet the identical-request
            # rule (same recipient and text) and go back unsent.
            chosen = conn.execute(select(d.c.batchcontact_id, d.c.batch_id).where(ready)
                                  .order_by(d.c.failures, d.c.due_at, d.c.batchcontact_id)
                                  .limit(1).with_for_update(skip_locked=True)).all()
        else:
            # No row locks here (a window function's rows cannot be locked); the UPDATE below is the
            # compare-and-set: of two releasers choosing the same rows, the second finds them queued.
            turn = func.row_number().over(partition_by=d.c.batch_id, order_by=(d.c.due_at, d.c.batchcontact_id))
            waiting = select(d.c.batchcontact_id, d.c.batch_id, d.c.due_at, turn.label("turn")).where(ready).subquery()
            chosen = conn.execute(select(waiting.c.batchcontact_id, waiting.c.batch_id)
                                  .order_by(waiting.c.turn, waiting.c.due_at, waiting.c.batchcontact_id)
                                  .limit(limit)).all()
        rows = [Released(r.batchcontact_id, r.batch_id) for r in chosen]
        # Quiet hours and opt-outs are checked on the chosen rows only (a lookup per row released, not per
        # row waiting: the choice reads the fair index alone).
        if quiet is not None and rows:
            zones = dict(conn.execute(select(d.c.batchcontact_id, d.c.recipient_tz).where(
                d.c.batchcontact_id.in_([r.id for r in rows]), d.c.campaign.is_(True),
                d.c.recipient_tz.is_not(None))).all())
            rows = [r for r in rows if not (r.id in zones and quiet(zones[r.id]))]
        if not rows:
            return []
        o = OptOut.__table__
        movable = and_(ready, ~and_(d.c.campaign.is_(True), exists().where(o.c.number == d.c.recipient)))
        moved = conn.execute(update(d).where(d.c.batchcontact_id.in_([r.id for r in rows]), movable)
                             .values(state=S.QUEUED, claim_token=token, wait_reason=W.PROBE if probe else None,
                                     next_attempt_at=db_now_plus(requeue_s), queued_at=db_now(),
                                     updated_at=db_now())).rowcount
        if moved != len(rows):  # another releaser took some: keep what this one won
            won = set(conn.scalars(select(d.c.batchcontact_id).where(d.c.claim_token == token, d.c.state == S.QUEUED)))
            rows = [r for r in rows if r.id in won]
    return rows


def open_by_reason(conn, *aggregates) -> list:
    """Open rows as (provider, state, what they wait for, *aggregates), grouped by the first three: a row
    waiting for in-flight room while its provider's circuit is open waits for the circuit (`paused`), though
    only a probe that goes through will change its wait reason."""
    d, b = Dispatch.__table__, Breaker.__table__
    reason = case((and_(d.c.wait_reason == W.ROOM, b.c.state == "open"), W.PAUSED), else_=d.c.wait_reason)
    return conn.execute(select(d.c.provider, d.c.state, reason, *aggregates)
                        .select_from(d.outerjoin(b, b.c.provider == d.c.provider))
                        .where(d.c.state.in_(S.OPEN))
                        .group_by(d.c.provider, d.c.state, reason)).all()


def waiting_summary(engine: Engine) -> dict[str, dict[str, int]]:
    """Open rows by provider, then by `queued`, `sending` or what they wait for (`open_by_reason`): for the
    tick's log line and failover."""
    with autocommit_twin(engine).connect() as conn:
        rows = open_by_reason(conn, func.count())
    summary: dict[str, dict[str, int]] = {}
    for provider, state, reason, n in rows:
        key = reason if state == S.WAITING else state
        bucket = summary.setdefault(provider or "unrouted", {})
        bucket[key or state] = bucket.get(key or state, 0) + n
    return summary


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
                run(conn, _set_routes(size), **params)


@functools.lru_cache(maxsize=None)
def _set_routes(size: int):
    d = Dispatch.__table__
    ids = [bindparam(f"i{k}", type_=d.c.batchcontact_id.type) for k in range(size)]
    return (
        update(d).where(d.c.batchcontact_id.in_(ids))
        .values(provider=bindparam("provider"),
                recipient=case(*((d.c.batchcontact_id == ids[k], bindparam(f"r{k}")) for k in range(size))))
    )


@retry_lock_conflicts
def set_zones(engine: Engine, zones: dict[int, str]) -> None:
    """Record the recipient's time zone of claimed campaign rows ({row id: zoneinfo key}), for quiet hours:
    one UPDATE per zone."""
    by_zone: dict[str, list[int]] = {}
    for row_id, zone in zones.items():
        by_zone.setdefault(zone, []).append(row_id)
    d = Dispatch.__table__
    with engine.begin() as conn:
        for zone, ids in by_zone.items():
            conn.execute(update(d).where(d.c.batchcontact_id.in_(ids)).values(recipient_tz=zone))


def waiting_zones(engine: Engine) -> list[str]:
    """The time zones of waiting campaign rows (from `ix_sms_dispatch_zone`)."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        return list(conn.scalars(select(d.c.recipient_tz).distinct()
                                 .where(d.c.state == S.WAITING, d.c.recipient_tz.is_not(None))))


@retry_lock_conflicts
def hold_quiet(engine: Engine, holds: dict[str, int]) -> int:
    """Waiting campaign rows of the zones in `holds` ({zone: seconds until its quiet hours end}) wait
    (`quiet`) until then, unless they wait longer already. Their claim time moves there too: the retry
    windows count from when they may go, not through the night. Returns how many rows were held."""
    d = Dispatch.__table__
    held = 0
    with engine.begin() as conn:
        for zone, seconds in holds.items():
            ends = db_now_plus(seconds)
            held += conn.execute(
                update(d).where(d.c.state == S.WAITING, d.c.recipient_tz == zone,
                                or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at < ends))
                .values(wait_reason=W.QUIET, next_attempt_at=ends, claimed_at=ends, updated_at=db_now())).rowcount
    return held


# --- send -----------------------------------------------------------------------------------------

def lease_owner(task_id: str, retries: int) -> str:
    """The lease owner of one execution of a send task, 32 characters (`sms_dispatch.claim_token`): 24 hex
    digits of its id (96 bits: no two tasks share them), a dot, its retry number in 7 digits, so that the
    owners of one task's executions sort as they ran."""
    return f"{task_id.replace('-', '')[:24]}.{retries:07d}"


@retry_lock_conflicts
def begin_send(engine: Engine, row_id: int, lease_s: int, owner: str | None = None) -> SendJob | None:
    """Take the send lease on a queued row (compare-and-set) for `owner` (one execution of a task,
    `lease_owner`; None: an owner of its own) and load what the send needs, in one transaction (one round
    trip on MariaDB: `_in_one_trip`).

    Returns None when the row is not ours to send now: not queued (waiting, sending under a lease, accepted
    or final). That is what makes a redelivered, duplicated or stale task a no-op, the redelivery of an
    execution still in its provider call included. Only the lease of an earlier execution of the same task
    is taken back: a task runs again (a retry) only after its execution met a broken connection in here,
    with the lease perhaps committed and the answer lost, and every retry during a database outage is
    another execution; the row must not be left held by nobody until the lease runs out. The job's `token`
    fences every outcome this send writes: should the lease run out and another send take the row, the late
    writes change nothing."""
    task, dot, _ = (owner or "").rpartition(".")
    (taken, _), (_, rows) = in_one_trip(engine, (_take_lease(lease_s), _send_job()), row_id=row_id,
                                         owner=owner or uuid.uuid4().hex, earlier=f"{task}.%" if dot else None)
    if not taken or not rows:
        return None
    (provider, recipient, attempts, failures, resends, unknowns, age_s, astercc_id, content, reason, zone,
     opted_out) = rows[0]
    if astercc_id is None:  # asterCC's row vanished under us
        finish_failed(engine, row_id, "the SMS row was deleted before it could be sent", token=attempts)
        return None
    return SendJob(row_id, provider, recipient or "", content, attempts, failures, age_s or 0, resends, unknowns,
                   reason == W.PROBE, zone, bool(opted_out))


@functools.lru_cache(maxsize=None)
def _take_lease(lease_s: int):
    d = Dispatch
    earlier = and_(d.state == S.SENDING, d.claim_token.like(bindparam("earlier")), d.claim_token < bindparam("owner"))
    return (
        update(d)
        .where(d.batchcontact_id == bindparam("row_id"), d.provider.is_not(None), or_(d.state == S.QUEUED, earlier))
        .values(state=S.SENDING, attempts=d.attempts + 1, lease_until=db_now_plus(lease_s),
                claim_token=bindparam("owner"),
                first_attempt_at=func.coalesce(d.first_attempt_at, db_now()), updated_at=db_now())
    )


@functools.lru_cache(maxsize=None)
def _send_job():
    d, bc, arc, o = Dispatch, BatchContact.__table__, BatchContactArchive.__table__, OptOut.__table__
    # A campaign row's zone and opt-out, as plain text and integer (the rendered statement converts nothing).
    campaign = d.campaign.is_(True)
    return (
        select(d.provider, d.recipient, d.attempts, d.failures, d.resends, d.unknowns,
               seconds_since(d.claimed_at).label("age_s"), bc.c.id.label("astercc_id"), arc.c.content,
               d.wait_reason, case((campaign, d.recipient_tz), else_=None).label("campaign_zone"),
               case((and_(campaign, exists().where(o.c.number == d.recipient)), 1), else_=0).label("opted_out"))
        .select_from(d.__table__.outerjoin(bc, bc.c.id == d.batchcontact_id)
                     .outerjoin(arc, arc.c.id == bc.c.batchcontact_archive_id))
        .where(d.batchcontact_id == bindparam("row_id"), d.state == S.SENDING)
    )


def _holds_lease(d):
    """The row is being sent under the lease whose token is the `token` parameter."""
    return and_(d.batchcontact_id == bindparam("row_id"), d.state == S.SENDING, d.attempts == bindparam("token"))


ACCEPTED_AFTER_ERROR = "sent: the provider accepted it after it had been marked error (its send outlived its lease)"
"""What a row ended `error` by the lease sweep says once its send comes back accepted after all."""

CONFIRMED_IN_DOUBT = "sent: its provider confirmed having the request whose answer was lost"
"""What a waiting row in doubt says (in `sms_dispatch` only) once its provider confirms it has its request."""


@functools.lru_cache(maxsize=None)
def _accept(poll_after_s: int | None, before: str):
    """The send under the `token` fence was accepted: the row is `accepted`. `before` is the state it is
    taken from: `sending` (its send's answer), `error` (the lease sweep ended it under that same token
    meanwhile, but the provider has the message: `success` is the truth, `last_error` says so), or `waiting`
    with an unknown outcome (its provider confirmed, when asked, that it has the request)."""
    d = Dispatch
    where = [d.batchcontact_id == bindparam("row_id"), d.attempts == bindparam("token"), d.state == before]
    if before == S.WAITING:
        where.append(d.unknowns > 0)
    return (
        update(d).where(*where)
        .values(state=S.ACCEPTED, provider_message_id=bindparam("p_ids"),
                parts=func.coalesce(bindparam("p_parts"), d.parts), accepted_at=db_now(), lease_until=None,
                last_error={S.ERROR: ACCEPTED_AFTER_ERROR, S.WAITING: CONFIRMED_IN_DOUBT}.get(before),
                wait_reason=None, next_attempt_at=None, updated_at=db_now(),
                poll_at=None if poll_after_s is None else db_now_plus(poll_after_s))
    )


@functools.lru_cache(maxsize=None)
def _contacted(after_error: bool):
    """asterCC's side of `_accept`, right after it: `success` only if that UPDATE took the row (`error_msg`
    empty, or with `after_error` saying it had been marked error), else (a report came first and set the
    outcome) just the contact time."""
    bc = BatchContact
    took = changed_before() > 0
    return (update(bc).where(bc.id == bindparam("row_id"), _not_reset(bc.status))
            .values(contacttime=db_local_now(), status=case((took, "success"), else_=bc.status),
                    error_msg=case((took, ACCEPTED_AFTER_ERROR if after_error else ""), else_=bc.error_msg)))


@functools.lru_cache(maxsize=None)
def _index_ids(count: int):
    """File `count` provider ids (`m0`, `m1`, …) under the row (`row_id`, `provider`), keeping an existing
    entry; only while the send's lease `token` is the row's latest: a send that outlived its lease must not
    file its request's ids under the row another send holds, or a receipt about that request would finish
    the other send."""
    d = Dispatch.__table__
    ids = union_all(*(select(bindparam(f"m{k}", type_=String()).label("id")) for k in range(count))).subquery()
    ours = (select(bindparam("provider", type_=String()), ids.c.id, d.c.batchcontact_id)
            .where(d.c.batchcontact_id == bindparam("row_id"), d.c.attempts == bindparam("token")))
    return _insert_ignore(MessageId).from_select(["provider", "provider_message_id", "batchcontact_id"], ours)


@retry_lock_conflicts
def record_accepted(engine: Engine, row_id: int, token: int, provider_message_ids: list[str], parts: int,
                    poll_after_s: int | None, *, provider: str, index_ids: bool) -> str | None:
    """`provider` took the message: asterCC `success` with `contacttime`; the provider's ids go on the
    dispatch record, and with `index_ids` also into `sms_message_ids`, where a report naming only one of
    them finds its row (a statement per message saved for providers whose reports carry our reference).

    Returns the state the row was in: `sending`; `error` when the lease sweep had ended it under this same
    token (`SMS_<PROVIDER>_ON_UNKNOWN=error`: the send outlived its lease), which this undoes, since the
    provider has the message: `success`, `error_msg` saying so (`ACCEPTED_AFTER_ERROR`); `delivered` or
    `failed` when a delivery report came first (fast callbacks), which keeps its outcome and only gets
    `contacttime`. None when the lease `token` is no longer current (the lease ran out and the row was
    taken again): the row is left as the current holder has it. One transaction (one round trip on
    MariaDB: `_in_one_trip`); when it did not take the row, a read and, for a row ended `error`, another."""
    indexed = provider_message_ids if index_ids else []
    statements = ((_index_ids(len(indexed)),) if indexed else ()) + (_accept(poll_after_s, S.SENDING), _contacted(False))
    params = dict(row_id=row_id, token=token, provider=provider, p_parts=parts,
                  p_ids=_fit(",".join(provider_message_ids), 255) or None)
    if in_one_trip(engine, statements, **params, **{f"m{k}": m for k, m in enumerate(indexed)})[-2][0]:
        return S.SENDING
    # Rarely here: the fence was lost, a report finished the row first, or the lease sweep ended it.
    with autocommit_twin(engine).connect() as conn:
        state = conn.scalar(select(Dispatch.state).where(Dispatch.batchcontact_id == row_id))
    if state == S.ERROR and in_one_trip(engine, (_accept(poll_after_s, S.ERROR), _contacted(True)), **params)[0][0]:
        return S.ERROR
    return state if state in (S.DELIVERED, S.FAILED) else None


def finish_failed(engine: Engine, row_id: int, reason: str, *, token: int | None = None) -> bool:
    """The message can never be sent as it is: asterCC `failed` with the reason (unless a delivery report
    has already finished the row). With `token`, only while that send's lease is current. Returns whether
    the row moved."""
    return _finish(engine, row_id, S.FAILED, "failed", reason, token=token)


def finish_error(engine: Engine, row_id: int, reason: str, *, token: int | None = None,
                 unknown: bool = False) -> bool:
    """We gave up on a technical failure: asterCC `error` with the reason (unless a delivery report has
    already finished the row). With `token`, only while that send's lease is current; `unknown` counts one
    more send whose answer never came."""
    return _finish(engine, row_id, S.ERROR, "error", reason, token=token, unknown=unknown)


@retry_lock_conflicts
def _finish(engine: Engine, row_id: int, state: str, status: str, reason: str, *, token: int | None = None,
            unknown: bool = False) -> bool:
    # Only a row not yet accepted or final: a delivery report may have finished it while its send was still
    # failing (a callback that beat our timeout), and a final outcome is never overwritten.
    d = Dispatch
    where = [d.batchcontact_id == row_id, d.state.in_(S.OPEN)]
    if token is not None:
        where += [d.state == S.SENDING, d.attempts == token]
    values = dict(state=state, last_error=_fit(reason, 255), lease_until=None, wait_reason=None, updated_at=db_now())
    if unknown:
        values["unknowns"] = d.unknowns + 1
    with engine.begin() as conn:
        moved = conn.execute(update(d).where(*where).values(**values))
        if moved.rowcount:
            conn.execute(update(BatchContact).where(BatchContact.id == row_id, _not_reset(BatchContact.status))
                         .values(status=status, error_msg=_fit(reason, ERROR_MSG_MAX)))
    return bool(moved.rowcount)


@retry_lock_conflicts
def wait_again(engine: Engine, row_id: int, token: int, delay_s: float, reason: str, wait_reason: str, *,
               failed: bool = False, unknown: bool = False) -> bool:
    """Give the lease back: the row waits in the database (`wait_reason`, shown with `reason`) and is
    released to the broker again after `delay_s`. `failed` counts a failed send (the backoff's exponent),
    `unknown` a send whose answer never came. Only while the lease `token` is current; returns whether the
    row moved."""
    d = Dispatch
    values = dict(state=S.WAITING, wait_reason=wait_reason, next_attempt_at=db_now_plus(delay_s), lease_until=None,
                  last_error=_fit(reason, 255), updated_at=db_now())
    if failed:
        values["failures"] = d.failures + 1
    if unknown:
        values["unknowns"] = d.unknowns + 1
    with engine.begin() as conn:
        return bool(conn.execute(update(d).where(d.batchcontact_id == row_id, d.state == S.SENDING,
                                                 d.attempts == token).values(**values)).rowcount)


# --- delivery reports -----------------------------------------------------------------------------

OPEN_TO_REPORTS = (S.ACCEPTED, S.SENDING, S.WAITING, S.QUEUED)
"""States a delivery report may move a row out of (forward-only); and `error` with an unknown outcome
(`_finalise`)."""


@dataclass(frozen=True)
class ReportTarget:
    id: int
    state: str
    resends: int
    attempts: int


def find_report_target(engine: Engine, provider: str, *, reference: int | None = None,
                       provider_message_id: str | None = None, recipient: str | None = None) -> ReportTarget | None:
    """The dispatch record a report is about: by our row id (and, given both, only if the provider's id is
    the one it recorded at sending, or it recorded none), else by the provider's id, else (replies) the
    latest message this provider sent to `recipient`."""
    d = Dispatch
    query = select(d.batchcontact_id, d.state, d.resends, d.attempts).where(d.provider == provider)
    # A read of one row per report: on the autocommit twin it needs no ROLLBACK round trip afterwards.
    with autocommit_twin(engine).connect() as conn:
        if reference is not None:
            if provider_message_id:
                query = query.where(or_(d.provider_message_id.is_(None),
                                        d.provider_message_id == provider_message_id))
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
    return ReportTarget(row.batchcontact_id, row.state, row.resends, row.attempts) if row else None


@retry_lock_conflicts
def apply_final_report(engine: Engine, row_id: int, delivered: bool, reason: str, *, resends: int,
                       attempt: int | None = None, cost: Decimal | None = None, parts: int | None = None) -> bool:
    """Move a row forward to `delivered` or `failed`, and asterCC's status with it, keeping the `cost` and
    `parts` the report gave (None keeps what the row has); False when it was already final (forward-only),
    or when it is no longer the send the report is about: `resends` is the row's count of operator resends
    for that send, and a resend claimed since (the row waits to go out again) is left alone. With `attempt`,
    only while that attempt is the row's latest (an attempt leased since is another request). One
    transaction (one round trip on MariaDB: `_in_one_trip`)."""
    statements = (_finalise(delivered, attempt is not None), _outcome_to_astercc(delivered))
    (moved, _), _ = in_one_trip(engine, statements, row_id=row_id, resends=resends, attempt=attempt,
                                last_error=_fit(reason, 255), error_msg=_fit(reason, ERROR_MSG_MAX),
                                cost=None if cost is None else str(cost), parts_reported=parts)
    return bool(moved)


@functools.lru_cache(maxsize=None)
def _finalise(delivered: bool, of_attempt: bool = False):
    d = Dispatch
    fence = [d.batchcontact_id == bindparam("row_id"), d.resends == bindparam("resends"),
             or_(*(d.state == state for state in OPEN_TO_REPORTS),
                 # Ended `error` not knowing whether a request arrived: the report says it did.
                 and_(d.state == S.ERROR, d.unknowns > 0))]
    if of_attempt:
        fence.append(d.attempts == bindparam("attempt"))
    return (
        update(d)
        .where(*fence)
        .values(state=S.DELIVERED if delivered else S.FAILED, lease_until=None, updated_at=db_now(),
                last_error=None if delivered else bindparam("last_error"),
                # The cost goes as text: the server reads it exactly, and no driver conversion is involved.
                cost=func.coalesce(bindparam("cost", type_=String()), d.cost),
                parts_reported=func.coalesce(bindparam("parts_reported", type_=Integer()), d.parts_reported))
    )


@functools.lru_cache(maxsize=None)
def _outcome_to_astercc(delivered: bool):
    """asterCC's side of `_finalise`, right after it: only if that UPDATE moved the row."""
    bc = BatchContact
    moved = changed_before() > 0
    values = {"status": case((moved, "success" if delivered else "failed"), else_=bc.status)}
    if not delivered:
        values["error_msg"] = case((moved, bindparam("error_msg")), else_=bc.error_msg)
    return update(bc).where(bc.id == bindparam("row_id"), _not_reset(bc.status)).values(**values)


@retry_lock_conflicts
def record_reply(engine: Engine, row_id: int, text: str) -> None:
    """A recipient's reply goes to asterCC's `responsenote`."""
    with engine.begin() as conn:
        conn.execute(update(BatchContact).where(BatchContact.id == row_id)
                     .values(responsenote=_fit(text, RESPONSENOTE_MAX)))


# --- opt-outs (campaigns) -------------------------------------------------------------------------

@dataclass(frozen=True)
class OptedOut:
    """A number that opted out of campaigns: the word it replied (or `smsctl`) and when (a datetime)."""

    number: str
    word: str
    opted_at: datetime


@retry_lock_conflicts
def record_optout(engine: Engine, row_id: int, word: str) -> bool:
    """The recipient of row `row_id` replied `word`: its number (as the row records it, normalised) opts out
    of campaigns. A number already opted out keeps its first word and time. Returns whether it was added."""
    d, o = Dispatch.__table__, OptOut.__table__
    with engine.begin() as conn:
        return bool(conn.execute(_insert_ignore(OptOut).from_select(
            [o.c.number, o.c.word, o.c.opted_at],
            select(d.c.recipient, literal(_fit(word, 32), String()), db_now())
            .where(d.c.batchcontact_id == row_id, d.c.recipient.is_not(None)))).rowcount)


@retry_lock_conflicts
def add_optout(engine: Engine, number: str, word: str) -> bool:
    """Opt `number` (normalised) out of campaigns under `word`; False if it already was."""
    with engine.begin() as conn:
        now = conn.scalar(select(db_now()))
        return bool(conn.execute(_insert_ignore(OptOut).values(number=number, word=_fit(word, 32), opted_at=now)
                                 ).rowcount)


@retry_lock_conflicts
def remove_optout(engine: Engine, number: str) -> bool:
    """`number` (normalised) may receive campaigns again; False if it had not opted out."""
    with engine.begin() as conn:
        return bool(conn.execute(delete(OptOut).where(OptOut.number == number)).rowcount)


def optouts(engine: Engine) -> list[OptedOut]:
    """The numbers that opted out, oldest first."""
    query = select(OptOut.number, OptOut.word, OptOut.opted_at).order_by(OptOut.opted_at, OptOut.number)
    with autocommit_twin(engine).connect() as conn:
        return [OptedOut(*row) for row in conn.execute(query)]


def opted_out_waiting(engine: Engine, providers: Iterable[str], limit: int = 1000) -> list[tuple[int, OptedOut]]:
    """Waiting campaign rows of `providers` whose recipient opted out, with the opt-out: up to `limit`. The
    server reads the waiting rows by their state and looks each number up by `sms_optout`'s key (or the
    opt-outs through `ix_sms_dispatch_recipient`, when they are fewer): the backlog, never the finished rows
    (1 ms with none waiting beside 200,000 finished, on MariaDB)."""
    d, o = Dispatch.__table__, OptOut.__table__
    with autocommit_twin(engine).connect() as conn:
        rows = conn.execute(select(d.c.batchcontact_id, o.c.number, o.c.word, o.c.opted_at)
                            .select_from(o.join(d, d.c.recipient == o.c.number))
                            .where(d.c.provider.in_(list(providers)), d.c.state == S.WAITING,
                                   d.c.campaign.is_(True)).limit(limit)).all()
    return [(r.batchcontact_id, OptedOut(r.number, r.word, r.opted_at)) for r in rows]


NOT_SENT_AGAIN = "; not sent again, but an earlier attempt's answer never came: it may have arrived"
"""Added to the reason of a row `refuse_waiting` ends whose earlier request may have reached its provider."""


@retry_lock_conflicts
def refuse_waiting(engine: Engine, reasons: dict[int, str]) -> int:
    """End each row that still waits with its reason ({row id: reason}): `failed`, or `error` with
    `NOT_SENT_AGAIN` where an earlier request's answer never came (`unknowns` > 0: asterCC must not say it
    was never sent). A row read since (the opted-out rows of `opted_out_waiting`, say) may have been released
    and be on its way to the provider: then the send's outcome stands. One transaction for all of them: a
    campaign to a list full of opt-outs ends a thousand rows a tick, a claim of rows expired during an outage
    all of its rows. Returns how many ended."""
    if not reasons:
        return 0
    d, bc = Dispatch.__table__, BatchContact.__table__
    with engine.begin() as conn:
        waiting = conn.execute(select(d.c.batchcontact_id, d.c.unknowns).where(
            d.c.batchcontact_id.in_(list(reasons)), d.c.state == S.WAITING).with_for_update()).all()
        ends = [(row_id, *((S.ERROR, "error", reasons[row_id] + NOT_SENT_AGAIN) if unknowns
                           else (S.FAILED, "failed", reasons[row_id]))) for row_id, unknowns in waiting]
        if ends:
            conn.execute(update(d).where(d.c.batchcontact_id == bindparam("row_id"))
                         .values(state=bindparam("end_state"), last_error=bindparam("reason"), lease_until=None,
                                 wait_reason=None, updated_at=db_now()),
                         [{"row_id": i, "end_state": state, "reason": _fit(reason, 255)}
                          for i, state, _, reason in ends])
            conn.execute(update(bc).where(bc.c.id == bindparam("row_id"), _not_reset(bc.c.status))
                         .values(status=bindparam("end_status"), error_msg=bindparam("reason")),
                         [{"row_id": i, "end_status": status, "reason": _fit(reason, ERROR_MSG_MAX)}
                          for i, _, status, reason in ends])
    return len(ends)


def optout_count(engine: Engine) -> int:
    with autocommit_twin(engine).connect() as conn:
        return conn.scalar(select(func.count()).select_from(OptOut)) or 0


# --- polling (Mobilgroup) -------------------------------------------------------------------------

@retry_lock_conflicts
def claim_due_polls(engine: Engine, provider: str, limit: int, lease_s: int) -> list[int]:
    """Rows of `provider` accepted and past their poll time; their poll time is pushed `lease_s` ahead so
    that a second poller does not ask again meanwhile. The rows are locked as they are chosen, and those
    another poller holds are skipped: each row goes to one poller only."""
    d = Dispatch
    with engine.begin() as conn:
        ids = list(conn.scalars(
            select(d.batchcontact_id)
            .where(d.provider == provider, d.state == S.ACCEPTED, d.poll_at <= db_now())
            .order_by(d.poll_at).limit(limit).with_for_update(skip_locked=True)
        ))
        if ids:
            conn.execute(update(d).where(d.batchcontact_id.in_(ids), d.poll_at <= db_now())
                         .values(poll_at=db_now_plus(lease_s)))
    return ids


def poll_target(engine: Engine, provider: str, row_id: int) -> int | None:
    """The send a claimed poll asks `provider` about: its count of operator resends (0 for a row sent once),
    or None when the row no longer awaits `provider`'s status (resent since, and accepted elsewhere or not
    yet; or finished by a report)."""
    d = Dispatch
    with autocommit_twin(engine).connect() as conn:  # no ROLLBACK round trip after the read
        return conn.scalar(select(d.resends).where(d.batchcontact_id == row_id, d.provider == provider,
                                                   d.state == S.ACCEPTED, d.poll_at.is_not(None)))


def _polled(row_id: int, resends: int):
    """The accepted send a poll asked about: an operator's resend claimed since is another send."""
    d = Dispatch
    return and_(d.batchcontact_id == row_id, d.resends == resends, d.state == S.ACCEPTED)


@retry_lock_conflicts
def poll_again(engine: Engine, row_id: int, after_s: int, max_polls: int, *, resends: int) -> bool:
    """The status of the send `resends` is still open: ask again after `after_s`, or stop at `max_polls`
    (the row keeps `success`, marked unconfirmed). Returns True when another poll is scheduled."""
    d = Dispatch
    with engine.begin() as conn:
        scheduled = conn.execute(update(d).where(_polled(row_id, resends))
                                 .values(polls=d.polls + 1, updated_at=db_now(), poll_at=db_now_plus(after_s))).rowcount
        gave_up = conn.execute(update(d).where(_polled(row_id, resends), d.polls >= max_polls)
                               .values(state=S.UNCONFIRMED, poll_at=None)).rowcount
    return bool(scheduled) and not gave_up


@retry_lock_conflicts
def stop_polling(engine: Engine, row_id: int, reason: str, *, resends: int) -> None:
    """The provider cannot tell what became of the accepted send `resends`: it keeps `success`, marked
    unconfirmed with `reason`, and is not asked again."""
    d = Dispatch
    with engine.begin() as conn:
        conn.execute(update(d).where(_polled(row_id, resends))
                     .values(state=S.UNCONFIRMED, poll_at=None, last_error=_fit(reason, 255),
                             updated_at=db_now()))


# --- self-healing ---------------------------------------------------------------------------------

@retry_lock_conflicts
def find_unrouted(engine: Engine, grace_s: int, limit: int) -> list[Claimed]:
    """Rows claimed more than `grace_s` ago and never routed: their dispatch died (or lost the database)
    between claiming and routing them, and left alone they would never be sent. Marks them `pending` in
    asterCC and touches their record (so the next sweep leaves them to this one); the caller routes them.
    A dispatch that died before the claim's second step left its campaign rows unmarked: they are marked
    here, as that step would have."""
    d, bc = Dispatch, BatchContact.__table__
    with engine.begin() as conn:
        rows = conn.execute(select(bc.c.id, bc.c.target, seconds_since(d.due_at).label("overdue_s"), d.due_at,
                                   d.campaign, d.batch_id)
                            .join(d, d.batchcontact_id == bc.c.id)
                            .where(d.state == S.WAITING, d.provider.is_(None), d.updated_at <= db_now_plus(-grace_s))
                            .order_by(bc.c.schedulertime, bc.c.id).limit(limit)).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        unmarked = {r.id: r.batch_id for r in rows if not r.campaign and r.batch_id}
        campaigns = _campaign_batches(conn, unmarked) if unmarked else set()
        marked = {row_id for row_id, batch in unmarked.items() if batch in campaigns}
        if marked:
            conn.execute(update(d).where(d.batchcontact_id.in_(marked)).values(campaign=True))
        conn.execute(update(d).where(d.batchcontact_id.in_(ids)).values(updated_at=db_now()))
        conn.execute(update(BatchContact).where(BatchContact.id.in_(ids), BatchContact.status == "new")
                     .values(status="pending"))
    return [Claimed(r.id, r.target or "", max(r.overdue_s or 0, 0), r.due_at, bool(r.campaign) or r.id in marked)
            for r in rows]


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


# --- provider account circuits --------------------------------------------------------------------

@dataclass(frozen=True)
class BreakerState:
    """A provider's account circuit as the database's clock sees it now."""

    provider: str
    open: bool
    reason: str | None = None
    open_for_s: int = 0           # until the pause ends (0: ended: a probe may go)
    probing: bool = False         # a probe send is under way
    opened_s_ago: int | None = None
    trips: int = 0
    failing_for_s: int | None = None   # age of the unbroken streak of failed sends (None: no streak)
    refused_login: str | None = None   # open for refused credentials: their fingerprint (see `Breaker`)


def breaker_states(engine: Engine) -> dict[str, BreakerState]:
    """Every provider's circuit (a provider never tripped is closed and absent)."""
    b = Breaker.__table__
    with autocommit_twin(engine).connect() as conn:
        rows = conn.execute(select(b.c.provider, b.c.state, b.c.reason, (-seconds_since(b.c.open_until)).label("left"),
                                   (-seconds_since(b.c.probe_until)).label("probe_left"),
                                   _probe_in_flight(b).label("probe_in_flight"),
                                   seconds_since(b.c.opened_at).label("ago"), b.c.trips,
                                   seconds_since(b.c.failing_since).label("failing"), b.c.refused_login)).all()
    return {r.provider: BreakerState(r.provider, r.state == "open", r.reason, max(r.left or 0, 0),
                                     (r.probe_left or 0) > 0 or bool(r.probe_in_flight), r.ago, r.trips or 0,
                                     r.failing, r.refused_login if r.state == "open" else None) for r in rows}


def _probe_in_flight(b):
    """A probe row of the provider of `b` (its `sms_breaker` row) is queued or being sent: its probe is under
    way for as long, however long that is (its task lost and queued again, a slow call)."""
    d = Dispatch.__table__
    return exists().where(d.c.provider == b.c.provider, or_(d.c.state == S.QUEUED, d.c.state == S.SENDING),
                          d.c.wait_reason == W.PROBE)


@retry_lock_conflicts
def trip_breaker(engine: Engine, provider: str, seconds: float, reason: str, *,
                 refused_login: str | None = None) -> bool:
    """Open `provider`'s circuit for `seconds` (again, if it is open: a failed probe, or a send that left
    before the circuit opened). `refused_login`: the fingerprint of credentials the provider refused (None
    for any other reason, which clears it). Returns True if it was closed until now."""
    b = Breaker.__table__
    values = dict(reason=_fit(reason, 255), open_until=db_now_plus(seconds), probe_row=None, probe_until=None,
                  trips=b.c.trips + 1, refused_login=refused_login, updated_at=db_now())
    with engine.begin() as conn:
        now = conn.scalar(select(db_now()))
        conn.execute(_insert_ignore(Breaker).values(provider=provider, state="closed", trips=0, updated_at=now))
        opened = conn.execute(update(b).where(b.c.provider == provider, b.c.state == "closed")
                              .values(state="open", opened_at=db_now(), **values)).rowcount
        if not opened:
            conn.execute(update(b).where(b.c.provider == provider).values(**values))
    return bool(opened)


@retry_lock_conflicts
def take_probe(engine: Engine, provider: str, lease_s: int, credentials: str | None = None) -> bool:
    """Whether the caller may send the one probe of `provider`'s open circuit now: its pause is over, or it
    is open for refused credentials and the caller's (`credentials`, their fingerprint) are others; and no
    other probe is under way. A probe taken is marked for `lease_s`, until its row is released
    (`drop_probe`); from then on the probe row itself marks it, while it is queued or being sent. A probe
    that ends or waits again for any reason (sent, refused, its text refused before it left, a 429, no slot
    or thread free) thus lets the next tick probe at once, and a lost probe task queued again, however late,
    is still the only probe."""
    b = Breaker.__table__
    may = b.c.open_until <= db_now()
    if credentials is not None:
        may = or_(may, and_(b.c.refused_login.is_not(None), b.c.refused_login != credentials))
    with engine.begin() as conn:
        return bool(conn.execute(
            update(b).where(b.c.provider == provider, b.c.state == "open", may,
                            or_(b.c.probe_until.is_(None), b.c.probe_until < db_now()), ~_probe_in_flight(b))
            .values(probe_until=db_now_plus(lease_s), updated_at=db_now())).rowcount)


@retry_lock_conflicts
def drop_probe(engine: Engine, provider: str) -> None:
    """The probe taken with `take_probe` is released as its row, which marks it from now on, or no row
    waited for it: its mark goes."""
    b = Breaker.__table__
    with engine.begin() as conn:
        conn.execute(update(b).where(b.c.provider == provider).values(probe_until=None))


@retry_lock_conflicts
def close_breaker(engine: Engine, provider: str) -> bool:
    """`provider`'s account works again: its circuit closes, and the rows that waited for it are due now.
    Returns True if its circuit was open until now."""
    b, d = Breaker.__table__, Dispatch.__table__
    with engine.begin() as conn:
        closed = conn.execute(
            update(b).where(b.c.provider == provider, b.c.state == "open")
            .values(state="closed", open_until=None, probe_row=None, probe_until=None, failing_since=None,
                    refused_login=None, updated_at=db_now())).rowcount
        if closed:
            conn.execute(update(d).where(d.c.provider == provider, d.c.state == S.WAITING,
                                         d.c.wait_reason == W.PAUSED).values(next_attempt_at=None))
    return bool(closed)


@retry_lock_conflicts
def note_failure(engine: Engine, provider: str) -> None:
    """A send to `provider` failed on the way there: start its failure streak unless one is under way (one
    UPDATE; the INSERT only for a provider never seen before)."""
    b = Breaker.__table__
    with engine.begin() as conn:
        if not conn.execute(update(b).where(b.c.provider == provider)
                            .values(failing_since=func.coalesce(b.c.failing_since, db_now()))).rowcount:
            now = conn.scalar(select(db_now()))
            conn.execute(_insert_ignore(Breaker).values(provider=provider, state="closed", trips=0, failing_since=now,
                                                        updated_at=now))


@retry_lock_conflicts
def end_failure_streak(engine: Engine, provider: str) -> None:
    """A send to `provider` went through: its failure streak, if any, is over."""
    b = Breaker.__table__
    with engine.begin() as conn:
        conn.execute(update(b).where(b.c.provider == provider, b.c.failing_since.is_not(None))
                     .values(failing_since=None))


@retry_lock_conflicts
def trip_if_failing(engine: Engine, provider: str, after_s: float, seconds: float, reason: str) -> bool:
    """Open `provider`'s closed circuit for `seconds` if its failure streak is `after_s` old (a success since
    then ended it). Returns True if this call opened it."""
    b = Breaker.__table__
    with engine.begin() as conn:
        return bool(conn.execute(
            update(b).where(b.c.provider == provider, b.c.state == "closed",
                            b.c.failing_since <= db_now_plus(-after_s))
            .values(state="open", opened_at=db_now(), reason=_fit(reason, 255), open_until=db_now_plus(seconds),
                    probe_row=None, probe_until=None, trips=b.c.trips + 1, updated_at=db_now())).rowcount)


# --- failover -------------------------------------------------------------------------------------

@retry_lock_conflicts
def reroute_waiting(engine: Engine, provider: str, fallback: str, limit: int) -> list[int]:
    """Move up to `limit` waiting rows of `provider` to `fallback`, due at once, recording where each was
    routed first. Only rows no request of which may have reached a provider (`unknowns` = 0): a row must
    never be accepted by two; and not a campaign row held for quiet hours before its hold ends: they are the
    recipient's, whichever provider sends (moved then, it would be due at once). Returns their ids."""
    d = Dispatch.__table__
    # IS NOT NULL on both: NOT of a NULL comparison would leave a row out.
    held_quiet = and_(d.c.wait_reason.is_not(None), d.c.wait_reason == W.QUIET,
                      d.c.next_attempt_at.is_not(None), d.c.next_attempt_at > db_now())
    movable = and_(d.c.provider == provider, d.c.state == S.WAITING, d.c.unknowns == 0, ~held_quiet)
    with engine.begin() as conn:
        ids = list(conn.scalars(select(d.c.batchcontact_id).where(movable).order_by(d.c.due_at, d.c.batchcontact_id)
                                .limit(limit).with_for_update(skip_locked=True)))
        if ids:
            conn.execute(update(d).where(d.c.batchcontact_id.in_(ids), movable)
                         .values(provider=fallback, routed_provider=func.coalesce(d.c.routed_provider, provider),
                                 wait_reason=W.ROOM, next_attempt_at=None, updated_at=db_now()))
            ids = list(conn.scalars(select(d.c.batchcontact_id).where(d.c.batchcontact_id.in_(ids),
                                                                      d.c.provider == fallback)))
    return ids


@dataclass(frozen=True)
class InDoubt:
    """A waiting row whose earlier request to its provider may have arrived: its id, fencing token,
    operator resends (to name the request) and normalised recipient (to tell the request is ours)."""

    id: int
    token: int
    resends: int
    recipient: str


def in_doubt(engine: Engine, provider: str, limit: int, settled_s: int) -> list[InDoubt]:
    """Waiting rows of `provider` with an unknown outcome, oldest due first; only those whose last send
    ended `settled_s` ago or more (its request may still be on its way to the provider until then)."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        rows = conn.execute(select(d.c.batchcontact_id, d.c.attempts, d.c.resends, d.c.recipient)
                            .where(d.c.provider == provider, d.c.state == S.WAITING, d.c.unknowns > 0,
                                   d.c.updated_at <= db_now_plus(-settled_s))
                            .order_by(d.c.due_at).limit(limit)).all()
    return [InDoubt(*row) for row in rows]


@retry_lock_conflicts
def not_taken(engine: Engine, row_id: int, token: int) -> bool:
    """The provider confirmed it has no request of this row: its unknown outcomes are cleared, so that it may
    move to a fallback. Only if it has not been sent again since (`token`)."""
    d = Dispatch.__table__
    with engine.begin() as conn:
        return bool(conn.execute(update(d).where(d.c.batchcontact_id == row_id, d.c.state == S.WAITING,
                                                 d.c.attempts == token).values(unknowns=0)).rowcount)


@retry_lock_conflicts
def taken(engine: Engine, row_id: int, token: int, provider_message_id: str, poll_after_s: int | None) -> bool:
    """The provider confirmed it has this waiting row's request, whose answer was lost: the row is accepted
    (asterCC `success`), as its send would have recorded, and is neither sent again nor asked about again,
    by any process. Only if it has not been sent again since (`token`); returns whether it moved."""
    return bool(in_one_trip(engine, (_accept(poll_after_s, S.WAITING), _contacted(False)), row_id=row_id,
                            token=token, p_ids=provider_message_id, p_parts=None)[0][0])


def recent_refusals(engine: Engine, provider: str, reason: str, within_s: int) -> int:
    """How many rows of `provider` ended `failed` with exactly `reason` in the last `within_s` seconds: an
    error that could be about one message counts as the account's once different messages meet it."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        return conn.scalar(select(func.count()).where(
            d.c.provider == provider, d.c.state == S.FAILED, d.c.last_error == _fit(reason, 255),
            d.c.updated_at >= db_now_plus(-within_s))) or 0


# --- deployment facts -----------------------------------------------------------------------------

@retry_lock_conflicts
def remember(engine: Engine, name: str, value: str) -> str:
    """Record `value` under `name` unless something is recorded already; returns what is recorded."""
    with engine.begin() as conn:
        conn.execute(_insert_ignore(Meta).values(name=name, value=value))
        return conn.scalar(select(Meta.value).where(Meta.name == name))


@retry_lock_conflicts
def stamp(engine: Engine, name: str) -> None:
    """Record the database's time now under `name` (e.g. the dispatch tick's last success, for alerts)."""
    with engine.begin() as conn:  # one UPDATE; the INSERT only the first time
        if not conn.execute(update(Meta).where(Meta.name == name).values(value=db_now())).rowcount:
            conn.execute(_insert_ignore(Meta).values(name=name, value=db_now()))


def db_clock_offset_s(engine: Engine) -> float:
    """This host's clock minus the database's, in seconds (both read as local wall time)."""
    with engine.connect() as conn:
        before = time.time()
        db = conn.scalar(select(db_local_now()))
        after = time.time()
    local = datetime.fromtimestamp((before + after) / 2)
    return (local - _as_datetime(db)).total_seconds()


def _as_datetime(value) -> datetime:
    """A time the database computed: SQLite gives it as text."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@retry_lock_conflicts
def end_waiting(engine: Engine, provider: str, window_s: int, reason: str, limit: int = 1000) -> int:
    """Waiting rows of `provider` claimed more than `window_s` ago end `error` with `reason` (its account
    stayed in trouble all that time). Returns how many."""
    d = Dispatch.__table__
    old = and_(d.c.provider == provider, d.c.state == S.WAITING, d.c.claimed_at <= db_now_plus(-window_s))
    with engine.begin() as conn:
        ids = list(conn.scalars(select(d.c.batchcontact_id).where(old).limit(limit).with_for_update(skip_locked=True)))
        if ids:
            conn.execute(update(d).where(d.c.batchcontact_id.in_(ids), old)
                         .values(state=S.ERROR, wait_reason=None, last_error=_fit(reason, 255), updated_at=db_now()))
            conn.execute(update(BatchContact).where(BatchContact.id.in_(ids), _not_reset(BatchContact.status))
                         .values(status="error", error_msg=_fit(reason, ERROR_MSG_MAX)))
    return len(ids)


def settle_delivered_part(engine: Engine, provider: str, provider_message_id: str) -> tuple[int, int, int] | None:
    """A receipt said the part `provider_message_id` (of a message sent in one or several parts) was
    delivered: forget that id and return (row id, the row's operator resends when that part was sent, how
    many of the row's part ids still await their receipt), or None when no row of `provider` has that id.
    Every statement commits on its own, so that of two parts settled at the same moment at least the later
    sees the other gone: the row's message is delivered once the count reaches 0. An undelivered part's id
    stays, for its receipt to find the row. An operator's resend forgets the earlier send's ids in the
    transaction that counts it (`claim_due`), so the resends read with the id are those of its send."""
    m, d = MessageId, Dispatch
    with autocommit_twin(engine).connect() as conn:
        found = conn.execute(select(m.batchcontact_id, d.resends).join(d, d.batchcontact_id == m.batchcontact_id)
                             .where(m.provider == provider, m.provider_message_id == provider_message_id)).first()
        if found is None:
            return None
        row_id, resends = found
        conn.execute(delete(m).where(m.provider == provider, m.provider_message_id == provider_message_id))
        left = conn.scalar(select(func.count()).select_from(m).where(m.provider == provider,
                                                                     m.batchcontact_id == row_id))
    return row_id, resends, int(left)
