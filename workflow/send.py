"""One send (`sms.send`): take the row's lease, check the message, wait for a rate-limit slot, call the
provider with no database connection held, and record what came of it.

A send holds its lease under a fencing token: what it writes after losing the lease changes nothing. The
provider's typed errors decide: `failed` (this message cannot go), wait and retry (transient, throttled),
the account's circuit (account errors), or an unknown outcome (the request left, no answer came).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy.exc import DBAPIError, OperationalError

from db import store
from db.models import DispatchState as S, WaitReason as W
from providers import registry
from providers.base import (
    Accepted,
    AccountError,
    AlreadySentUnconfirmed,
    LoginHeld,
    LoginRefused,
    OutgoingMessage,
    PartlySent,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UnknownOutcome,
)
from providers.smsc_text import COMMENT_SEPARATOR
from workflow import logins
from workflow.callbacks import callback_url
from workflow.campaigns import quiet_left_s
from workflow.runtime import Runtime
from workflow.throttle import ThrottleUnavailable, identity_of
from workflow.wording import duration

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Retry:
    """Run the send again after `delay_s` (the database could not be reached); `reason` is shown as the
    retry reason in Flower and logs."""

    delay_s: float
    reason: str


def send_row(rt: Runtime, row_id: int, owner: str | None = None) -> str | Retry:
    """Send one queued row. Returns what happened (`skipped`, `accepted`, `failed`, `error`, or the reason
    it waits again), or a `Retry` when the database could not be reached.

    A row not queued (a duplicate, redelivered or stale task) is `skipped` without side effects. `owner` is
    this execution of the task (`store.lease_owner`): it takes back a lease an earlier execution of the same
    task may have taken with the database's answer lost (`store.begin_send`)."""
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
    if (held := _campaign_held(rt, job)) is not None:
        return _hand_back(rt, job, held)
    try:
        provider = rt.client(job.provider)
    except ValueError as exc:  # routed before the operator removed or broke this provider's settings
        return _account_problem(rt, job, AccountError(f"{job.provider} is not configured: {exc}"))
    if job.text is None or not job.text.strip():
        why = "the message text is missing" if job.text is None else "the message text is empty"
        _finish_failed(rt, job, why)
        return "failed"
    entry = registry.entry(job.provider)
    callback = (callback_url(s, job.provider, row_id, job.resends, attempt=job.token)
                if entry.reports == "webhook" else None)
    reference = entry.reference(s, row_id, job.resends)
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
            return _wait(rt, job, BUSY_RETRY_S, f"every thread this worker gives {job.provider} is in a call",
                         W.BUSY)
        def no_send() -> str | None:
            """Why this send must not start after all (nothing has left yet), or None."""
            if rt.stopping.is_set():
                return "the worker was stopping before it could send"
            if time.monotonic() - leased_at + s.http_timeout_s + LEASE_MARGIN_S > s.send_lease_s:
                return "its lease would run out before the provider's deadline"
            return None

        def paused() -> tuple[float, str] | None:
            """The circuit (delay, reason) that opened while this send waited for its slot, or None. One
            refusal must not become a burst of them, each counting toward the provider blocking our address."""
            if job.probe:
                return None
            if rt.login_refused_just_now(job.provider):
                # Another send of this process has just met a refused login; its circuit may not be written yet.
                return max(s.account_retry_s, 1), f"{job.provider} account paused: a login was just refused"
            breaker = rt.breaker(job.provider)
            if breaker is not None and breaker.open:
                return max(breaker.open_for_s, 1), f"{job.provider} account paused: {breaker.reason}"
            return None

        # Either way the slot goes back with its identical-request mark: were the mark kept, the recipient's
        # next identical request (often this row as the paused account's probe) would wait for one never sent.
        waited = _wait_for_slot(rt, job.provider, message, parts,
                                unless=lambda: no_send() is not None or paused() is not None)
        if waited is WITHDRAWN:
            if (pause := paused()) is not None:
                return _wait(rt, job, *pause, W.PAUSED, account=True)
            return _hand_back(rt, job, no_send() or "it gave its rate-limit slot back")
        if isinstance(waited, Retry):
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
        except LoginHeld as exc:  # another process's refused login holds the circuit: nothing was sent
            return _wait(rt, job, max(rt.settings.account_retry_s, 1), f"{job.provider} account paused: {exc}",
                         W.PAUSED, account=True)
        except AccountError as exc:
            return _account_problem(rt, job, exc)
        except PartlySent as exc:
            _finish_error(rt, job, f"{job.provider}: {exc}", unknown=True)
            return "error"
        except UnknownOutcome as exc:
            return _unknown_outcome(rt, job, exc)
        except AlreadySentUnconfirmed as exc:
            accepted = _confirm_only(rt, job, provider, message, exc, no_send)
            if isinstance(accepted, str):
                return accepted
        except ProviderError as exc:  # TransientError and anything a client did not classify more precisely
            return _transient_problem(rt, job, exc)
        except Exception as exc:  # a bug must not leave the row stuck or lose it: its outcome is unknown
            log.exception("send of row %d: unexpected %s", row_id, type(exc).__name__)
            return _unknown_outcome(rt, job, UnknownOutcome(f"internal error ({type(exc).__name__})"))

    if job.probe:
        _account_works(rt, job.provider)
    _reached(rt, job.provider)
    poll_after = s.poll_after_s() if entry.reports == "poll" else None
    ids = (accepted.provider_message_id or "").split(",") if accepted.provider_message_id else []
    recorded = _through_outage(lambda: store.record_accepted(rt.engine, row_id, job.token, ids, accepted.parts,
                                                             poll_after, provider=job.provider,
                                                             index_ids=accepted.reports_by_id),
                               row_id, "an accepted send")
    if recorded is None:
        log.warning("send of row %d: accepted by %s after its lease was taken over; the current holder decides "
                    "the row", row_id, job.provider)
    elif recorded == S.ERROR:
        log.error("ALERT: row %d was marked error (its send outlived its lease), but %s accepted it: it is success "
                  "now; do not send it again", row_id, job.provider)
    if accepted.already_sent:
        log.info("send of row %d: %s already had it (an earlier attempt arrived)", row_id, job.provider)
    return "accepted"


OUTAGE_RETRY_MAX_S = 2.0
"""The longest pause between two tries of an outcome write: once the database is back, the write lands
within this (see `_through_outage`)."""
OUTAGE_LOG_EVERY_S = 30.0


def _through_outage(write: Callable[[], object], row_id: int, what: str):
    """Run `write`, a record of what became of a send (fenced by the lease's token), trying again for as long
    as the database cannot be reached, however long that is. Given up, the outcome would be lost with the
    lease still held: the lease would run out, and the row be taken for an unknown outcome and sent again
    (or end `error`) although the provider had answered.

    Meanwhile the lease is not taken over: the sweep that ends leases (`store.expire_leases`) runs in the
    dispatch tick, which cannot reach the database either, and the first tick back pushes every lease under
    way back by as long as no tick ran (`store.stretch_leases`); the write, tried at least every
    `OUTAGE_RETRY_MAX_S`, then lands under its lease. A worker cut off from a database the rest of the fleet
    still reaches is, to the fleet, a dead worker: its lease runs out as usual. Errors other than a lost or
    refused connection are raised."""
    delay, logged_at = 0.5, -math.inf
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if not isinstance(exc, OperationalError) and not exc.connection_invalidated:
                raise
            if time.monotonic() - logged_at >= OUTAGE_LOG_EVERY_S:
                logged_at = time.monotonic()
                log.warning("row %d: %s could not be recorded (%s); trying again every %.0f s until it is",
                            row_id, what, type(exc).__name__, OUTAGE_RETRY_MAX_S)
            time.sleep(delay)
            delay = min(delay * 2, OUTAGE_RETRY_MAX_S)


WITHDRAWN = object()
"""`_wait_for_slot`'s answer when its `unless` held on waking: the slot was given back, nothing may be sent."""


def _campaign_held(rt: Runtime, job: store.SendJob) -> str | None:
    """Why a campaign row must not go now though it was released (its task came late: a worker for its
    queue was down, the broker lost it), or None. The row goes back unsent; the next tick ends it (opted
    out) or holds it (quiet hours), as it does every waiting row."""
    if job.opted_out:
        return "its recipient opted out while it waited in the broker"
    window = rt.settings.quiet_window
    if (job.campaign_zone and window is not None
            and quiet_left_s(job.campaign_zone, window, datetime.now(timezone.utc)) is not None):
        return f"quiet hours at its recipient's ({job.campaign_zone}) began while it waited in the broker"
    return None


def _wait_for_slot(rt: Runtime, provider: str, message: OutgoingMessage, parts: int, *,
                   unless: Callable[[], bool] | None = None) -> Retry | object | None:
    """Take a slot from the fleet-wide rate limit and the identical-request rule, sleeping briefly when
    the slot is near; a far slot becomes a `Retry` (the row then waits in the database). Its reason (logged,
    and the row's `last_error`) says how long, why, and how many sends of the provider were throttled so far.
    `WITHDRAWN` when `unless()` holds as the slot comes: the slot and its identical-request mark are given back."""
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


CONFIRM_TRIES = 5
CONFIRM_PAUSE_S = 0.25
"""A confirmation that failed is asked again this long after, twice as long each time."""


def _confirm_only(rt: Runtime, job: store.SendJob, provider, message: OutgoingMessage,
                  exc: AlreadySentUnconfirmed, no_send: Callable[[], str | None]) -> Accepted | str:
    """The provider has this row's request already (a resend answered "already sent"): ask the status request
    confirming it is ours, up to `CONFIRM_TRIES` times, each taking a rate-limit slot (it is a request to the
    provider like any other), never sending again. Returns `Accepted` once confirmed, or what became of the
    row: `failed` when the request is another number's, else it waits as it would have (no failure counted,
    its backoff not grown) and its next attempt is answered "already sent" again."""
    pause, last = 0.0, exc
    for _ in range(CONFIRM_TRIES):
        if no_send() or rt.stopping.wait(pause):
            break
        pause = pause * 2 or CONFIRM_PAUSE_S
        if not _confirm_slot(rt, job.provider, no_send):
            break
        try:
            provider.confirm_already_sent(message)  # inside the send's `provider_call`: counted as waiting
        except PermanentError as refused:
            _finish_failed(rt, job, str(refused))
            return "failed"
        except TransientError as again:
            last = again
            continue
        except ProviderError as other:  # throttled, or the account: the next attempt meets it as a send
            last = other
            break
        return Accepted(provider_message_id=str(message.reference), already_sent=True)
    log.info("send of row %d: %s has it, not yet confirmed (%s)", job.id, job.provider, last)
    return _wait(rt, job, backoff_s(job.failures, rt.settings.retry_base_s, rt.settings.retry_max_s),
                 f"{job.provider} already has it, confirming failed: {last}", W.RETRY)


def _confirm_slot(rt: Runtime, provider: str, no_send: Callable[[], str | None]) -> bool:
    """Wait for a rate-limit slot for a confirming status request (no identical-request rule: it sends no
    message); False when the rate limiter cannot be reached or the send must stop (`no_send`)."""
    while not no_send():
        try:
            permit = rt.throttle.acquire(rt.account(provider), rt.rate(provider), identical_s=0,
                                         max_wait_s=THROTTLE_MAX_WAIT_S).wait()
        except ThrottleUnavailable:
            return False
        if permit.reserved:
            return True
        if rt.stopping.wait(max(permit.wait_s, 0.05)):
            return False
    return False


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
        _finish_error(rt, job, f"{reason} (gave up after {tries} failed attempts in {duration(job.age_s)})"
                      if tries else f"{reason} (gave up after waiting {duration(job.age_s)})", unknown=unknown)
        return "error"
    _through_outage(lambda: store.wait_again(rt.engine, job.id, job.token, delay_s, reason, wait_reason,
                                             failed=failed, unknown=unknown),
                    job.id, "a wait")
    return wait_reason


def _finish_error(rt: Runtime, job: store.SendJob, reason: str, *, unknown: bool = False) -> None:
    _through_outage(lambda: store.finish_error(rt.engine, job.id, reason, token=job.token, unknown=unknown),
                    job.id, "an error")


def _finish_failed(rt: Runtime, job: store.SendJob, reason: str) -> None:
    _through_outage(lambda: store.finish_failed(rt.engine, job.id, reason, token=job.token),
                    job.id, "a refusal")


def _hand_back(rt: Runtime, job: store.SendJob, reason: str) -> str:
    """Nothing was sent: the row waits to be released again at once (to another worker, or this one)."""
    _through_outage(lambda: store.wait_again(rt.engine, job.id, job.token, 0, reason, W.BUSY),
                    job.id, "a row given back")
    return "handed back"


def _transient_problem(rt: Runtime, job: store.SendJob, exc: ProviderError) -> str:
    """Tried again after a backoff. A request that left and got an answer (`TransientError.reached`, and
    anything a client did not classify) counts as possibly arrived (`unknowns`): failover never moves it to
    another provider."""
    s = rt.settings
    _failed_on_the_way(rt, job, exc)
    delay = backoff_s(job.failures + 1, s.retry_base_s, s.retry_max_s)
    return _wait(rt, job, delay, str(exc), W.RETRY, failed=True, unknown=getattr(exc, "reached", True))


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
    rows then go to the fallback). A probe that fails so keeps the circuit open for another pause. The pause
    is `SMS_UNREACHABLE_RETRY_S`, not the account errors' `SMS_ACCOUNT_RETRY_S`: a provider that was only
    unreachable gets its rows back within a minute of answering again."""
    s, provider = rt.settings, job.provider
    if job.probe:
        store.trip_breaker(rt.engine, provider, s.unreachable_retry_s, f"unreachable: {exc}")
        log.error("ALERT: %s still unreachable (the probe failed), paused again for %.0f s: %s",
                  provider, s.unreachable_retry_s, exc)
        rt.forget_breakers()
        return
    if provider not in s.failover_table:
        return
    store.note_failure(rt.engine, provider)
    breaker = rt.breaker(provider)
    if breaker is None or breaker.open or (breaker.failing_for_s or 0) < s.failover_after_s:
        return
    if store.trip_if_failing(rt.engine, provider, s.failover_after_s, s.unreachable_retry_s, f"unreachable: {exc}"):
        log.error("ALERT: %s unavailable: every send failed for %.0f s (SMS_FAILOVER_AFTER_S), the last: %s; its "
                  "rows go through %s, and one probe tests it every %.0f s (SMS_UNREACHABLE_RETRY_S)", provider,
                  s.failover_after_s, exc, " or ".join(s.failover_table[provider]), s.unreachable_retry_s)
    rt.forget_breakers()


def _account_problem(rt: Runtime, job: store.SendJob, exc: AccountError) -> str:
    """An account error opens the provider's circuit: its rows wait, one probe tests it after
    `SMS_ACCOUNT_RETRY_S`; after refused credentials (`LoginRefused`) no sooner than `workflow.logins.retry_s`,
    and the circuit keeps their fingerprint. An error that could be about this one message (`by_nature=False`)
    ends only this message as `failed`, until `SUSPECT_ROWS` different messages met it; but not the probe's:
    met by the probe of a paused account, it is the account still refusing, and the circuit stays open (the
    next probe is another row: were it about this message alone, that one goes through)."""
    s = rt.settings
    if isinstance(exc, LoginRefused):
        rt.note_refused_login(job.provider)
        pause = logins.retry_s(s)
        store.trip_breaker(rt.engine, job.provider, pause, str(exc), refused_login=rt.fingerprint(job.provider))
        logins.alert_refused(job.provider, exc, pause, probe=job.probe)
        rt.forget_breakers()
        return _wait(rt, job, pause, f"{job.provider} account problem: {exc}", W.PAUSED, account=True, failed=True)
    reason = f"{job.provider} account problem: {exc}"
    if (not exc.by_nature and not job.probe
            and store.recent_refusals(rt.engine, job.provider, str(exc), SUSPECT_WITHIN_S) + 1 < SUSPECT_ROWS):
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


