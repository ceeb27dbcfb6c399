"""Retention: our own records of finished rows hold recipients' numbers; after `SMS_RETENTION_DAYS` we let go
of them, in small batches, without touching asterCC's tables (asterCC keeps its own rows as it sees fit).

A dispatch record in a final state that last changed more than `days` ago is emptied of everything personal
(number, provider ids and `sms_message_ids`, last error); its row id, state, provider, fencing token and
resend count stay. No record is ever deleted.

Why: an operator may set any finished row back to `new` in asterCC, however old. With its record kept, that
is a resend, counted, and every request id derived from the count is new: Mobilgroup gets an id it never
had (`row + n·10^10`, see `providers.mobilgroup.request_id`), whichever providers the row went through
before (a failover, a route change). Without it, the row would go out as a first send under the row id
itself; had Mobilgroup ever had that id, it would answer error 7, which we rightly read as "the earlier
attempt arrived", so asterCC would show `success` for a message never sent. The same count fences callback
URLs and reports of earlier sends, and the kept token keeps every late writer of an earlier send fenced off.

An emptied record's `updated_at` is set to `EMPTIED_MARK` (1970-01-02), which says it holds nothing more:
it keeps it out of the index range that `prune` reads, so a call costs the records it prunes, not the
emptied ones piling up, and it is still "final long ago" to the resend rule.

The other rules are untouched: only final records are pruned (a row still on its way, or awaiting a report
or a poll, never is), and each is re-checked inside the transaction that prunes it, so a resend that took
the row meanwhile wins.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, delete, select, update
from sqlalchemy.engine import Engine

from .engine import db_now_plus
from .models import Dispatch, DispatchState as S, MessageId
from .store import retry_lock_conflicts

EMPTIED_MARK = datetime(1970, 1, 2)


def prune(engine: Engine, days: int, batch: int = 1000, max_batches: int = 10) -> int:
    """Empty the records of rows final for more than `days` days, `batch` rows per transaction, at most
    `max_batches` transactions (call again for the rest). Returns how many records were emptied: less than
    `batch * max_batches` means none is left for now."""
    if days < 1 or batch < 1:
        raise ValueError("days and batch must be at least 1")
    pruned = 0
    for _ in range(max_batches):
        done = _prune_batch(engine, days * 86_400, batch)
        pruned += done
        if done < batch:
            break
    return pruned


def _due(age_s: int):
    """Final for longer than `age_s`, and not yet emptied."""
    d = Dispatch
    return and_(d.state.in_(S.FINAL), d.updated_at < db_now_plus(-age_s), d.updated_at > EMPTIED_MARK)


@retry_lock_conflicts
def _prune_batch(engine: Engine, age_s: int, batch: int) -> int:
    d = Dispatch
    with engine.begin() as conn:
        # Locked (MariaDB) so that a resend cannot take them between this read and the writes; rows a claim
        # holds are skipped, not waited for, and pruned on a later call. No ORDER BY: the scan, and the
        # locks it takes, stop at `batch` rows.
        ids = list(conn.scalars(select(d.batchcontact_id).where(_due(age_s)).limit(batch)
                                .with_for_update(skip_locked=True)))
        if not ids:
            return 0
        conn.execute(delete(MessageId).where(MessageId.batchcontact_id.in_(ids)))
        return conn.execute(
            update(d).where(d.batchcontact_id.in_(ids), _due(age_s))
            .values(recipient=None, provider_message_id=None, last_error=None, updated_at=EMPTIED_MARK)).rowcount
