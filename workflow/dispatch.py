"""A beat tick (`sms.dispatch`): claim the due rows, refuse the invalid and expired ones, route the rest,
and release each provider's ready rows to the broker, up to its room; while a provider's circuit is open,
its one probe, and its waiting rows moved to a failover provider.

Only `queued` rows have a task in the broker, at most `SMS_<PROVIDER>_MAX_INFLIGHT` per provider with the
`sending` ones, so one provider's backlog or outage never takes another's room. Each tick also re-enqueues
queued rows whose task has not started within `SMS_LOST_TASK_S` (lost with a Redis restart or a killed
worker), and settles sends whose lease ran out (their outcome is unknown).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone

from db import store
from providers import registry
from providers.base import ProviderError
from workflow.campaigns import optout_reason, quiet_left_s, recipient_zone
from workflow.poll import status_slot
from workflow.routing import InvalidNumber, normalise, route
from workflow.runtime import Runtime
from workflow.wording import duration

log = logging.getLogger(__name__)

Enqueue = Callable[[list[int], str], None]
"""Puts send tasks for these row ids on the provider's queue."""


def dispatch_due(rt: Runtime, enqueue: Enqueue, budget_s: float | None = None) -> int:
    """A beat tick: claim the due rows batch by batch (until none are left or `budget_s` is spent), refuse
    invalid and expired ones, route the rest, then release each provider's ready rows to the broker.
    When the budget ends with rows still due (a large campaign being claimed), one more batch takes the
    latest due rows: a single message that fell due behind a campaign is claimed at the next tick, not after
    the whole campaign. Returns how many rows were claimed."""
    s = rt.settings
    deadline = time.monotonic() + (budget_s if budget_s is not None else s.dispatch_interval_s)
    stretched = store.stretch_leases(rt.engine, 2 * s.dispatch_interval_s)
    if stretched:
        log.warning("dispatch: no tick reached the database for %d s (it was away, or no tick ran): every send "
                    "under way keeps its lease that much longer", stretched)
    total = 0
    while True:
        claimed = store.claim_due(rt.engine, s.dispatch_batch)
        total += len(claimed)
        route_claimed(rt, claimed)
        if len(claimed) < s.dispatch_batch:
            break
        if time.monotonic() >= deadline:
            latest = store.claim_due(rt.engine, s.dispatch_batch, latest_first=True)
            total += len(latest)
            route_claimed(rt, latest)
            break
    refuse_opted_out(rt)
    hold_quiet(rt)
    quiet = quiet_now(rt)
    breakers = store.breaker_states(rt.engine)
    summary = store.waiting_summary(rt.engine)
    # Also a provider no longer configured that still has rows: they go on to their workers, which hold
    # them as an account problem until SMS_ACCOUNT_RETRY_WINDOW_S ends them, never stuck. Providers whose
    # circuit is open go first, so that the rows they hand to a fallback are released in this same tick.
    unavailable = {p for p, b in breakers.items() if b.open}
    providers = s.providers_in_use | (summary.keys() - {"unrouted"})
    released: dict[str, Counter] = {}
    for provider in sorted(providers, key=lambda p: (p not in unavailable, p)):
        released[provider] = release(rt, provider, enqueue, breakers.get(provider), quiet)
        if provider in unavailable:
            fail_over(rt, provider, breakers)
    _log_tick(rt, total, summary, breakers, released)
    store.stamp(rt.engine, DISPATCH_STAMP)
    return total


DISPATCH_STAMP = "dispatch_last_success"
"""`sms_meta` name under which each dispatch tick that ran to its end records the database's time: an
operator's alert fires when it grows old (beat stopped, or no worker takes the dispatch queue)."""
FAILOVER_BATCH = 5000
"""Waiting rows moved to a fallback per provider and tick: the fallback's room, not this, paces them."""
CONFIRM_PER_TICK = 20
"""Rows in doubt whose provider is asked per tick whether it has them (each a request to a troubled provider)."""
CONFIRM_AFTER_S = 60
"""A row in doubt is asked about only this long after its last send ended: until then its request may still
be on its way, and "no such request" would not mean it never arrives."""
CONFIRM_EVERY_S = 30.0
"""A provider is asked about rows in doubt at most this often per process: a provider that hangs must not
hold every tick for its HTTP timeout."""


OPTOUTS_PER_TICK = 1000
"""Opted-out rows one tick ends at most (one transaction); the others wait for the next ticks, and no release
takes them meanwhile (`store.release_waiting`)."""


def refuse_opted_out(rt: Runtime) -> int:
    """Waiting campaign rows whose recipient opted out end `failed` ("the recipient opted out by replying
    STOP on …"), before any provider is called: just claimed, or waiting since before the reply came.
    Returns how many."""
    opted_out = store.opted_out_waiting(rt.engine, rt.settings.providers_in_use, OPTOUTS_PER_TICK)
    refused = store.refuse_waiting(rt.engine, {row_id: optout_reason(optout.word, optout.opted_at)
                                               for row_id, optout in opted_out})
    if refused:
        log.info("dispatch: %d campaign rows end failed: their recipients opted out", refused)
    return refused


def hold_quiet(rt: Runtime) -> int:
    """While `SMS_QUIET_HOURS` is set: campaign rows whose recipients are in their quiet hours now wait
    (`quiet`) until the window ends there, whether just claimed or waiting since before it began (a
    campaign larger than an evening's rate). Returns how many rows it held."""
    window = rt.settings.quiet_window
    if window is None:
        return 0
    now = datetime.now(timezone.utc)
    holds = {}
    for zone in store.waiting_zones(rt.engine):
        left = quiet_left_s(zone, window, now)
        if left is not None:
            holds[zone] = math.ceil(left)
    held = store.hold_quiet(rt.engine, holds) if holds else 0
    if held:
        log.info("dispatch: %d campaign rows wait for the end of quiet hours (%s) at their recipients' (%s)",
                 held, rt.settings.quiet_hours, ", ".join(sorted(holds)))
    return held


def quiet_now(rt: Runtime) -> Callable[[str], bool] | None:
    """While `SMS_QUIET_HOURS` is set, whether a time zone is in quiet hours now (each zone worked out once a
    tick): the tick's releases check the rows they move with it, rows routed after `hold_quiet` included."""
    window = rt.settings.quiet_window
    if window is None:
        return None
    now = datetime.now(timezone.utc)
    return functools.lru_cache(maxsize=None)(lambda zone: quiet_left_s(zone, window, now) is not None)


def fail_over(rt: Runtime, provider: str, breakers: dict[str, store.BreakerState]) -> int:
    """While `provider`'s circuit is open, move its waiting rows to the first of its `SMS_FAILOVER`
    fallbacks whose circuit is closed. A row whose last request's answer never came may be at `provider`
    already: it stays, and moves only once `provider` confirms it has no such request (`_confirm_not_taken`,
    which records the row sent where `provider` says it has it). Returns how many rows moved."""
    s = rt.settings
    fallback = next((f for f in s.failover_table.get(provider, ())
                     if f in s.providers_in_use and not (breakers.get(f) and breakers[f].open)), None)
    if fallback is None:
        return _lend_a_probe_row(rt, provider, breakers)
    _confirm_not_taken(rt, provider)
    moved = store.reroute_waiting(rt.engine, provider, fallback, FAILOVER_BATCH)
    if moved:
        log.info("failover: %d waiting rows of %s moved to %s", len(moved), provider, fallback)
        rt.alert_once(f"failover:{provider}", "ALERT: %s unavailable (%s): its waiting rows go through %s "
                    "until a probe gets through", provider, breakers[provider].reason, fallback)
    return len(moved)


def _lend_a_probe_row(rt: Runtime, provider: str, breakers: dict[str, store.BreakerState]) -> int:
    """Every fallback of `provider` is paused too. The first whose pause is over, with no probe under way and
    no row of its own, gets one of `provider`'s waiting rows to probe with: a provider used only as a
    fallback would otherwise never be probed, stay paused for good, and failover with it. Returns how many
    rows moved (0 or 1)."""
    s = rt.settings
    for fallback in s.failover_table.get(provider, ()):
        breaker = breakers.get(fallback)
        if (fallback in s.providers_in_use and breaker is not None and breaker.open_for_s == 0
                and not breaker.probing and not store.waiting_summary(rt.engine).get(fallback)):
            moved = store.reroute_waiting(rt.engine, provider, fallback, 1)
            if moved:
                log.warning("failover: %s is paused too and has no row of its own to probe with: row %d of %s "
                            "goes to it, as its probe", fallback, moved[0], provider)
            return len(moved)
    return 0


def _confirm_not_taken(rt: Runtime, provider: str) -> None:
    """Ask `provider`, where it can tell (Mobilgroup's status request), about the rows whose answer never
    came, once each: a row whose request it has is sent (accepted, as its send would have recorded); one
    whose request it has not (or whose id it holds for another number) may then move. Each question takes a
    slot of the account's rate limit; stops at the first question it cannot answer, or whose slot is not
    near."""
    if time.monotonic() - rt.confirm_asked.get(provider, -math.inf) < CONFIRM_EVERY_S:
        return
    try:
        client = rt.client(provider)
    except ValueError:  # no longer configured: it cannot be asked
        return
    if not hasattr(client, "holds_request_for"):
        return
    rt.confirm_asked[provider] = time.monotonic()
    entry = registry.entry(provider)
    for row in store.in_doubt(rt.engine, provider, CONFIRM_PER_TICK, CONFIRM_AFTER_S):
        if not status_slot(rt, provider):
            return
        reference = entry.reference(rt.settings, row.id, row.resends)
        try:
            ours = client.holds_request_for(reference, row.recipient)
        except ProviderError:
            return
        if ours:
            poll_after = rt.settings.poll_after_s() if entry.reports == "poll" else None
            if store.taken(rt.engine, row.id, row.token, str(reference), poll_after):
                log.info("failover: %s confirms it has row %d, whose answer was lost: it is sent", provider, row.id)
        elif store.not_taken(rt.engine, row.id, row.token):
            log.info("failover: %s confirms it never got row %d: it may move", provider, row.id)


def route_claimed(rt: Runtime, claimed: list[store.Claimed]) -> dict[str, list[int]]:
    """Refuse invalid numbers and expired rows at once; record each other row's provider and normalised
    number (they then wait for their provider's room) and, while quiet hours are set, a campaign row's time
    zone. Returns the routed row ids by provider."""
    s = rt.settings
    routes: dict[int, tuple[str, str]] = {}
    campaign: dict[int, str] = {}
    refused: dict[int, str] = {}
    for row in claimed:
        if row.overdue_s > s.max_age_s:
            refused[row.id] = (f"expired: due {row.due_at:%Y-%m-%d %H:%M}, more than {duration(s.max_age_s)} "
                               "ago (SMS_MAX_AGE_S)")
            continue
        try:
            recipient = normalise(row.target, s)
        except InvalidNumber as exc:
            refused[row.id] = str(exc)
            continue
        routes[row.id] = (route(recipient, s), recipient)
        if row.campaign:
            campaign[row.id] = recipient
    store.refuse_waiting(rt.engine, refused)  # after an outage longer than SMS_MAX_AGE_S: a whole claim
    # Zones first: a routed row may be released at once (another tick), and its zone must be known by then.
    if campaign and s.quiet_window:
        store.set_zones(rt.engine, {row_id: recipient_zone(recipient, s) for row_id, recipient in campaign.items()})
    store.assign_routes(rt.engine, routes)
    by_provider: dict[str, list[int]] = {}
    for row_id, (provider, _) in routes.items():
        by_provider.setdefault(provider, []).append(row_id)
    return by_provider


def release(rt: Runtime, provider: str, enqueue: Enqueue, breaker: store.BreakerState | None,
            quiet: Callable[[str], bool] | None) -> Counter:
    """One provider's part of a tick: settle sends whose lease ran out, enqueue again queued rows whose task
    was lost, and put waiting rows that are due in the broker, up to the provider's room, in fair turns
    between batches (`store.release_waiting`), but no campaign row in `quiet` hours or to an opted-out
    number. While its account circuit is open, only its one probe goes, once the pause is over; rows that
    waited through pauses longer than `SMS_ACCOUNT_RETRY_WINDOW_S` end `error`. Returns how many waiting
    rows it released from each batch."""
    s, engine = rt.settings, rt.engine
    room = s.max_inflight(provider)
    resent, ended = store.expire_leases(engine, provider, resend=s.resends_unknown(provider), limit=room)
    if resent or ended:
        log.warning("%s: %d sends stopped before their answer came (worker killed or hung); %s", provider,
                    resent + len(ended), "sending them again" if resent else "they end as error (ON_UNKNOWN=error)")
    again, abandoned = store.requeue_lost(engine, provider, s.lost_task_s, s.retry_window_s, room)
    if abandoned:
        log.error("ALERT: %s: %d rows ended as error: no worker took them from queue send.%s within "
                  "SMS_RETRY_WINDOW_S", provider, abandoned, provider)
    load = store.provider_load(engine, provider)
    if load.oldest_queued_s is not None and load.oldest_queued_s > s.requeue_after_s:
        rt.alert_once(f"queue:{provider}", "ALERT: %s: rows have waited %d s in queue send.%s and no worker "
                    "takes them: start a worker for that queue", provider, load.oldest_queued_s, provider)
    if breaker is not None and breaker.open:
        gave_up = store.end_waiting(engine, provider, s.account_retry_window_s,
                                    f"{provider} account problem: {breaker.reason} (gave up after waiting "
                                    f"{duration(s.account_retry_window_s)}, SMS_ACCOUNT_RETRY_WINDOW_S)")
        if gave_up:
            log.error("ALERT: %s: %d rows ended as error after waiting through the account problem", provider, gave_up)
        fresh = []
        # Refused credentials: a process with other ones (fixed, restarted) probes at once, not after the pause.
        credentials = rt.fingerprint(provider) if breaker.refused_login else None
        due = breaker.open_for_s == 0 or (credentials is not None and credentials != breaker.refused_login)
        if due and not breaker.probing and store.take_probe(engine, provider, s.send_lease_s, credentials):
            fresh = store.release_waiting(engine, provider, 1, s.lost_task_s, probe=True, quiet=quiet)
            store.drop_probe(engine, provider)  # the probe row, while queued or being sent, is its mark now
            if fresh:
                log.warning("%s account paused (%s): sending one probe (row %d)", provider, breaker.reason, fresh[0].id)
    else:
        fresh = store.release_waiting(engine, provider, room - load.inflight, s.lost_task_s, quiet=quiet)
    if again:
        log.warning("%s: %d queued rows had no task started within %d s (broker restarted, or the worker "
                    "holding them died); enqueued again", provider, len(again), s.lost_task_s)
    if again or fresh:
        enqueue(again + [row.id for row in fresh], provider)
    return Counter(row.batch for row in fresh)


LOGGED_BATCHES = 5
"""Batches named one by one in a tick's line; the rest are counted."""


def _log_tick(rt: Runtime, claimed: int, summary: dict[str, dict[str, int]],
              breakers: dict[str, store.BreakerState], released: dict[str, Counter]) -> None:
    """One INFO line per provider that had rows open at the start of the tick: in flight, waiting and why,
    its account circuit, and the batches (asterCC archive rows) whose rows it released to the broker."""
    if claimed:
        log.info("dispatch: claimed %d rows", claimed)
    for provider, counts in sorted(summary.items()):
        breaker = breakers.get(provider)
        circuit = "closed" if breaker is None or not breaker.open else (
            f"open ({breaker.reason}; probe {'under way' if breaker.probing else f'in {breaker.open_for_s} s'})")
        inflight = counts.get("queued", 0) + counts.get("sending", 0)
        waiting = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())
                            if reason not in ("queued", "sending")) or "none"
        log.info("dispatch: %s: in flight %d of %d, waiting: %s; account circuit %s; released %s", provider,
                 inflight, rt.settings.max_inflight(provider) if provider in rt.settings.providers_in_use else 0,
                 waiting, circuit, _batches(released.get(provider, Counter())))


def _batches(released: Counter) -> str:
    """`12 (batch 7: 10, batch 9: 2)`: rows released, by batch, the largest first."""
    if not released:
        return "none"
    named = ", ".join(f"batch {batch}: {n}" for batch, n in released.most_common(LOGGED_BATCHES))
    more = len(released) - LOGGED_BATCHES
    return f"{sum(released.values())} ({named}{f', {more} more batches' if more > 0 else ''})"


