"""One reading of how each provider is doing, for both of the operator's views: `smsctl status` (a table)
and `smsctl metrics` (Prometheus). Read from the database and the rate limiter's store at the moment it is
asked, so it is right for the whole fleet whichever worker sent what; `read()` is the one place the numbers
are worked out, the views only render them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal

from db import stats, store
from settings import Settings

RETENTION_DAYS_DEFAULT = 90


@dataclass(frozen=True)
class ProviderView:
    name: str
    configured: bool
    available: bool
    why_not: str | None
    """Why its circuit is open, and when it is next tested; None while available."""
    last_hour: dict[str, int]
    """`sent`, `failed`, `error` in the last hour."""
    waiting: dict[str, int]
    """Open rows by `queued`, `sending` or wait reason."""
    oldest_waiting_s: int | None
    rate: float | None
    """Its configured rate limit, messages per second."""
    sent_per_s: float
    """Its sends per second over the last minute."""
    throttled: int | None
    """Sends told to wait by the rate limiter so far (None: the limiter could not be read)."""
    failing_for_s: int | None
    fallbacks: tuple[str, ...]
    spend: dict[str, stats.Spend] = field(default_factory=dict)
    """Cost and parts of its rows sent in the last hour (`1h`) and day (`1d`)."""


@dataclass(frozen=True)
class Overview:
    providers: list[ProviderView]
    messages: dict[tuple[str, str], int]
    """Rows due within the retention period by (provider, asterCC status)."""
    due_to_sent: dict[str, stats.Delays]
    report_delay: dict[str, stats.Delays]
    dispatch_age_s: int | None
    """Seconds since the last dispatch tick ran to its end (None: none has)."""
    retention_days: float
    campaigns: list[stats.Campaign] = field(default_factory=list)
    """Campaigns with rows still open (`stats.campaigns`)."""
    optouts: int = 0
    """Numbers opted out of campaigns."""
    read_at: float = field(default_factory=time.time)


def retention_days(settings: Settings) -> float:
    return float(getattr(settings, "retention_days", RETENTION_DAYS_DEFAULT))


def read(settings: Settings, engine, throttle=None) -> Overview:
    """Everything the views show, read now. `throttle` (`workflow.throttle.make_throttle`) gives each
    provider's throttled count; without it that figure is None."""
    from workflow.runtime import Runtime
    from workflow.dispatch import DISPATCH_STAMP

    breakers = store.breaker_states(engine)
    waiting, oldest = stats.open_rows(engine)
    hour, minute = stats.last_hour(engine)
    messages = stats.messages(engine, retention_days(settings))
    spend = stats.spend(engine)
    seen = {p for p, _ in messages} | set(waiting) | {p for p, _ in hour}
    names = sorted(settings.providers_in_use | (seen - {stats.UNROUTED}))
    rt = Runtime(settings)
    views = []
    for name in names:
        breaker = breakers.get(name)
        configured = name in settings.providers_in_use
        throttled = None
        if throttle is not None and configured:
            try:
                throttled = throttle.throttled_count(rt.account(name))
            except Exception:  # the limiter's store is down: the rest of the screen still shows
                throttled = None
        views.append(ProviderView(
            name=name, configured=configured,
            available=configured and not (breaker and breaker.open),
            why_not=_why_not(breaker) if configured else "not configured (rows routed to it earlier remain)",
            last_hour={k: hour.get((name, k), 0) for k in ("sent", "failed", "error")},
            waiting=waiting.get(name, {}), oldest_waiting_s=oldest.get(name),
            rate=rt.rate(name) if configured else None, sent_per_s=minute.get(name, 0) / 60,
            throttled=throttled, failing_for_s=breaker.failing_for_s if breaker else None,
            fallbacks=tuple(settings.failover_table.get(name, ())),
            spend={window: spend.get((name, window), stats.Spend(0, 0, Decimal(0), 0))
                   for window in stats.SPEND_WINDOWS_S},
        ))
    return Overview(views, messages, stats.due_to_sent(engine), stats.report_delay(engine),
                    stats.stamp_age_s(engine, DISPATCH_STAMP), retention_days(settings),
                    stats.campaigns(engine), store.optout_count(engine))


def _why_not(breaker: store.BreakerState | None) -> str | None:
    if breaker is None or not breaker.open:
        return None
    when = "probe under way" if breaker.probing else (
        f"probe in {breaker.open_for_s} s" if breaker.open_for_s else "probe with the next row")
    return f"{breaker.reason} ({when})"
