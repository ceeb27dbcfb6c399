"""The operator's figures, read from our own tables: what `smsctl status` shows and `smsctl metrics` serves.

Every query here must stay cheap on a `sms_dispatch` of millions of rows, since Prometheus runs them every
scrape: each one is answered from an index (`ix_sms_dispatch_release` for the totals and the oldest waiting
row, `ix_sms_dispatch_accepted` for the last hour's sends, `ix_sms_dispatch_spend` for the last day's
costs and parts, `ix_sms_dispatch_state_updated` for the last hour's endings), never from the asterCC
tables, which may have no index at all. asterCC's status of a row
is read from our state (`STATUS_OF_STATE`), which the same transaction writes beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Integer, and_, case, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from .engine import autocommit_twin, db_now_plus, seconds_since
from .models import Dispatch, DispatchState as S, Meta
from .store import open_by_reason

STATUS_OF_STATE = {
    S.QUEUED: "pending", S.SENDING: "pending", S.WAITING: "pending",
    S.ACCEPTED: "success", S.DELIVERED: "success", S.UNCONFIRMED: "success",
    S.FAILED: "failed", S.ERROR: "error",
}
"""asterCC's `status` of a row in each of our states."""
UNROUTED = "none"
"""The provider label of rows refused before routing (invalid numbers, expired rows) or not yet routed."""
DELAY_BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86_400)
"""Upper bounds of the delay histograms, in seconds: from a one-time code's second to a day's backlog."""
WINDOW_S = 3600
"""The window of the "last hour" figures and of the delay histograms."""


class seconds_between(FunctionElement):  # noqa: N801 - reads as a SQL function
    """Whole seconds from one (local) time column to another."""

    type = Integer()
    inherit_cache = True


@compiles(seconds_between)
def _seconds_between_default(element, compiler, **kw):
    start, end = (compiler.process(c, **kw) for c in element.clauses)
    return f"TIMESTAMPDIFF(SECOND, {start}, {end})"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element, compiler, **kw):
    start, end = (compiler.process(c, **kw) for c in element.clauses)
    return f"(CAST(strftime('%s', {end}) AS INTEGER) - CAST(strftime('%s', {start}) AS INTEGER))"


@dataclass(frozen=True)
class Delays:
    """A histogram of delays: `buckets[k]` rows took at most `DELAY_BUCKETS_S[k]` (cumulative), `count`
    rows in all, `sum_s` seconds in all."""

    buckets: tuple[int, ...]
    count: int
    sum_s: float


def messages(engine: Engine, retention_days: float) -> dict[tuple[str, str], int]:
    """Rows due within the retention period, by (provider, asterCC status)."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        rows = conn.execute(select(d.c.provider, d.c.state, func.count())
                            .where(d.c.due_at >= db_now_plus(-retention_days * 86_400))
                            .group_by(d.c.provider, d.c.state)).all()
    totals: dict[tuple[str, str], int] = {}
    for provider, state, n in rows:
        key = (provider or UNROUTED, STATUS_OF_STATE.get(state, state))
        totals[key] = totals.get(key, 0) + n
    return totals


def open_rows(engine: Engine) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Rows not yet handed to a provider: ({provider: {`queued` | `sending` | wait reason: count}},
    {provider: age in seconds of its oldest waiting row, counted from when it was due})."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        rows = open_by_reason(conn, func.count(), func.max(seconds_since(d.c.due_at)))
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, int] = {}
    for provider, state, reason, n, age in rows:
        provider = provider or UNROUTED
        key = (reason or "room") if state == S.WAITING else state
        bucket = counts.setdefault(provider, {})
        bucket[key] = bucket.get(key, 0) + n
        if state == S.WAITING and age is not None:
            oldest[provider] = max(oldest.get(provider, 0), int(age))
    return counts, oldest


CAMPAIGNS_SHOWN = 20
"""Campaigns in progress shown at most, the oldest first."""
PROGRESS = {S.ACCEPTED: "sent", S.DELIVERED: "sent", S.UNCONFIRMED: "sent", S.QUEUED: "waiting",
            S.SENDING: "waiting", S.WAITING: "waiting", S.FAILED: "failed", S.ERROR: "error"}
"""How a campaign's rows count in its progress, by our state."""


@dataclass(frozen=True)
class Campaign:
    """A campaign with rows still open: its batch (asterCC's archive row), who created it, and its rows
    `sent` (accepted by the provider), `waiting` (not yet), `failed` and `error`."""

    batch: int
    creby: str
    rows: dict[str, int]


def campaigns(engine: Engine, limit: int = CAMPAIGNS_SHOWN) -> list[Campaign]:
    """Campaigns in progress (a campaign row still open), the oldest batch first, at most `limit`: the open
    rows found by their state (an index: the backlog is read, never the finished rows), then their batches'
    counts from `ix_sms_dispatch_batch` alone."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        open_batches = conn.execute(select(d.c.batch_id, func.max(d.c.creby))
                                    .where(d.c.state.in_(S.OPEN), d.c.campaign.is_(True))
                                    .group_by(d.c.batch_id).order_by(d.c.batch_id).limit(limit)).all()
        if not open_batches:
            return []
        counts = conn.execute(select(d.c.batch_id, d.c.state, func.count())
                              .where(d.c.batch_id.in_([batch for batch, _ in open_batches]))
                              .group_by(d.c.batch_id, d.c.state)).all()
    rows: dict[int, dict[str, int]] = {batch: dict.fromkeys(("sent", "waiting", "failed", "error"), 0)
                                       for batch, _ in open_batches}
    for batch, state, n in counts:
        rows[batch][PROGRESS.get(state, "waiting")] += n
    return [Campaign(batch, creby or "", rows[batch]) for batch, creby in open_batches]


def last_hour(engine: Engine) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """({(provider, `sent` | `failed` | `error`): rows in the last `WINDOW_S`}, {provider: rows sent in the
    last minute}). `sent`: accepted by the provider; `failed`, `error`: ended so (a row sent and then
    reported undeliverable counts in both)."""
    d = Dispatch.__table__
    with autocommit_twin(engine).connect() as conn:
        sent = conn.execute(select(d.c.provider, func.count(),
                                   func.sum(case((d.c.accepted_at >= db_now_plus(-60), 1), else_=0)))
                            .where(d.c.accepted_at >= db_now_plus(-WINDOW_S))
                            .group_by(d.c.provider)).all()
        ended = conn.execute(select(d.c.provider, d.c.state, func.count())
                             .where(d.c.state.in_((S.FAILED, S.ERROR)), d.c.updated_at >= db_now_plus(-WINDOW_S))
                             .group_by(d.c.provider, d.c.state)).all()
    counts = {(provider or UNROUTED, "sent"): n for provider, n, _ in sent}
    counts.update({(provider or UNROUTED, state): n for provider, state, n in ended})
    return counts, {provider: int(minute or 0) for provider, _, minute in sent}


SPEND_WINDOWS_S = {"1h": WINDOW_S, "1d": 86_400}
"""The windows of the cost and parts figures, by their label."""


@dataclass(frozen=True)
class Spend:
    """Rows a provider accepted within a window: `messages` in all, `parts` of them (the provider's count
    where its report gave one, else ours), and the `cost` its reports gave for the `priced` ones."""

    messages: int
    parts: int
    cost: Decimal
    priced: int


def spend(engine: Engine) -> dict[tuple[str, str], Spend]:
    """{(provider, window label of `SPEND_WINDOWS_S`): its `Spend`}, from `ix_sms_dispatch_spend` alone."""
    d = Dispatch.__table__
    parts = func.coalesce(d.c.parts_reported, d.c.parts)
    columns = []
    for seconds in SPEND_WINDOWS_S.values():
        inside = d.c.accepted_at >= db_now_plus(-seconds)
        columns += [func.sum(case((inside, 1), else_=0)), func.sum(case((inside, parts), else_=0)),
                    func.sum(case((inside, d.c.cost), else_=None)),
                    func.sum(case((and_(inside, d.c.cost.is_not(None)), 1), else_=0))]
    with autocommit_twin(engine).connect() as conn:
        rows = conn.execute(select(d.c.provider, *columns)
                            .where(d.c.accepted_at >= db_now_plus(-max(SPEND_WINDOWS_S.values())))
                            .group_by(d.c.provider)).all()
    figures = {}
    for provider, *sums in rows:
        for k, window in enumerate(SPEND_WINDOWS_S):
            messages, n_parts, cost, priced = sums[4 * k:4 * k + 4]
            figures[(provider or UNROUTED, window)] = Spend(int(messages or 0), int(n_parts or 0),
                                                           Decimal(cost or 0), int(priced or 0))
    return figures


def _delays(engine: Engine, start, end, where) -> dict[str, Delays]:
    d = Dispatch.__table__
    took = seconds_between(start, end)
    columns = [func.sum(case((took <= bound, 1), else_=0)) for bound in DELAY_BUCKETS_S]
    with autocommit_twin(engine).connect() as conn:
        rows = conn.execute(select(d.c.provider, func.count(), func.sum(took), *columns)
                            .where(where).group_by(d.c.provider)).all()
    return {provider or UNROUTED: Delays(tuple(int(b or 0) for b in buckets), count, float(total or 0))
            for provider, count, total, *buckets in rows}


def due_to_sent(engine: Engine) -> dict[str, Delays]:
    """By provider, how long rows sent in the last `WINDOW_S` took from due (asterCC's `schedulertime`) to
    accepted by the provider."""
    d = Dispatch.__table__
    return _delays(engine, d.c.due_at, d.c.accepted_at, d.c.accepted_at >= db_now_plus(-WINDOW_S))


def report_delay(engine: Engine) -> dict[str, Delays]:
    """By provider, how long the delivery reports that ended rows in the last `WINDOW_S` took after the
    provider accepted the row (for Mobilgroup: its status poll)."""
    d = Dispatch.__table__
    return _delays(engine, d.c.accepted_at, d.c.updated_at,
                   and_(d.c.state.in_((S.DELIVERED, S.FAILED)), d.c.updated_at >= db_now_plus(-WINDOW_S),
                        d.c.accepted_at.is_not(None)))


def stamp_age_s(engine: Engine, name: str) -> int | None:
    """Seconds since the time recorded under `name` (`store.stamp`), by the database's clock; None if none."""
    with autocommit_twin(engine).connect() as conn:
        return conn.scalar(select(seconds_since(Meta.value)).where(Meta.name == name))
