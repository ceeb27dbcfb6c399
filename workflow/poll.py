"""The status poll (`sms.poll_due`, `sms.poll`): the provider whose reports must be asked for
(`providers.registry.POLLED`, Mobilgroup) is asked once per message, after the message's lifetime expired,
and the answer applied as any delivery report is. Each status request takes a slot of the account's rate.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from db import store
from providers.base import AccountError, LoginRefused, PermanentError, ProviderError
from providers.registry import POLLED
from providers import registry
from workflow import logins
from workflow.reports import apply_report
from workflow.runtime import Runtime
from workflow.send import THROTTLE_MAX_WAIT_S
from workflow.throttle import ThrottleUnavailable

log = logging.getLogger(__name__)

POLL_LEASE_S = 300


def claim_polls(rt: Runtime, limit: int = 500) -> list[int]:
    """Mobilgroup rows whose lifetime has expired and whose status is due to be asked: none while its
    account circuit is open, and no more per run than its rate allows in half a run's period (the polls
    share the account's rate limit with the sends)."""
    breaker = store.breaker_states(rt.engine).get(POLLED)
    if breaker is not None and breaker.open:
        return []
    s = rt.settings
    limit = min(limit, max(1, int(s.mobilgroup_rate * s.mobilgroup_poll_interval_s / 2)))
    return store.claim_due_polls(rt.engine, POLLED, limit, POLL_LEASE_S)


def status_slot(rt: Runtime, provider: str) -> bool:
    """Whether a slot of `provider`'s rate limit came, within `THROTTLE_MAX_WAIT_S`, for one status request:
    status requests, the polls and failover's questions alike, count against the account's rate as sends do."""
    try:
        with rt.waiting():
            return rt.throttle.acquire(rt.account(provider), rt.rate(provider),
                                       max_wait_s=THROTTLE_MAX_WAIT_S).wait().reserved
    except ThrottleUnavailable:
        return False


def poll_row(rt: Runtime, row_id: int) -> str:
    """Ask Mobilgroup once for a row's status and apply the answer; an open status is asked again later
    (`SMS_MOBILGROUP_POLL_RETRY_S`, at most `SMS_MOBILGROUP_POLL_MAX` times). Every write is about the send
    asked for: an operator's resend claimed meanwhile is left alone, and a row that no longer awaits
    Mobilgroup's status is `skipped`."""
    s = rt.settings
    client = rt.client(POLLED)
    resends = store.poll_target(rt.engine, POLLED, row_id)
    if resends is None:  # sent again since the poll was claimed, or finished by a report
        return "skipped"
    if not status_slot(rt, POLLED):  # asked again when the poll's lease ends (`POLL_LEASE_S`)
        return "throttled"
    try:
        with rt.waiting():
            answer = client.status(registry.entry(POLLED).reference(s, row_id, resends))
        report = replace(answer, reference=row_id, resends=resends)
    except PermanentError as exc:
        # The status request itself was refused (no request with this id, a request it cannot read): that
        # says nothing about delivery, so asterCC keeps `success`, and asking again would get the same.
        log.warning("status poll of row %d refused, no more polls: %s", row_id, exc)
        store.stop_polling(rt.engine, row_id, f"status unknown: {exc}", resends=resends)
        return "unconfirmed"
    except AccountError as exc:
        # Refused credentials: the sends' pace of refused logins and their fingerprint (`workflow.logins`).
        refused = isinstance(exc, LoginRefused)
        pause = logins.retry_s(s) if refused else s.account_retry_s
        if store.trip_breaker(rt.engine, POLLED, pause, str(exc),
                              refused_login=rt.fingerprint(POLLED) if refused else None):
            if refused:
                logins.alert_refused(POLLED, exc, pause, probe=False)
            else:
                log.error("ALERT: %s account problem (status poll), paused for %.0f s: %s", POLLED, pause, exc)
        store.poll_again(rt.engine, row_id, int(pause), s.mobilgroup_poll_max, resends=resends)
        return "retry"
    except ProviderError as exc:
        log.warning("status poll of row %d failed, asking again later: %s", row_id, exc)
        store.poll_again(rt.engine, row_id, int(min(s.mobilgroup_poll_retry_s, s.retry_max_s)), s.mobilgroup_poll_max,
                         resends=resends)
        return "retry"
    if report.outcome == "accepted":
        more = store.poll_again(rt.engine, row_id, s.mobilgroup_poll_retry_s, s.mobilgroup_poll_max, resends=resends)
        return "open" if more else "unconfirmed"
    return apply_report(rt.engine, POLLED, report)


