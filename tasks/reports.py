"""The one way a delivery report changes a row, whatever brought it (webhook, SMPP receipt, poll).

`apply_report` finds the row the report is about and moves it forward only: `delivered` keeps asterCC's
`success`, `undelivered` sets `failed` with the provider's reason, a still-open status changes nothing, and
a report about a row that is already final, or about a send of it before an operator's resend, is ignored
(logged as stale or duplicate, never an error).
A recipient's reply is written to `responsenote`.
"""
from __future__ import annotations

import logging
from typing import Literal

from db import store
from db.models import DispatchState
from providers.base import DeliveryReport

log = logging.getLogger(__name__)

ReportResult = Literal["applied", "duplicate", "stale", "unknown"]


def apply_report(provider: str, report: DeliveryReport, rt=None) -> ReportResult:
    """Apply `report` from `provider`. Returns `unknown` when no row of ours matches (a webhook answers
    404), `duplicate` when the row already has this final outcome, `stale` when it has another final
    outcome or the report says nothing new, else `applied`."""
    if rt is None:
        from tasks.runtime import runtime

        rt = runtime()
    target = store.find_report_target(
        rt.engine, provider, reference=report.reference, provider_message_id=report.provider_message_id,
        recipient=report.recipient if report.reply_text is not None else None,
    )
    if target is None:
        log.info("%s report for no known row (ignored)", provider)
        return "unknown"
    if report.reply_text is not None:
        store.record_reply(rt.engine, target.id, report.reply_text)
        log.info("%s reply recorded on row %d", provider, target.id)
        return "applied"
    if report.resends is not None and report.resends != target.resends:
        log.info("%s report on row %d ignored: it is about a send before the operator's resend",
                 provider, target.id)
        return "stale"
    if report.outcome == "accepted":
        return "stale"
    delivered = report.outcome == "delivered"
    reason = report.reason or ("not delivered" if not delivered else "")
    if store.apply_final_report(rt.engine, target.id, delivered, reason):
        log.info("%s report applied to row %d: %s", provider, target.id, report.outcome)
        return "applied"
    same = target.state == (DispatchState.DELIVERED if delivered else DispatchState.FAILED)
    log.info("%s report on row %d ignored: row already %s", provider, target.id, target.state)
    return "duplicate" if same else "stale"
