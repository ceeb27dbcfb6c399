"""The contract every provider client keeps: plain values in, plain values out, a few typed errors.

A provider client is a pure protocol client. It knows its provider's wire format and error codes and
nothing of Celery, the database or Redis. The send task hands it an `OutgoingMessage` and gets back
`Accepted`, or one of the `ProviderError` subclasses below, which decide what the workflow does next:

| error               | the workflow                                                          |
| ------------------- | --------------------------------------------------------------------- |
| `PermanentError`    | this message can never be sent: asterCC `failed`, `error_msg` = reason |
| `TransientError`    | retry with backoff inside the retry window, then `error`              |
| `UnknownOutcome`    | the request left and no answer came: it may have arrived (see below)   |
| `AlreadySentUnconfirmed` | the provider has it already; only its confirmation is asked (never the send again) |
| `AccountError`      | pause the whole account, retry slowly, never burn the queue to failed |
| `LoginRefused`      | an `AccountError`: credentials refused, probed again at a slower pace  |
| `ThrottledError`    | the provider asked us to slow down: retry after `retry_after` seconds |

Error messages are shown to call-centre operators in asterCC's `error_msg`: plain words, and never a phone
number, a message text or a secret.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol


@dataclass(frozen=True)
class OutgoingMessage:
    """One SMS to one recipient.

    `reference` is our number for the request: asterCC's row id (`cc10_batchcontacts.id`), stable across
    retries, so providers that deduplicate by our id (Mobilgroup) can recognise a retry after a lost
    answer; an operator's deliberate resend of a row gets a new one (see `workflow`). `recipient` is in
    international format, digits only, no `+`. `callback_url` is where a provider that reports delivery
    by HTTP should send its report, or None.
    """

    reference: int
    recipient: str
    text: str
    callback_url: str | None = None


@dataclass(frozen=True)
class Accepted:
    """The provider took the message. `provider_message_id` is its id for later reports (one per part
    for multi-part SMPP messages, comma-joined), or None when the provider gives none."""

    provider_message_id: str | None = None
    parts: int = 1
    already_sent: bool = False
    """True when the provider said it had this request already (a resend after a lost answer)."""
    reports_by_id: bool = False
    """True when this provider's delivery reports name the message by `provider_message_id` alone (SMPP
    receipts), so its ids must be looked up later; reports of the others carry our own reference."""


Outcome = Literal["delivered", "undelivered", "accepted"]


@dataclass(frozen=True)
class DeliveryReport:
    """What a provider later says about a message, from any source (webhook, SMPP receipt, poll).

    Identify the message by `reference` (our row id) when the source carries it, else by
    `provider_message_id`. `resends` says which send of that row the report is about (the row's count of
    operator resends when it was sent), where the source tells (our signed callback URL, a status poll): a
    report about a send that an operator has since sent again is stale. `attempt` says which attempt of
    that send (its fencing token), where the source tells (our callback URL): an `undelivered` report about
    an attempt other than the row's latest is stale (the latest may yet arrive). `outcome`: `delivered` (final,
    keeps `success`), `undelivered` (final, `failed` with `reason`), `accepted` (still on its way; changes
    no status). `reply_text` carries a recipient's reply (an MO message) for `responsenote`; a reply that
    names no message of ours is matched to the latest message sent to `recipient` (international digits,
    no `+`) by that provider.
    """

    outcome: Outcome
    reference: int | None = None
    resends: int | None = None
    attempt: int | None = None
    provider_message_id: str | None = None
    reason: str = ""
    reply_text: str | None = None
    recipient: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    cost: Decimal | None = None
    """What the provider charged for the message, in the account's currency, where the report says."""
    parts: int | None = None
    """How many SMS parts the provider counted, where the report says."""


class ProviderError(Exception):
    """Base of every error a provider client raises; `str(err)` is operator-readable."""


class PermanentError(ProviderError):
    """This message cannot be delivered as it is (bad number, too long, rejected content)."""


class TransientError(ProviderError):
    """A failure that may pass (network, timeout, HTTP 5xx, unreadable answer): retry later.

    Raise it only when the provider answered with an error, or the request never left; when it left and no
    answer came, raise `UnknownOutcome`. `reached`: the request left and the provider answered (an HTTP
    5xx, an answer that cannot be read): it may have the message after all, so the row is never sent through
    another provider while it might (failover); False only where the request certainly never left (the
    connection was refused, the message's turn never came)."""

    def __init__(self, message: str, *, reached: bool = True):
        super().__init__(message)
        self.reached = reached


class AlreadySentUnconfirmed(TransientError):
    """A resend was answered "already have this request" (Mobilgroup's error 7: an earlier attempt arrived),
    not yet confirmed to be ours. Nothing is to be sent again: the confirmation is asked, each time with a
    rate-limit slot of its own, with the client's `confirm_already_sent(message)`."""


class UnknownOutcome(TransientError):
    """The request left, but its answer never came (a read timeout, a connection lost after sending, an SMPP
    session closed with the submit in flight): the provider may or may not have the message. The workflow
    re-sends it only where a repeat is harmless or the operator's policy says so (`SMS_<P>_ON_UNKNOWN`)."""


class PartlySent(UnknownOutcome):
    """Some parts of a multi-part message were accepted, then a later one failed or went unanswered: the
    phone may show it incomplete, and sending it again would repeat the first parts. The workflow ends it
    `error`, saying so, whatever the resend policy."""


class AccountError(ProviderError):
    """The account cannot send (credentials, blocked, out of money): pause the account, alert.

    `by_nature`: True when the error is account-wide whatever the message (wrong credentials, no money, a
    blocked account or IP); False when the provider's answer could also be about this one message (an
    unexplained HTTP 403 or 4xx, a "parameter missing"): the workflow then fails only this message, and
    treats the account as in trouble only once several different messages meet it."""

    def __init__(self, message: str, *, by_nature: bool = True):
        super().__init__(message)
        self.by_nature = by_nature


class LoginRefused(AccountError):
    """The provider refused our credentials (or shut our address out after refused ones). Providers count
    such refusals and block the address after a few (smsc.ru: 5 in 30 minutes): the workflow tries the same
    credentials again only in one probe for the whole fleet, at its own slow pace."""


class LoginHeld(AccountError):
    """Raised by a login gate (see `providers.smsc.SmscClient`) instead of logging in: the fleet's circuit
    holds these credentials refused and this is not its probe. Nothing was sent."""


class ThrottledError(ProviderError):
    """The provider refused because we send too fast or repeat ourselves; retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float = 60.0):
        super().__init__(message)
        self.retry_after = retry_after


class Provider(Protocol):
    """What the send task needs of a provider client."""

    name: str

    def check(self, message: OutgoingMessage) -> int:
        """Raise `PermanentError` if the message can never be sent by this provider (too long, a
        character it cannot carry); else return how many SMS parts it will be billed as. Sends nothing."""

    def send(self, message: OutgoingMessage) -> Accepted:
        """Send one message; return `Accepted` or raise a `ProviderError`."""

    def close(self) -> None:
        """Release connections (HTTP sessions, SMPP binds)."""
