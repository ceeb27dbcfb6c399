"""The dispatch workflow, without Celery: what a beat tick, a send, a status poll and a sweep do.

The Celery tasks in `tasks.jobs` are thin wrappers over these functions; the functions take a `Runtime`
(settings, DB engine, provider clients, throttle) and return plain values saying what should happen next,
so the whole flow can be read, tested and reasoned about here. The rules it keeps are in
`../shared/DESIGN.md`: row ids only in the broker, no DB connection held across a provider call, the
provider's typed errors decide `failed` / retry / `error`, nothing final is ever overwritten.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Callable

from sqlalchemy.exc import DBAPIError

from db import store
from providers.base import (
    AccountError,
    OutgoingMessage,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
)
from providers.smsc_text import COMMENT_SEPARATOR
from tasks.reports import apply_report
from tasks.routing import InvalidNumber, normalise, route
from tasks.runtime import Runtime

log = logging.getLogger(__name__)

REPORTING_BY_CALLBACK = ("accolades", "ozeki")
RESEND_STRIDE = 10**10
"""Above any asterCC row id (`int(11)`): the n-th resend of row r goes to Mobilgroup as r + n·10^10."""
THROTTLE_MAX_WAIT_S = 2.0
THROTTLE_DOWN_RETRY_S = 10.0
RECONNECT_RETRY_S = 2.0
"""A send that found its database connection dead (a MariaDB restart) runs again this much later, on a
fresh connection, instead of failing its task and waiting for the reaper."""


@dataclass(frozen=True)
class Retry:
    """Run the send again after `delay_s`; `reason` is shown as the retry reason in Flower and logs."""

    delay_s: float
    reason: str


Enqueue = Callable[[list[int], str], None]
"""Puts send tasks for these row ids on the provider's queue."""


# --- dispatch -------------------------------------------------------------------------------------

def dispatch_due(rt: Runtime, enqueue: Enqueue, budget_s: float | None = None) -> int:
    """Claim due rows batch by batch (until none are left, `budget_s` is spent or too many are in
    flight), refuse invalid numbers at once, route the rest and enqueue one send per row.
    Returns how many rows were claimed."""
    s = rt.settings
    deadline = time.monotonic() + (budget_s if budget_s is not None else s.dispatch_interval_s)
    total = 0
    while True:
        inflight = store.count_inflight(rt.engine)
        room = min(s.dispatch_batch, s.dispatch_max_inflight - inflight)
        if room <= 0:
            log.info("dispatch: %d messages in flight, claiming no more this tick", inflight)
            break
        claimed = store.claim_due(rt.engine, room)
        total += len(claimed)
        by_provider = _route_and_enqueue(rt, claimed, enqueue)
        if claimed:
            log.info("dispatch: claimed %d rows (%s)", len(claimed),
                     ", ".join(f"{p}={len(i)}" for p, i in sorted(by_provider.items())) or "all invalid")
        if len(claimed) < room or time.monotonic() >= deadline:
            break
    return total


def _route_and_enqueue(rt: Runtime, claimed: list[store.Claimed], enqueue: Enqueue) -> dict[str, list[int]]:
    """Refuse invalid numbers at once, record each other row's provider and normalised number, enqueue
    one send per row. Returns the row ids enqueued, by provider."""
    routes: dict[int, tuple[str, str]] = {}
    for row in claimed:
        try:
            recipient = normalise(row.target, rt.settings.default_region)
        except InvalidNumber as exc:
            store.finish_failed(rt.engine, row.id, str(exc))
            continue
        routes[row.id] = (route(recipient, rt.settings), recipient)
    store.assign_routes(rt.engine, routes)
    by_provider: dict[str, list[int]] = {}
    for row_id, (provider, _) in routes.items():
        by_provider.setdefault(provider, []).append(row_id)
    for provider, ids in by_provider.items():
        enqueue(ids, provider)
    return by_provider


# --- send -----------------------------------------------------------------------------------------

def send(rt: Runtime, row_id: int) -> str | Retry:
    """Send one row. Returns what happened (`skipped`, `accepted`, `failed`, `error`) or a `Retry`.

    A row not in a sendable state (a duplicate or redelivered task) is `skipped` without side effects; a
    row whose retry is not due yet is retried when it is (the task ran early: workers' clocks differ)."""
    s = rt.settings
    try:
        job = store.begin_send(rt.engine, row_id, s.send_lease_s)
    except DBAPIError as exc:
        # Nothing was sent yet, so trying again is safe. SQLAlchemy has dropped the pool's connections.
        if not exc.connection_invalidated:
            raise
        return Retry(RECONNECT_RETRY_S, "the database connection was lost; trying again on a new one")
    if job is None:
        return "skipped"
    if isinstance(job, store.NotYetDue):
        return Retry(job.in_s, "the retry is not due yet by the database's clock (this worker's runs ahead)")
    try:
        provider = rt.client(job.provider)
    except ValueError as exc:  # routed before the operator removed or broke this provider's settings
        return _account_problem(rt, job, AccountError(f"{job.provider} is not configured: {exc}"))
    if job.text is None or not job.text.strip():
        why = "the message text is missing" if job.text is None else "the message text is empty"
        store.finish_failed(rt.engine, row_id, why)
        return "failed"
    callback = None
    if job.provider in REPORTING_BY_CALLBACK:
        from tasks.callbacks import callback_url

        callback = callback_url(s, job.provider, row_id, job.resends)
    reference = mobilgroup_request_id(row_id, job.resends) if job.provider == "mobilgroup" else row_id
    message = OutgoingMessage(reference=reference, recipient=job.recipient, text=job.text, callback_url=callback)
    try:
        parts = provider.check(message)
    except PermanentError as exc:
        store.finish_failed(rt.engine, row_id, str(exc))
        return "failed"

    waited = _wait_for_slot(rt, job.provider, message, parts)
    if isinstance(waited, Retry):
        store.schedule_retry(rt.engine, row_id, waited.delay_s, waited.reason, count_attempt=False)
        return waited

    try:
        accepted = provider.send(message)
    except PermanentError as exc:
        store.finish_failed(rt.engine, row_id, str(exc))
        return "failed"
    except ThrottledError as exc:
        reason = f"{job.provider} asked to slow down: {exc}"
        store.schedule_retry(rt.engine, row_id, exc.retry_after, reason, count_attempt=False)
        return Retry(exc.retry_after, reason)
    except AccountError as exc:
        return _account_problem(rt, job, exc)
    except ProviderError as exc:  # TransientError and anything a client did not classify more precisely
        return _transient_problem(rt, job, exc)
    except Exception as exc:  # a bug must not leave the row stuck or lose it: retry like a transient error
        log.exception("send of row %d: unexpected %s", row_id, type(exc).__name__)
        return _transient_problem(rt, job, TransientError(f"internal error ({type(exc).__name__})"))

    poll_after = s.poll_after_s() if job.provider == "mobilgroup" else None
    ids = (accepted.provider_message_id or "").split(",") if accepted.provider_message_id else []
    _until_recorded(lambda: store.record_accepted(rt.engine, row_id, ids, accepted.parts, poll_after,
                                                  provider=job.provider, index_ids=accepted.reports_by_id),
                    row_id, s.send_lease_s / 2)
    if accepted.already_sent:
        log.info("send of row %d: %s already had it (an earlier attempt arrived)", row_id, job.provider)
    return "accepted"


def _until_recorded(record: Callable[[], None], row_id: int, within_s: float) -> None:
    """Write an accepted send down, retrying through a database hiccup for up to `within_s`: once the
    provider has the message, an unrecorded send would be taken for a lost one when its lease runs out and
    sent again (harmless for Mobilgroup, which refuses the repeat; a double SMS for the others)."""
    deadline = time.monotonic() + within_s
    delay = 0.5
    while True:
        try:
            return record()
        except DBAPIError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("row %d was accepted but could not be recorded (%s); trying again in %.1f s",
                        row_id, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def mobilgroup_request_id(row_id: int, resends: int) -> int:
    """Mobilgroup refuses a second request with the same `id` (error 7), which is how a retry after a lost
    answer is recognised; an operator's resend must therefore go under a new id."""
    return row_id + resends * RESEND_STRIDE


def _wait_for_slot(rt: Runtime, provider: str, message: OutgoingMessage, parts: int) -> Retry | None:
    """Take a slot from the fleet-wide rate limit and the identical-request rule, sleeping briefly when
    the slot is near; a far slot becomes a `Retry` so the task gives its worker slot back. Its reason (logged,
    and Flower's retry reason) says how long, why, and how many sends of the provider were throttled so far."""
    from tasks.throttle import ThrottleUnavailable, identity_of

    # smsc.ru strips the comment after the separator: the request it compares is the text before it.
    text_sent = message.text.partition(COMMENT_SEPARATOR)[0] if provider == "smsc" else message.text
    account = rt.account(provider)
    try:
        permit = rt.throttle.acquire(
            account, rt.rate(provider), cost=parts,
            identity=identity_of(message.recipient, text_sent, rt.identity_key(provider)),
            identical_s=rt.identical_s(provider), max_wait_s=THROTTLE_MAX_WAIT_S,
        ).wait()
    except ThrottleUnavailable as exc:
        log.warning("send of row %d waits: the rate limiter is unavailable (%s)", message.reference, exc)
        return Retry(THROTTLE_DOWN_RETRY_S, f"rate limiter unavailable: {exc}")
    if permit.reserved:
        return None
    reason = {
        "identical": f"identical message to this recipient sent less than {rt.identical_s(provider):g} s ago",
        "paused": f"{provider} account paused after an account error",
    }.get(permit.reason, f"{provider} rate limit of {rt.rate(provider):g}/s")
    try:
        throttled = f"{rt.throttle.throttled_count(account)} {provider} sends throttled so far"
    except ThrottleUnavailable:  # only the figure is lost; the wait itself was decided
        throttled = f"{provider} throttled count unavailable"
    log.info("send of row %d throttled for %.1f s: %s (%s)", message.reference, permit.wait_s, reason, throttled)
    return Retry(max(permit.wait_s, 0.05), f"waiting {permit.wait_s:.1f} s: {reason} ({throttled})")


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: about base·2^(attempts-1), capped, scattered over its upper half
    so that a burst of failures does not come back as a burst of retries."""
    ceiling = min(max_s, base_s * 2 ** max(attempts - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def _transient_problem(rt: Runtime, job: store.SendJob, exc: ProviderError) -> str | Retry:
    s = rt.settings
    delay = backoff_s(job.attempts, s.retry_base_s, s.retry_max_s)
    if job.age_s + delay > s.retry_window_s:
        store.finish_error(rt.engine, job.id, f"{exc} (gave up after {job.attempts} attempts)")
        return "error"
    reason = f"attempt {job.attempts} failed: {exc}"
    store.schedule_retry(rt.engine, job.id, delay, reason, count_attempt=True)
    return Retry(delay, reason)


def _account_problem(rt: Runtime, job: store.SendJob, exc: AccountError) -> str | Retry:
    s = rt.settings
    if job.age_s + s.account_retry_s > s.account_retry_window_s:
        store.finish_error(rt.engine, job.id, f"{job.provider} account problem: {exc} "
                                              f"(gave up after {job.attempts} attempts)")
        return "error"
    try:
        rt.throttle.pause(rt.account(job.provider), s.account_retry_s)
    except Exception as pause_exc:  # the retry below still slows this message down
        log.warning("could not pause the %s account: %s", job.provider, pause_exc)
    log.error("ALERT: %s account problem, sending paused for %.0f s: %s", job.provider, s.account_retry_s, exc)
    reason = f"{job.provider} account problem: {exc}"
    store.schedule_retry(rt.engine, job.id, s.account_retry_s, reason, count_attempt=True)
    return Retry(s.account_retry_s, reason)


# --- Mobilgroup status polling --------------------------------------------------------------------

POLL_LEASE_S = 300


def claim_polls(rt: Runtime, limit: int = 500) -> list[int]:
    """Mobilgroup rows whose lifetime has expired and whose status is due to be asked."""
    return store.claim_due_polls(rt.engine, "mobilgroup", limit, POLL_LEASE_S)


def poll(rt: Runtime, row_id: int) -> str:
    """Ask Mobilgroup once for a row's status and apply the answer; an open status is asked again later
    (`SMS_MOBILGROUP_POLL_RETRY_S`, at most `SMS_MOBILGROUP_POLL_MAX` times)."""
    s = rt.settings
    client = rt.client("mobilgroup")
    resends = store.resends_of(rt.engine, row_id)
    try:
        answer = client.status(mobilgroup_request_id(row_id, resends))
        report = replace(answer, reference=row_id, resends=resends)
    except PermanentError as exc:
        # The status request itself was refused (no request with this id, a request it cannot read): that
        # says nothing about delivery, so asterCC keeps `success`, and asking again would get the same.
        log.warning("status poll of row %d refused, no more polls: %s", row_id, exc)
        store.stop_polling(rt.engine, row_id, f"status unknown: {exc}")
        return "unconfirmed"
    except ProviderError as exc:
        log.warning("status poll of row %d failed, asking again later: %s", row_id, exc)
        store.poll_again(rt.engine, row_id, int(min(s.mobilgroup_poll_retry_s, s.retry_max_s)), s.mobilgroup_poll_max)
        return "retry"
    if report.outcome == "accepted":
        more = store.poll_again(rt.engine, row_id, s.mobilgroup_poll_retry_s, s.mobilgroup_poll_max)
        return "open" if more else "unconfirmed"
    return apply_report("mobilgroup", report, rt)


# --- self-healing ---------------------------------------------------------------------------------

def reap(rt: Runtime, enqueue: Enqueue, limit: int = 1000) -> int:
    """Route rows whose dispatch was interrupted between claiming and routing them, re-enqueue rows whose
    task was lost (broker, killed worker) and close rows whose report never came. Returns how many rows
    were enqueued again."""
    s = rt.settings
    unrouted = store.find_unrouted(rt.engine, s.requeue_after_s, limit)
    rerouted = 0
    if unrouted:
        log.warning("reaper: %d claimed rows were never routed (their dispatch was interrupted); routing them now",
                    len(unrouted))
        rerouted = sum(map(len, _route_and_enqueue(rt, unrouted, enqueue).values()))
    stuck = store.find_stuck(rt.engine, s.requeue_after_s, limit)
    by_provider: dict[str, list[int]] = {}
    for row_id, provider in stuck:
        by_provider.setdefault(provider, []).append(row_id)
    for provider, ids in by_provider.items():
        log.warning("reaper: %d %s rows had no live send task; enqueued again", len(ids), provider)
        enqueue(ids, provider)
    expired = store.expire_unreported(rt.engine, s.report_timeout_s)
    if expired:
        log.info("reaper: %d accepted rows got no delivery report in time; left as success", expired)
    return rerouted + len(stuck)
