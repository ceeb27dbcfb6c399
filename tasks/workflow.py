"""The dispatch workflow, without Celery: what a beat tick, a send, a status poll and a sweep do.

The Celery tasks in `tasks.jobs` are thin wrappers over these functions; the functions take a `Runtime`
(settings, DB engine, provider clients, throttle) and return plain values saying what happened, so the
whole flow can be read, tested and reasoned about here. The rules it keeps are in `../shared/DESIGN.md`:
row ids only in the broker, no DB connection held across a provider call, the provider's typed errors
decide `failed` / wait / `error`, nothing final is ever overwritten.

Where a row is, and who moves it (`db.models.DispatchState`):

    asterCC `new` ─claim─► waiting ─release─► queued ─task─► sending ─► accepted / failed / error
                              ▲                  │ lost: again   │
                              └──── wait_again ◄─┴───────────────┘  (throttled, paused, retry, unknown, busy)

Only `queued` rows have a task in the broker, at most `SMS_<PROVIDER>_MAX_INFLIGHT` per provider with the
`sending` ones, so one provider's backlog or outage never takes another's room. Every tick releases, per
provider, the waiting rows that are due, oldest due first; it re-enqueues queued rows whose task has not
started within `SMS_LOST_TASK_S` (lost with a Redis restart or a killed worker), and settles sends whose
lease ran out (their outcome is unknown). A send holds its lease under a fencing token: what it writes
after losing the lease changes nothing.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Callable

from sqlalchemy.exc import DBAPIError, OperationalError

from db import retention, store
from db.models import WaitReason as W
from providers.base import (
    AccountError,
    OutgoingMessage,
    PartlySent,
    PermanentError,
    ProviderError,
    ThrottledError,
    UnknownOutcome,
)
from providers.smsc_text import COMMENT_SEPARATOR
from tasks.reports import apply_report
from tasks.routing import InvalidNumber, normalise, route
from tasks.runtime import Runtime
from celery_ext.pool import waiting

log = logging.getLogger(__name__)

REPORTING_BY_CALLBACK = ("accolades", "ozeki")
RESEND_STRIDE = 10**10
"""Above any asterCC row id (`int(11)`): the n-th resend of row r goes to Mobilgroup as r + n·10^10."""
MOBILGROUP_PREFIX_STRIDE = 10**12
"""`SMS_MOBILGROUP_ID_PREFIX` stands above every row id and resend count."""
THROTTLE_MAX_WAIT_S = 2.0
THROTTLE_DOWN_RETRY_S = 10.0
RECONNECT_RETRY_S = 2.0
"""A send that could not reach the database runs again this much later (its task kept in the worker),
instead of failing its task and leaving its row to the lost-task sweep."""
BUSY_RETRY_S = 1.0
"""A row given back because the worker had no thread free for its provider, or was stopping."""
LEASE_MARGIN_S = 5.0
"""A send starts its provider call only if its lease outlasts the call's deadline by this much: a send that
waited too long (a paused process, a slow rate-limit slot) must not call under a lease about to run out."""
SUSPECT_WITHIN_S = 600
SUSPECT_ROWS = 3
"""An error that could be about one message is the account's once this many different rows met it within
`SUSPECT_WITHIN_S`."""
ALERT_EVERY_S = 60.0


@dataclass(frozen=True)
class Retry:
    """Run the send again after `delay_s` (the database could not be reached); `reason` is shown as the
    retry reason in Flower and logs."""

    delay_s: float
    reason: str


Enqueue = Callable[[list[int], str], None]
"""Puts send tasks for these row ids on the provider's queue."""


# --- dispatch -------------------------------------------------------------------------------------

def dispatch_due(rt: Runtime, enqueue: Enqueue, budget_s: float | None = None) -> int:
    """A beat tick: claim the due rows batch by batch (until none are left or `budget_s` is spent), refuse
    invalid and expired ones, route the rest, then release each provider's ready rows to the broker.
    Returns how many rows were claimed."""
    s = rt.settings
    deadline = time.monotonic() + (budget_s if budget_s is not None else s.dispatch_interval_s)
    total = 0
    while True:
        claimed = store.claim_due(rt.engine, s.dispatch_batch)
        total += len(claimed)
        _route(rt, claimed)
        if len(claimed) < s.dispatch_batch or time.monotonic() >= deadline:
            break
    breakers = store.breaker_states(rt.engine)
    summary = store.waiting_summary(rt.engine)
    # Also a provider no longer configured that still has rows: they go on to their workers, which hold
    # them as an account problem until SMS_ACCOUNT_RETRY_WINDOW_S ends them, never stuck. Providers whose
    # circuit is open go first, so that the rows they hand to a fallback are released in this same tick.
    unavailable = {p for p, b in breakers.items() if b.open}
    providers = s.providers_in_use | (summary.keys() - {"unrouted"})
    for provider in sorted(providers, key=lambda p: (p not in unavailable, p)):
        release(rt, provider, enqueue, breakers.get(provider))
        if provider in unavailable:
            fail_over(rt, provider, breakers)
    _log_tick(rt, total, summary, breakers)
    store.stamp(rt.engine, DISPATCH_STAMP)
    return total


DISPATCH_STAMP = "dispatch_last_success"
"""`sms_meta` name under which each dispatch tick that ran to its end records the database's time: an
operator's alert fires when it grows old (beat stopped, or no worker takes the dispatch queue)."""
FAILOVER_BATCH = 5000
"""Waiting rows moved to a fallback per provider and tick: the fallback's room, not this, paces them."""
CONFIRM_PER_TICK = 20
"""Rows in doubt whose provider is asked per tick whether it has them (each a request to a troubled provider)."""
CONFIRM_EVERY_S = 30.0
"""A provider is asked about rows in doubt at most this often per process: a provider that hangs must not
hold every tick for its HTTP timeout."""


def fail_over(rt: Runtime, provider: str, breakers: dict[str, store.BreakerState]) -> int:
    """While `provider`'s circuit is open, move its waiting rows to the first of its `SMS_FAILOVER`
    fallbacks whose circuit is closed. A row whose last request's answer never came may be at `provider`
    already: it stays, unless `provider` can confirm it has no such request (`has_request`). Returns how
    many rows moved."""
    s = rt.settings
    fallback = next((f for f in s.failover_table.get(provider, ())
                     if f in s.providers_in_use and not (breakers.get(f) and breakers[f].open)), None)
    if fallback is None:
        return 0
    _confirm_not_taken(rt, provider)
    moved = store.reroute_waiting(rt.engine, provider, fallback, FAILOVER_BATCH)
    if moved:
        log.info("failover: %d waiting rows of %s moved to %s", len(moved), provider, fallback)
        _alert_once(rt, f"failover:{provider}", "ALERT: %s unavailable (%s): its waiting rows go through %s "
                    "until a probe gets through", provider, breakers[provider].reason, fallback)
    return len(moved)


def _confirm_not_taken(rt: Runtime, provider: str) -> None:
    """Ask `provider`, where it can tell (Mobilgroup's status request), whether it has the rows whose answer
    never came; those it has not may then move. Stops at the first question it cannot answer."""
    if time.monotonic() - rt.confirm_asked.get(provider, -math.inf) < CONFIRM_EVERY_S:
        return
    try:
        client = rt.client(provider)
    except ValueError:  # no longer configured: it cannot be asked
        return
    if not hasattr(client, "has_request"):
        return
    rt.confirm_asked[provider] = time.monotonic()
    known = rt.taken_rows
    for row in store.in_doubt(rt.engine, provider, CONFIRM_PER_TICK + len(known)):
        if row.id in known:
            continue
        try:
            has = client.has_request(mobilgroup_request_id(rt.settings, row.id, row.resends))
        except ProviderError:
            return
        if has:
            known.add(row.id)
        elif store.not_taken(rt.engine, row.id, row.token):
            log.info("failover: %s confirms it never got row %d: it may move", provider, row.id)


def _route(rt: Runtime, claimed: list[store.Claimed]) -> dict[str, list[int]]:
    """Refuse invalid numbers and expired rows at once, record each other row's provider and normalised
    number (they then wait for their provider's room). Returns the routed row ids by provider."""
    s = rt.settings
    routes: dict[int, tuple[str, str]] = {}
    for row in claimed:
        if row.overdue_s > s.max_age_s:
            store.finish_failed(rt.engine, row.id, f"expired: due {row.due_at:%Y-%m-%d %H:%M}, more than "
                                                   f"{_duration(s.max_age_s)} ago (SMS_MAX_AGE_S)")
            continue
        try:
            recipient = normalise(row.target, s)
        except InvalidNumber as exc:
            store.finish_failed(rt.engine, row.id, str(exc))
            continue
        routes[row.id] = (route(recipient, s), recipient)
    store.assign_routes(rt.engine, routes)
    by_provider: dict[str, list[int]] = {}
    for row_id, (provider, _) in routes.items():
        by_provider.setdefault(provider, []).append(row_id)
    return by_provider


def release(rt: Runtime, provider: str, enqueue: Enqueue, breaker: store.BreakerState | None) -> None:
    """One provider's part of a tick: settle sends whose lease ran out, enqueue again queued rows whose task
    was lost, and put waiting rows that are due in the broker, up to the provider's room. While its account
    circuit is open, only its one probe goes, once the pause is over; rows that waited through pauses
    longer than `SMS_ACCOUNT_RETRY_WINDOW_S` end `error`."""
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
        _alert_once(rt, f"queue:{provider}", "ALERT: %s: rows have waited %d s in queue send.%s and no worker "
                    "takes them: start a worker for that queue", provider, load.oldest_queued_s, provider)
    if breaker is not None and breaker.open:
        gave_up = store.end_waiting(engine, provider, s.account_retry_window_s,
                                    f"{provider} account problem: {breaker.reason} (gave up after waiting "
                                    f"{_duration(s.account_retry_window_s)}, SMS_ACCOUNT_RETRY_WINDOW_S)")
        if gave_up:
            log.error("ALERT: %s: %d rows ended as error after waiting through the account problem", provider, gave_up)
        fresh = []
        if breaker.open_for_s == 0 and not breaker.probing and store.take_probe(engine, provider, s.send_lease_s):
            fresh = store.release_waiting(engine, provider, 1, s.lost_task_s, probe=True)
            if fresh:
                log.warning("%s account paused (%s): sending one probe (row %d)", provider, breaker.reason, fresh[0])
            else:
                store.drop_probe(engine, provider)
    else:
        fresh = store.release_waiting(engine, provider, room - load.inflight, s.lost_task_s)
    if again:
        log.warning("%s: %d queued rows had no task started within %d s (broker restarted, or the worker "
                    "holding them died); enqueued again", provider, len(again), s.lost_task_s)
    if again or fresh:
        enqueue(again + fresh, provider)


def _log_tick(rt: Runtime, claimed: int, summary: dict[str, dict[str, int]],
              breakers: dict[str, store.BreakerState]) -> None:
    """One INFO line per provider that had rows open at the start of the tick: in flight, waiting and why,
    its account circuit."""
    if claimed:
        log.info("dispatch: claimed %d rows", claimed)
    for provider, counts in sorted(summary.items()):
        breaker = breakers.get(provider)
        circuit = "closed" if breaker is None or not breaker.open else (
            f"open ({breaker.reason}; probe {'under way' if breaker.probing else f'in {breaker.open_for_s} s'})")
        inflight = counts.get("queued", 0) + counts.get("sending", 0)
        waiting = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())
                            if reason not in ("queued", "sending")) or "none"
        log.info("dispatch: %s: in flight %d of %d, waiting: %s; account circuit %s", provider, inflight,
                 rt.settings.max_inflight(provider) if provider in rt.settings.providers_in_use else 0,
                 waiting, circuit)


def _alert_once(rt: Runtime, key: str, message: str, *args) -> None:
    """Log an `ALERT:` line at most every `ALERT_EVERY_S` per `key` in this process."""
    if time.monotonic() - rt.alerted.get(key, -math.inf) >= ALERT_EVERY_S:
        rt.alerted[key] = time.monotonic()
        log.error(message, *args)


def _duration(seconds: float) -> str:
    if seconds >= 86_400 and seconds % 3600 == 0:
        return f"{seconds / 86_400:g} days" if seconds % 86_400 == 0 else f"{seconds / 3600:g} h"
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


# --- send -----------------------------------------------------------------------------------------

def send(rt: Runtime, row_id: int, owner: str | None = None) -> str | Retry:
    """Send one queued row. Returns what happened (`skipped`, `accepted`, `failed`, `error`, or the reason
    it waits again), or a `Retry` when the database could not be reached.

    A row not queued (a duplicate, redelivered or stale task) is `skipped` without side effects. `owner`
    (the task's id) may take the row's lease again, should the database's answer to its first try be lost."""
    s = rt.settings
    try:
        job = store.begin_send(rt.engine, row_id, s.send_lease_s, owner)
    except (DBAPIError, OperationalError) as exc:
        # Nothing was sent yet, so trying again is safe; the task stays in this worker, not the broker.
        if not isinstance(exc, OperationalError) and not exc.connection_invalidated:
            raise
        return Retry(RECONNECT_RETRY_S, f"the database could not be reached ({type(exc.orig).__name__}); "
                                        "trying again")
    if job is None:
        return "skipped"
    leased_at = time.monotonic()
    if rt.stopping.is_set():
        return _hand_back(rt, job, "the worker was stopping before it could send")
    try:
        provider = rt.client(job.provider)
    except ValueError as exc:  # routed before the operator removed or broke this provider's settings
        return _account_problem(rt, job, AccountError(f"{job.provider} is not configured: {exc}"))
    if job.text is None or not job.text.strip():
        why = "the message text is missing" if job.text is None else "the message text is empty"
        _finish_failed(rt, job, why)
        return "failed"
    callback = None
    if job.provider in REPORTING_BY_CALLBACK:
        from tasks.callbacks import callback_url

        callback = callback_url(s, job.provider, row_id, job.resends)
    reference = mobilgroup_request_id(s, row_id, job.resends) if job.provider == "mobilgroup" else row_id
    message = OutgoingMessage(reference=reference, recipient=job.recipient, text=job.text, callback_url=callback)
    try:
        parts = provider.check(message)
    except PermanentError as exc:
        _finish_failed(rt, job, str(exc))
        return "failed"

    breaker = rt.breaker(job.provider)
    if breaker is not None and breaker.open and not job.probe:
        # Sent to the broker before the circuit opened: it waits with the others, it does not hit the provider.
        return _wait(rt, job, max(breaker.open_for_s, 1), f"{job.provider} account paused: {breaker.reason}",
                     W.PAUSED, account=True)

    with rt.provider_call(job.provider) as got_thread:
        if not got_thread:
            _unsent(rt, job)
            return _wait(rt, job, BUSY_RETRY_S, f"every thread this worker gives {job.provider} is in a call",
                         W.BUSY)
        def no_send() -> str | None:
            """Why this send must not start after all (nothing has left yet), or None."""
            if rt.stopping.is_set():
                return "the worker was stopping before it could send"
            if time.monotonic() - leased_at + s.http_timeout_s + LEASE_MARGIN_S > s.send_lease_s:
                return "its lease would run out before the provider's deadline"
            return None

        waited = _wait_for_slot(rt, job.provider, message, parts, unless=lambda: no_send() is not None)
        if waited is WITHDRAWN or no_send():
            return _hand_back(rt, job, no_send() or "it gave its rate-limit slot back")
        if isinstance(waited, Retry):
            _unsent(rt, job)
            return _wait(rt, job, waited.delay_s, waited.reason, W.THROTTLED)
        try:
            accepted = provider.send(message)
        except PermanentError as exc:
            if job.probe:
                _account_works(rt, job.provider)
            _reached(rt, job.provider)
            _finish_failed(rt, job, str(exc))
            return "failed"
        except ThrottledError as exc:
            return _wait(rt, job, exc.retry_after, f"{job.provider} asked to slow down: {exc}", W.THROTTLED)
        except AccountError as exc:
            return _account_problem(rt, job, exc)
        except PartlySent as exc:
            _finish_error(rt, job, f"{job.provider}: {exc}", unknown=True)
            return "error"
        except UnknownOutcome as exc:
            return _unknown_outcome(rt, job, exc)
        except ProviderError as exc:  # TransientError and anything a client did not classify more precisely
            return _transient_problem(rt, job, exc)
        except Exception as exc:  # a bug must not leave the row stuck or lose it: its outcome is unknown
            log.exception("send of row %d: unexpected %s", row_id, type(exc).__name__)
            return _unknown_outcome(rt, job, UnknownOutcome(f"internal error ({type(exc).__name__})"))

    if job.probe:
        _account_works(rt, job.provider)
    _reached(rt, job.provider)
    poll_after = s.poll_after_s() if job.provider == "mobilgroup" else None
    ids = (accepted.provider_message_id or "").split(",") if accepted.provider_message_id else []
    recorded = _through_outage(lambda: store.record_accepted(rt.engine, row_id, job.token, ids, accepted.parts,
                                                             poll_after, provider=job.provider,
                                                             index_ids=accepted.reports_by_id),
                               row_id, s.send_lease_s / 2, "an accepted send")
    if not recorded:
        log.warning("send of row %d: accepted by %s after its lease was taken over; the current holder decides "
                    "the row", row_id, job.provider)
    if accepted.already_sent:
        log.info("send of row %d: %s already had it (an earlier attempt arrived)", row_id, job.provider)
    return "accepted"


def _through_outage(write: Callable[[], bool], row_id: int, within_s: float, what: str):
    """Run `write`, a record of what became of a send, retrying through a database outage for up to
    `within_s`: a send whose outcome stays unwritten keeps its lease, and when the lease runs out it is
    taken for an unknown outcome (the provider may have the message) and, by policy, sent again; one given
    back unsent would wait out the lease for nothing."""
    deadline = time.monotonic() + within_s
    delay = 0.5
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("row %d: %s could not be recorded (%s); trying again in %.1f s",
                        row_id, what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def mobilgroup_request_id(s, row_id: int, resends: int) -> int:
    """Mobilgroup refuses a second request with the same `id` (error 7), which is how a retry after a lost
    answer is recognised; an operator's resend must therefore go under a new id, and a second deployment on
    the same account under ids of its own (`SMS_MOBILGROUP_ID_PREFIX`)."""
    prefix = int(s.mobilgroup_id_prefix) if s.mobilgroup_id_prefix else 0
    return prefix * MOBILGROUP_PREFIX_STRIDE + row_id + resends * RESEND_STRIDE


WITHDRAWN = object()
"""`_wait_for_slot`'s answer when its `unless` held on waking: the slot was given back, nothing may be sent."""


def _wait_for_slot(rt: Runtime, provider: str, message: OutgoingMessage, parts: int, *,
                   unless: Callable[[], bool] | None = None) -> Retry | object | None:
    """Take a slot from the fleet-wide rate limit and the identical-request rule, sleeping briefly when
    the slot is near; a far slot becomes a `Retry` (the row then waits in the database). Its reason (logged,
    and the row's `last_error`) says how long, why, and how many sends of the provider were throttled so far.
    `WITHDRAWN` when `unless()` holds as the slot comes: the slot and its identical-request mark are given back."""
    from tasks.throttle import ThrottleUnavailable, identity_of

    # No provider sends the comment after the separator (smsc.ru strips it, the others never get it): the
    # request compared is the text before it.
    text_sent = message.text.partition(COMMENT_SEPARATOR)[0]
    account = rt.account(provider)
    try:
        permit = rt.throttle.acquire(
            account, rt.rate(provider), cost=parts,
            identity=identity_of(message.recipient, text_sent, rt.identity_key(provider)),
            identical_s=rt.identical_s(provider), max_wait_s=THROTTLE_MAX_WAIT_S,
        ).wait(unless=unless)
    except ThrottleUnavailable as exc:
        log.warning("send of row %d waits: the rate limiter is unavailable (%s)", message.reference, exc)
        return Retry(THROTTLE_DOWN_RETRY_S, f"rate limiter unavailable: {exc}")
    if permit.reserved:
        return None
    if permit.reason == "withdrawn":
        return WITHDRAWN
    reason = {
        "identical": f"identical message to this recipient sent less than {rt.identical_s(provider):g} s ago",
        "paused": f"{provider} account paused after an account error",
        "late": f"this worker woke too late for its {provider} slots (host overloaded)",
    }.get(permit.reason, f"{provider} rate limit of {rt.rate(provider):g}/s")
    try:
        throttled = f"{rt.throttle.throttled_count(account)} {provider} sends throttled so far"
    except ThrottleUnavailable:  # only the figure is lost; the wait itself was decided
        throttled = f"{provider} throttled count unavailable"
    log.info("send of row %d throttled for %.1f s: %s (%s)", message.reference, permit.wait_s, reason, throttled)
    return Retry(max(permit.wait_s, 0.05), f"waiting {permit.wait_s:.1f} s: {reason} ({throttled})")


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: about base·2^(failures-1), capped, scattered over its upper half
    so that a burst of failures does not come back as a burst of retries."""
    ceiling = min(max_s, base_s * 2 ** max(failures - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def _wait(rt: Runtime, job: store.SendJob, delay_s: float, reason: str, wait_reason: str, *,
          account: bool = False, failed: bool = False, unknown: bool = False) -> str:
    """Put the row back to wait `delay_s` in the database, or end it `error` if that would take it past its
    window (`SMS_ACCOUNT_RETRY_WINDOW_S` for account problems, else `SMS_RETRY_WINDOW_S`, counted from the
    claim). Returns the wait reason, or `error`."""
    s = rt.settings
    window = s.account_retry_window_s if account else s.retry_window_s
    if job.age_s + delay_s > window:
        tries = job.failures + (1 if failed else 0)
        _finish_error(rt, job, f"{reason} (gave up after {tries} failed attempts in {_duration(job.age_s)})"
                      if tries else f"{reason} (gave up after waiting {_duration(job.age_s)})", unknown=unknown)
        return "error"
    _through_outage(lambda: store.wait_again(rt.engine, job.id, job.token, delay_s, reason, wait_reason,
                                             failed=failed, unknown=unknown),
                    job.id, rt.settings.send_lease_s / 2, "a wait")
    return wait_reason


def _finish_error(rt: Runtime, job: store.SendJob, reason: str, *, unknown: bool = False) -> None:
    _through_outage(lambda: store.finish_error(rt.engine, job.id, reason, token=job.token, unknown=unknown),
                    job.id, rt.settings.send_lease_s / 2, "an error")


def _finish_failed(rt: Runtime, job: store.SendJob, reason: str) -> None:
    _through_outage(lambda: store.finish_failed(rt.engine, job.id, reason, token=job.token),
                    job.id, rt.settings.send_lease_s / 2, "a refusal")


def _unsent(rt: Runtime, job: store.SendJob) -> None:
    """The probe of a paused account went back unsent (a rate-limit slot, no thread free): the next tick
    may send another, rather than waiting out this one's lease."""
    if job.probe:
        store.drop_probe(rt.engine, job.provider)


def _hand_back(rt: Runtime, job: store.SendJob, reason: str) -> str:
    """Nothing was sent: the row waits to be released again at once (to another worker, or this one)."""
    _unsent(rt, job)
    _through_outage(lambda: store.wait_again(rt.engine, job.id, job.token, 0, reason, W.BUSY),
                    job.id, rt.settings.send_lease_s / 2, "a row given back")
    return "handed back"


def _transient_problem(rt: Runtime, job: store.SendJob, exc: ProviderError) -> str:
    s = rt.settings
    _failed_on_the_way(rt, job, exc)
    delay = backoff_s(job.failures + 1, s.retry_base_s, s.retry_max_s)
    return _wait(rt, job, delay, str(exc), W.RETRY, failed=True)


def _unknown_outcome(rt: Runtime, job: store.SendJob, exc: UnknownOutcome) -> str:
    """The request left and no answer came. Sent again where the provider makes a repeat harmless
    (Mobilgroup refuses a repeated id) or where `SMS_<PROVIDER>_ON_UNKNOWN=resend`; else `error`."""
    s = rt.settings
    log.warning("send of row %d: outcome unknown at %s (%s)", job.id, job.provider, exc)
    _failed_on_the_way(rt, job, exc)
    if not s.resends_unknown(job.provider):
        _finish_error(rt, job, f"{job.provider} may or may not have this message: {exc} "
                               f"(SMS_{job.provider.upper()}_ON_UNKNOWN=error)", unknown=True)
        return "error"
    delay = backoff_s(job.failures + 1, s.retry_base_s, s.retry_max_s)
    return _wait(rt, job, delay, f"no answer from {job.provider}, sending again: {exc}", W.UNKNOWN,
                 failed=True, unknown=True)


def _failed_on_the_way(rt: Runtime, job: store.SendJob, exc: ProviderError) -> None:
    """A send of a provider with a failover route failed on the way there (refused, timeout, 5xx): its
    failure streak goes on, and once every send has failed for `SMS_FAILOVER_AFTER_S` its circuit opens (its
    rows then go to the fallback). A probe that fails so keeps the circuit open for another pause."""
    s, provider = rt.settings, job.provider
    if job.probe:
        store.trip_breaker(rt.engine, provider, s.account_retry_s, f"unreachable: {exc}")
        log.error("ALERT: %s still unreachable (the probe failed), paused again for %.0f s: %s",
                  provider, s.account_retry_s, exc)
        rt.forget_breakers()
        return
    if provider not in s.failover_table:
        return
    store.note_failure(rt.engine, provider)
    breaker = rt.breaker(provider)
    if breaker is None or breaker.open or (breaker.failing_for_s or 0) < s.failover_after_s:
        return
    if store.trip_if_failing(rt.engine, provider, s.failover_after_s, s.account_retry_s, f"unreachable: {exc}"):
        log.error("ALERT: %s unavailable: every send failed for %.0f s (SMS_FAILOVER_AFTER_S), the last: %s; its "
                  "rows go through %s, and one probe tests it every %.0f s", provider, s.failover_after_s, exc,
                  " or ".join(s.failover_table[provider]), s.account_retry_s)
    rt.forget_breakers()


def _account_problem(rt: Runtime, job: store.SendJob, exc: AccountError) -> str:
    """An account error opens the provider's circuit: its rows wait, one probe tests it after
    `SMS_ACCOUNT_RETRY_S`. An error that could be about this one message (`by_nature=False`) ends only this
    message as `failed`, until `SUSPECT_ROWS` different messages met it."""
    s = rt.settings
    reason = f"{job.provider} account problem: {exc}"
    if not exc.by_nature and store.recent_refusals(rt.engine, job.provider, str(exc), SUSPECT_WITHIN_S) + 1 < SUSPECT_ROWS:
        if job.probe:
            _account_works(rt, job.provider)
        _finish_failed(rt, job, str(exc))
        return "failed"
    if store.trip_breaker(rt.engine, job.provider, s.account_retry_s, str(exc)):
        log.error("ALERT: %s account problem, sending paused for %.0f s, then one probe: %s",
                  job.provider, s.account_retry_s, exc)
    elif job.probe:
        log.error("ALERT: %s account still refused by the probe, paused again for %.0f s: %s",
                  job.provider, s.account_retry_s, exc)
    rt.forget_breakers()
    return _wait(rt, job, s.account_retry_s, reason, W.PAUSED, account=True, failed=True)


def _account_works(rt: Runtime, provider: str) -> None:
    if store.close_breaker(rt.engine, provider):
        log.error("ALERT: %s works again (the probe went through): sending resumes%s", provider,
                  "; new rows go to it again" if provider in rt.settings.failover_table else "")
    rt.forget_breakers()


def _reached(rt: Runtime, provider: str) -> None:
    """A send reached `provider` and was answered: a failure streak, if one is under way, is over (no write
    otherwise)."""
    breaker = rt.breaker(provider)
    if breaker is not None and breaker.failing_for_s is not None:
        store.end_failure_streak(rt.engine, provider)
        rt.forget_breakers()


# --- Mobilgroup status polling --------------------------------------------------------------------

POLL_LEASE_S = 300


def claim_polls(rt: Runtime, limit: int = 500) -> list[int]:
    """Mobilgroup rows whose lifetime has expired and whose status is due to be asked: none while its
    account circuit is open, and no more per run than its rate allows in half a run's period (the polls
    share the account's rate limit with the sends)."""
    breaker = store.breaker_states(rt.engine).get("mobilgroup")
    if breaker is not None and breaker.open:
        return []
    s = rt.settings
    limit = min(limit, max(1, int(s.mobilgroup_rate * s.mobilgroup_poll_interval_s / 2)))
    return store.claim_due_polls(rt.engine, "mobilgroup", limit, POLL_LEASE_S)


def poll(rt: Runtime, row_id: int) -> str:
    """Ask Mobilgroup once for a row's status and apply the answer; an open status is asked again later
    (`SMS_MOBILGROUP_POLL_RETRY_S`, at most `SMS_MOBILGROUP_POLL_MAX` times)."""
    s = rt.settings
    client = rt.client("mobilgroup")
    resends = store.resends_of(rt.engine, row_id)
    from tasks.throttle import ThrottleUnavailable

    try:
        with waiting():
            permit = rt.throttle.acquire(rt.account("mobilgroup"), rt.rate("mobilgroup"),
                                         max_wait_s=THROTTLE_MAX_WAIT_S).wait()
    except ThrottleUnavailable:
        permit = None
    if permit is None or not permit.reserved:  # asked again when the poll's lease ends (`POLL_LEASE_S`)
        return "throttled"
    try:
        with waiting():
            answer = client.status(mobilgroup_request_id(s, row_id, resends))
        report = replace(answer, reference=row_id, resends=resends)
    except PermanentError as exc:
        # The status request itself was refused (no request with this id, a request it cannot read): that
        # says nothing about delivery, so asterCC keeps `success`, and asking again would get the same.
        log.warning("status poll of row %d refused, no more polls: %s", row_id, exc)
        store.stop_polling(rt.engine, row_id, f"status unknown: {exc}")
        return "unconfirmed"
    except AccountError as exc:
        if store.trip_breaker(rt.engine, "mobilgroup", s.account_retry_s, str(exc)):
            log.error("ALERT: mobilgroup account problem (status poll), paused for %.0f s: %s", s.account_retry_s, exc)
        store.poll_again(rt.engine, row_id, int(s.account_retry_s), s.mobilgroup_poll_max)
        return "retry"
    except ProviderError as exc:
        log.warning("status poll of row %d failed, asking again later: %s", row_id, exc)
        store.poll_again(rt.engine, row_id, int(min(s.mobilgroup_poll_retry_s, s.retry_max_s)), s.mobilgroup_poll_max)
        return "retry"
    if report.outcome == "accepted":
        more = store.poll_again(rt.engine, row_id, s.mobilgroup_poll_retry_s, s.mobilgroup_poll_max)
        return "open" if more else "unconfirmed"
    return apply_report("mobilgroup", report, rt)


# --- self-healing ---------------------------------------------------------------------------------

def reap(rt: Runtime, limit: int = 1000) -> int:
    """Route rows whose dispatch was interrupted between claiming and routing them (the next tick releases
    them), close rows whose report never came, and prune our records of rows final for longer than
    `SMS_RETENTION_DAYS`. Returns how many rows were routed."""
    s = rt.settings
    unrouted = store.find_unrouted(rt.engine, UNROUTED_AFTER_S, limit)
    if unrouted:
        log.warning("reaper: %d claimed rows were never routed (their dispatch was interrupted); routing them now",
                    len(unrouted))
    routed = sum(map(len, _route(rt, unrouted).values())) if unrouted else 0
    expired = store.expire_unreported(rt.engine, s.report_timeout_s)
    if expired:
        log.info("reaper: %d accepted rows got no delivery report in time; left as success", expired)
    pruned = retention.prune(rt.engine, s.retention_days, batch=1000, max_batches=10)
    if pruned:
        log.info("reaper: %d records of rows final for over %d days pruned", pruned, s.retention_days)
    return routed


UNROUTED_AFTER_S = 60
"""A claim routes its rows within the same tick; one whose rows are unrouted this long later died."""
