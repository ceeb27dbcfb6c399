"""Accolades (voipit.ro) HTTP client: the `sms/send` command and its delivery-report callback.

Per the seed (`002_…txt`) a message is a form POST to `<url>/<account>/sms/send` with `password`,
`phoneNumber`, `message`, and optionally `messageId` (echoed in the report) and `sendResultTo` (where the
report goes). Success is `{"type": "ok"}` and carries no id of the provider's, so reports are matched by
our row id, which we send as `messageId`. The seed says Accolades "will start a http(s) request" with the
report's fields (`REPORT_FIELDS`) but not which method, so the webhook reads them from a GET query string
and a POST form alike.

Answers and what the workflow does with them (`providers.base` explains the error types):

| answer                                 | error            | why                                          |
| -------------------------------------- | ---------------- | -------------------------------------------- |
| 200 `{"type": "ok"}`                   | -                | accepted                                     |
| 400, 413                               | `PermanentError` | this message is invalid or too large         |
| 401 (bad account/password, API off)    | `LoginRefused`   | every message would fail the same way        |
| `403.6` (IP blacklisted)               | `LoginRefused`   | more invalid requests keep us blacklisted    |
| other 403                              | `AccountError`   | the whole account must slow down             |
| 404, 3xx (redirects are not followed)  | `AccountError`   | our path is fixed, so the account number or  |
|                                        |                  | base URL is wrong: a configuration problem   |
| 429                                    | `ThrottledError` | honour `Retry-After`                         |
| other 4xx                              | `AccountError`   | unexplained refusal of all our requests      |
| 5xx, network errors, timeouts, non-JSON| `TransientError` | may pass                                     |

An error package (`"type": "Error"`) that comes with HTTP 200 is judged by its own `code`.

The recipient goes out as international digits (`4072…`); the seed does not say whether Accolades
wants a leading `+`, so `plus_prefix=True` adds one.

Length: GSM-7 texts take 160 characters in one part and 153 per part beyond (extension characters
count double), UCS-2 texts 70 and 67; a text needing more than `max_parts` parts (6 by default) is
refused before sending.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import requests

from providers.base import (
    Accepted,
    AccountError,
    LoginRefused,
    DeliveryReport,
    OutgoingMessage,
    PermanentError,
    ThrottledError,
    TransientError,
)
from providers.http import Answer, PartBilledClient, retry_after
from providers.text import redact, sendable_text

DEFAULT_URL = "https://client.voipit.ro"


class AccoladesClient(PartBilledClient):
    """Sends one message per call to Accolades; see the module docstring for the error mapping."""

    name = "accolades"
    label = "Accolades"

    def __init__(self, *, url: str = DEFAULT_URL, account: str, password: str, timeout: float = 15.0,
                 session: requests.Session | None = None, max_parts: int = 6, plus_prefix: bool = False):
        if not account or not password:
            raise ValueError("Accolades needs an account number and an API password")
        super().__init__(timeout=timeout, session=session, max_parts=max_parts, plus_prefix=plus_prefix)
        self.endpoint = f"{url.rstrip('/')}/{account}/sms/send"
        self._password = password

    def __repr__(self) -> str:
        return f"AccoladesClient(endpoint={self.endpoint!r})"

    def send(self, message: OutgoingMessage) -> Accepted:
        parts = self.check(message)
        form = {
            "password": self._password,
            "phoneNumber": self.number(message.recipient),
            "message": sendable_text(message.text),
            "messageId": str(message.reference),
        }
        if message.callback_url:
            form["sendResultTo"] = message.callback_url
        _raise_for_answer(self._request("POST", self.endpoint, data=form))
        return Accepted(provider_message_id=None, parts=parts)


def _raise_for_answer(answer: Answer) -> None:
    """Return if Accolades said ok; raise the error its answer stands for."""
    status = answer.status
    if status >= 500:
        raise TransientError(f"Accolades is unavailable (HTTP {status})")
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if status == 200:
            raise TransientError("Accolades answered with something that is not its JSON reply")
        body = {}
    kind = str(body.get("type", "")).lower()
    if status == 200 and kind == "ok":
        return
    code = str(body.get("code", "") or status)
    said = redact(body.get("message") or "no reason given")
    if status == 200:
        # An error package with HTTP 200: its own code decides.
        status = int(code.split(".")[0]) if code.split(".")[0].isdigit() else 0
    if status in (400, 413):
        raise PermanentError(f"Accolades refused the message: {said} (code {code})")
    if status == 401:
        raise LoginRefused(f"Accolades refused the account (wrong account, API off or wrong password): "
                           f"{said} (code {code})")
    if status == 403:
        if code == "403.6":
            raise LoginRefused("Accolades has temporarily blacklisted our IP address after invalid requests "
                               f"(code {code}); check the account settings and wait")
        # A refusal we cannot tell from one about this message (a number it will not send to, say).
        raise AccountError(f"Accolades forbids this request: {said} (code {code})", by_nature=False)
    if status == 404 or 300 <= status < 400:
        raise AccountError(f"Accolades does not know this address: check SMS_ACCOLADES_URL and "
                           f"SMS_ACCOLADES_ACCOUNT ({said}, code {code})")
    if status == 429:
        raise ThrottledError(f"Accolades asks us to slow down: {said}",
                             retry_after=retry_after(answer.headers.get("Retry-After")))
    if 400 <= status < 500:
        raise AccountError(f"Accolades refused our request: {said} (HTTP {status}, code {code})", by_nature=False)
    raise TransientError(f"Accolades gave an answer we do not understand (HTTP {answer.status})")


REPORT_FIELDS = frozenset({"apiName", "type", "status", "id", "errorMessage"})
"""The fields of a status notification, as the seed lists them."""


def parse_report(fields: Mapping[str, str]) -> DeliveryReport:
    """Turn the fields of an Accolades status notification into a `DeliveryReport`.

    `id` (our `messageId`, i.e. the row id) becomes `reference`. `status=sent` means handed to the
    carrier, which is as far as Accolades reports: `delivered` (the row keeps `success`). `status=error`
    is `undelivered` with `errorMessage` (redacted) as the reason. Raises `ValueError` for anything that
    is not a well-formed SMS delivery report.
    """
    if fields.get("apiName", "sms") != "sms" or fields.get("type", "deliveryReport") != "deliveryReport":
        raise ValueError("not an SMS delivery report")
    echoed = (fields.get("id") or "").strip()
    if not (echoed.isascii() and echoed.isdigit()):
        raise ValueError("the report carries no message id of ours")
    status = (fields.get("status") or "").strip().lower()
    if status == "sent":
        return DeliveryReport(outcome="delivered", reference=int(echoed))
    if status == "error":
        reason = redact(fields.get("errorMessage") or "") or "no reason given"
        return DeliveryReport(outcome="undelivered", reference=int(echoed),
                              reason=f"Accolades could not send the message: {reason}")
    raise ValueError("unknown report status")
