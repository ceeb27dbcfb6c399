"""Retention: our own records of finished rows hold recipients' numbers; after `SMS_RETENTION_DAYS` we let go
of them, in small batches, without touching asterCC's tables (asterCC keeps its own rows as it sees fit).

A dispatch record in a final state that last changed more than `days` ago is pruned with its provider ids
(`sms_message_ids`):

- a row that was routed to a provider whose ids may repeat (or never routed) loses its record;
- a row of a provider that refuses a repeated id (Mobilgroup, `keep_emptied`) keeps a record emptied of everything personal (number, provider ids, last error): its
  row id, state, resend count and times stay.

Why Mobilgroup's stay: an operator may set any finished row back to `new` in asterCC, however old. With its
record kept, that is a resend, counted, and Mobilgroup gets a request id it never had (`row + n·10^10`, see
`providers.mobilgroup.request_id`). Without it, the row would go out as a first send under the row id
itself, which Mobilgroup already has: it would answer error 7, which we rightly read as "the earlier attempt
arrived", so asterCC would show `success` for a message never sent. Keeping the resend count keeps error 7
meaning that. Other providers have no such id: a row whose record is gone is sent again as a new row, which
is what the operator asked for; the old callback URLs expired long before (`SMS_WEBHOOK_TOKEN_TTL_S` is
held below the retention), and old receipts name provider ids that are gone, so nothing of the earlier send
can be taken for the new one.

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


def prune(engine: Engine, days: int, batch: int = 1000, max_batches: int = 10, *,
          keep_emptied: tuple[str, ...]) -> int:
    """Prune the records of rows final for more than `days` days, `batch` rows per transaction, at most
    `max_batches` transactions (call again for the rest). The records of `keep_emptied` providers (those
    whose request ids must never be used twice) are emptied rather than removed. Returns how many records were removed or emptied:
    less than `batch * max_batches` means none is left for now."""
    if days < 1 or batch < 1:
        raise ValueError("days and batch must be at least 1")
    pruned = 0
    for _ in range(max_batches):
        done = _prune_batch(engine, days * 86_400, batch, keep_emptied)
        pruned += done
        if done < batch:
            break
    return pruned


def _due(age_s: int):
    """Final for longer than `age_s`, and not yet emptied."""
    d = Dispatch
    return and_(d.state.in_(S.FINAL), d.updated_at < db_now_plus(-age_s), d.updated_at > EMPTIED_MARK)


@retry_lock_conflicts
def _prune_batch(engine: Engine, age_s: int, batch: int, keep_emptied: tuple[str, ...]) -> int:
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
        emptied = conn.execute(
            update(d).where(d.batchcontact_id.in_(ids), _due(age_s), d.provider.in_(keep_emptied))
            .values(recipient=None, provider_message_id=None, last_error=None, updated_at=EMPTIED_MARK)).rowcount
        removed = conn.execute(delete(d).where(d.batchcontact_id.in_(ids), _due(age_s))).rowcount
    return emptied + removed
