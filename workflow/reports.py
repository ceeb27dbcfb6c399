"""The one way a delivery report changes a row, whatever brought it (webhook, SMPP receipt, poll).

`apply_report` finds the row the report is about and moves it forward only: `delivered` keeps asterCC's
`success`, `undelivered` sets `failed` with the provider's reason (either keeps the cost and parts the report
gives, in `sms_dispatch.cost` and `parts_reported`), a still-open status changes nothing, and
a report about a row that is already final, or about a send of it before an operator's resend, is ignored
(logged as stale or duplicate, never an error).
A recipient's reply is written to `responsenote`; one that is an opt-out word (`SMS_OPTOUT_WORDS`) also
opts its number out of campaigns (`workflow.campaigns`).

Whoever holds a callback URL, and whoever sends an SMS reply, chooses these words, and asterCC's screens
show them raw: a reason and a reply are stored as `plain_text`, without markup or control characters.
"""
from __future__ import annotations

import logging
import unicodedata
from dataclasses import replace
from typing import Literal

from markupsafe import Markup
from sqlalchemy.engine import Engine

from db import store
from db.models import DispatchState
from providers.base import DeliveryReport
from providers.smsc import message_id_forms
from settings import OPTOUT_WORDS_DEFAULT, parse_words
from workflow.campaigns import optout_word

log = logging.getLogger(__name__)

ReportResult = Literal["applied", "duplicate", "stale", "unknown"]

MAX_READ_CHARS = 2000
"""Longer report text is cut before it is cleaned (the columns hold 255)."""
_ANGLES = str.maketrans("<>", "\u2039\u203a")


def plain_text(text: str) -> str:
    """`text` as plain words: tags and comments removed (markupsafe's `striptags`, which also decodes
    entities), any `<` or `>` left shown as `‹ ›`, control and format characters (bidi overrides too)
    dropped, whitespace collapsed to single spaces; at most `MAX_READ_CHARS` of it read."""
    text = str(Markup(text[:MAX_READ_CHARS]).striptags())
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return " ".join(text.translate(_ANGLES).split())


def apply_report(engine: Engine, provider: str, report: DeliveryReport, *,
                 optout_words: list[str] | None = None) -> ReportResult:
    """Apply `report` from `provider` to the rows in `engine`'s database. Returns `unknown` when no row of
    ours matches (a webhook answers 404), `duplicate` when the row already has this final outcome, `stale`
    when it has another final outcome or the report says nothing new, else `applied`. A reply that is one
    of `optout_words` (default: `SMS_OPTOUT_WORDS`'s default) opts the row's recipient out of campaigns."""
    report = replace(report, reason=report.reason and plain_text(report.reason),
                     reply_text=report.reply_text and plain_text(report.reply_text))
    target = store.find_report_target(
        engine, provider, reference=report.reference, provider_message_id=report.provider_message_id,
        recipient=report.recipient if report.reply_text is not None else None,
    )
    if target is None:
        log.info("%s report for no known row (ignored)", provider)
        return "unknown"
    if report.reply_text is not None:
        store.record_reply(engine, target.id, report.reply_text)
        log.info("%s reply recorded on row %d", provider, target.id)
        word = optout_word(report.reply_text, parse_words(OPTOUT_WORDS_DEFAULT) if optout_words is None
                           else optout_words)
        if word and store.record_optout(engine, target.id, word):
            log.info("%s reply on row %d opts its recipient out of campaigns (%s)", provider, target.id, word)
        return "applied"
    if report.resends is not None and report.resends != target.resends:
        log.info("%s report on row %d ignored: it is about a send before the operator's resend",
                 provider, target.id)
        return "stale"
    if report.outcome == "accepted":
        return "stale"
    delivered = report.outcome == "delivered"
    # An attempt's failure is not the send's while a later attempt may yet arrive; a delivery is, whichever
    # attempt it was.
    attempt = None if delivered else report.attempt
    if attempt is not None and attempt != target.attempts:
        log.info("%s report on row %d ignored: attempt %d failed, attempt %d is the latest", provider, target.id,
                 attempt, target.attempts)
        return "stale"
    reason = report.reason or ("not delivered" if not delivered else "")
    # Fenced by the send the report is about: an operator's resend claimed after the row was found is left alone.
    if store.apply_final_report(engine, target.id, delivered, reason, resends=target.resends, attempt=attempt,
                                cost=report.cost, parts=report.parts):
        log.info("%s report applied to row %d: %s", provider, target.id, report.outcome)
        return "applied"
    same = target.state == (DispatchState.DELIVERED if delivered else DispatchState.FAILED)
    log.info("%s report on row %d ignored: row already %s", provider, target.id, target.state)
    return "duplicate" if same else "stale"


def apply_smpp_receipt(engine: Engine, provider: str, report: DeliveryReport, *,
                       optout_words: list[str] | None = None) -> str:
    """`apply_report` for a receipt that came over SMPP (`workflow.smpp_receiver`): the id is looked up in
    each of its forms (`providers.smsc.message_id_forms`: smsc.ru does not say whether receipts write ids in
    decimal or hexadecimal), and a message sent in several parts is `delivered` only once every part's
    receipt said so (each delivered part's id is settled in `sms_message_ids`). Returns what `apply_report`
    returns, or `awaiting` for a delivered part whose message has parts still awaiting their receipt."""
    if report.reply_text is not None or not report.provider_message_id:
        return apply_report(engine, provider, report, optout_words=optout_words)
    for form in message_id_forms(report.provider_message_id):
        if report.outcome != "delivered":
            result = apply_report(engine, provider, replace(report, provider_message_id=form))
            if result != "unknown":
                return result
            continue
        settled = store.settle_delivered_part(engine, provider, form)
        if settled is None:
            continue
        row_id, resends, awaiting = settled
        if awaiting:
            log.info("smsc receipt: a part of row %d delivered, %d more awaited", row_id, awaiting)
            return "awaiting"
        return apply_report(engine, provider, replace(report, provider_message_id=None, reference=row_id,
                                                      resends=resends))
    return "unknown"
