"""Retention: our own records of finished rows hold recipients' numbers; after `SMS_RETENTION_DAYS` we let go
of them, in small batches, without touching asterCC's tables (asterCC keeps its own rows as it sees fit).

A dispatch record in a final state that last changed more than `days` ago is pruned with its provider ids
(`sms_message_ids`):

- a row that was routed to another provider than Mobilgroup (or never routed) loses its record;
- a Mobilgroup row keeps a record emptied of everything personal (number, provider ids, last error): its
  row id, state, resend count and times stay.

Why Mobilgroup's stay: an operator may set any finished row back to `new` in asterCC, however old. With its
record kept, that is a resend, counted, and Mobilgroup gets a request id it never had (`row + n·10^10`, see
`tasks.workflow.mobilgroup_request_id`). Without it, the row would go out as a first send under the row id
itself, which Mobilgroup already has: it would answer error 7, which we rightly read as "the earlier attempt
arrived", so asterCC would show `success` for a message never sent. Keeping the resend count keeps error 7
meaning that. Other providers have no such id: a row whose record is gone is sent again as a new row, which
is what the operator asked for; the old callback URLs expired long before (`SMS_WEBHOOK_TOKEN_TTL_S` is
held below the retention), and old receipts name provider ids that are gone, so nothing of the earlier send
can be taken for the new one.

The other rules are untouched: only final records are pruned (a row still on its way, or awaiting a report
or a poll, never is), and each is re-checked inside the transaction that prunes it, so a resend that took
the row meanwhile wins.
"""
from __future__ import annotations

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Engine

from .engine import db_now_plus
from .models import Dispatch, DispatchState as S, MessageId
from .store import retry_lock_conflicts

KEEP_EMPTIED = ("mobilgroup",)
"""Providers whose records are emptied rather than removed: their request ids must never be used twice."""


def prune(engine: Engine, days: int, batch: int = 1000, max_batches: int = 10) -> int:
    """Prune the records of rows final for more than `days` days, `batch` rows per transaction, at most
    `max_batches` transactions (call again for the rest). Returns how many records were removed or emptied:
    less than `batch * max_batches` means none is left for now."""
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
    """Final for longer than `age_s`, and still holding something to let go of."""
    d = Dispatch
    holds = or_(d.provider.is_(None), d.provider.not_in(KEEP_EMPTIED), d.recipient.is_not(None),
                d.provider_message_id.is_not(None), d.last_error.is_not(None))
    return and_(d.state.in_(S.FINAL), d.updated_at < db_now_plus(-age_s), holds)


@retry_lock_conflicts
def _prune_batch(engine: Engine, age_s: int, batch: int) -> int:
    d = Dispatch
    with engine.begin() as conn:
        # Locked (MariaDB) so that a resend cannot take them between this read and the writes; rows a claim
        # holds are skipped, not waited for, and pruned on a later call if still due.
        rows = conn.execute(select(d.batchcontact_id, d.provider).where(_due(age_s))
                            .order_by(d.updated_at).limit(batch)
                            .with_for_update(skip_locked=True)).all()
        if not rows:
            return 0
        ids = [row.batchcontact_id for row in rows]
        conn.execute(delete(MessageId).where(MessageId.batchcontact_id.in_(ids)))
        emptied = conn.execute(
            update(d).where(d.batchcontact_id.in_(ids), _due(age_s), d.provider.in_(KEEP_EMPTIED))
            .values(recipient=None, provider_message_id=None, last_error=None)).rowcount
        removed = conn.execute(delete(d).where(d.batchcontact_id.in_(ids), _due(age_s))).rowcount
    return emptied + removed
