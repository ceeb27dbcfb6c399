"""Ozeki HTTP API client: the `SendSms` command, and the `SMSDeliveryReport` notification it triggers.

Per the seed (`004_…txt`) a message is an HTTP GET of the API address (`SMS_OZEKI_URL`, e.g.
`http://host:9509/api`) with `command=SendSms`, `Username`, `Password`, `Sender` (optional),
`Recipient`, `Message` and the report URL, under both its spellings: `DeliveryReportURL` (the seed's
example and Ozeki's other pages) and `DelivaryReportURL` (the seed's table). The answer is XML rooted at
`<OzApi_CommandResult_SendSms>` holding `Code`, `Message` and, on success, `SmsId`. As the seed prints
it the closing tag does not match the opening one (`</OzApi_CommandResult_SencdSms>`): `parse_answer`
repairs exactly that, then parses with defusedxml, which refuses DTDs and entity declarations.

Codes and what the workflow does with them (`providers.base` explains the error types):

| code                            | error            | why                                                  |
| ------------------------------- | ---------------- | ---------------------------------------------------- |
| 200                             | -                | accepted; `SmsId` is the provider's id               |
| 300 ParseError                  | `PermanentError` | Ozeki could not read this request, i.e. its content  |
| 301 NotImplementedCommand       | `AccountError`   | this Ozeki has no `SendSms`: every message would fail |
| 302 InvalidParameter            | `PermanentError` | e.g. a recipient Ozeki cannot use                    |
| 303 InappropriateCommand        | `PermanentError` |                                                      |
| 304, 305, 306 (authentication)  | `AccountError`   | credentials or rights: pause the account (305, a     |
|                                 |                  | refused password: `LoginRefused`, probed slowly)     |
| 307 Forbidden address           | `PermanentError` | this recipient is not allowed                        |
| 401 ApiExtensionUnavailable     | `AccountError`   | Ozeki's configuration; pause, retry slowly           |
| 501 SmsDestinationNotFound      | `PermanentError` | no route to this destination                         |
| 701-799 (configuration errors)  | `AccountError`   | Ozeki's configuration; pause, retry slowly           |
| any other code                  | `TransientError` | unknown: retry inside the retry window               |

HTTP: network errors, timeouts, 5xx and unreadable answers are `TransientError`; 401, 403, 404, 405 and
redirects (not followed) without a readable answer mean the API address or its access is wrong for every
message: `AccountError`. The password travels in the query string (the API is GET-only), so no URL and no
library error text ever reaches a message of ours.

The recipient is sent with a leading `+` (the seed's example, `%2b0615546670`); `plus_prefix=False` sends
bare digits.

Delivery reports. Ozeki requests `DeliveryReportURL` as an `SMSDeliveryReport` notification, a
form-urlencoded POST carrying `NotificationName` per its notification pages; the seed only says the URL
"will be requested with delivery details", and the public pages name no other field of this notification
beyond the `SmsId` its answer gave. `parse_report` therefore takes the fields from a POST body or a GET
query alike and reads the outcome from `Delivered` (true/false) or else from a status word in
`DeliveryStatus`, `Status` or `State` (delivered / undelivered, failed, error, expired, rejected / sent,
enroute, accepted …); `REPORT_FIELDS` are the fields it knows.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as safe_xml
import requests
from defusedxml import DefusedXmlException

from providers.base import (
    Accepted,
    AccountError,
    LoginRefused,
    DeliveryReport,
    OutgoingMessage,
    PermanentError,
    ProviderError,
    TransientError,
)
from providers.http import PartBilledClient
from providers.text import sendable_text

ROOT = "OzApi_CommandResult_SendSms"

CODES: dict[int, tuple[type[ProviderError], str]] = {
    300: (PermanentError, "Ozeki could not parse the request (code 300)"),
    301: (AccountError, "this Ozeki server does not implement SendSms (code 301): check SMS_OZEKI_URL"),
    302: (PermanentError, "Ozeki rejected a parameter of the message, e.g. the recipient (code 302)"),
    303: (PermanentError, "Ozeki says the command is inappropriate (code 303)"),
    304: (AccountError, "Ozeki requires authentication (code 304): set SMS_OZEKI_USERNAME and "
                        "SMS_OZEKI_PASSWORD"),
    305: (LoginRefused, "Ozeki rejected the username or password (code 305): check SMS_OZEKI_USERNAME "
                        "and SMS_OZEKI_PASSWORD"),
    306: (AccountError, "Ozeki forbids this user to send SMS (code 306)"),
    307: (PermanentError, "Ozeki forbids sending to this address (code 307)"),
    401: (AccountError, "Ozeki's API extension is unavailable (code 401): check its configuration"),
    501: (PermanentError, "Ozeki found no route to this destination (code 501)"),
}
"""Ozeki code -> (what we raise, operator-readable words). 7xx are configuration errors (see `_error`)."""

_XML_DECL = re.compile(r"^\s*(<\?xml[^>]*\?>)?\s*")
_OPEN_TAG = re.compile(r"<([A-Za-z_][\w.\-]*)[\s>/]")
_LAST_CLOSE_TAG = re.compile(r"</\s*[A-Za-z_][\w.\-:]*\s*>\s*$")

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_STATUS_WORDS = {
    "delivered": "delivered", "delivrd": "delivered", "success": "delivered", "successful": "delivered",
    "undelivered": "undelivered", "undeliv": "undelivered", "failed": "undelivered",
    "failure": "undelivered", "error": "undelivered", "expired": "undelivered", "rejected": "undelivered",
    "rejectd": "undelivered", "deleted": "undelivered",
    "sent": "accepted", "submitted": "accepted", "enroute": "accepted", "accepted": "accepted",
    "pending": "accepted", "buffered": "accepted", "queued": "accepted",
}
_WORD = re.compile(r"[A-Za-z][A-Za-z _-]{0,40}")
REPORT_FIELDS = frozenset({"NotificationName", "SmsId", "Sender", "Recipient", "Delivered", "DeliveryStatus",
                           "Status", "State"})
"""The fields of a delivery report we know: those `parse_report` reads, and the sender and recipient."""


def parse_answer(body: bytes) -> Element:
    """The root element of a `SendSms` answer, tolerating the seed's mismatched closing tag.

    Raises `ValueError` for anything else that is not the expected XML (including DTDs and entities,
    which defusedxml refuses without expanding them).
    """
    text = body.decode("utf-8-sig", errors="strict") if isinstance(body, bytes) else body
    opening = _OPEN_TAG.search(_XML_DECL.sub("", text, count=1))
    if opening is None:
        raise ValueError("no XML element in the answer")
    if opening.group(1) == ROOT:
        # The seed's answer closes `<OzApi_CommandResult_SendSms>` as `</OzApi_CommandResult_SencdSms>`.
        text = _LAST_CLOSE_TAG.sub(f"</{ROOT}>", text)
    try:
        root = safe_xml.fromstring(text, forbid_dtd=True)
    except (ParseError, DefusedXmlException) as exc:
        raise ValueError(f"unreadable XML ({type(exc).__name__})") from None
    if _local(root.tag) != ROOT:
        raise ValueError("the answer is not a SendSms result")
    return root


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(root: Element, name: str) -> str | None:
    for child in root:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


class OzekiClient(PartBilledClient):
    """Sends one message per call through an Ozeki HTTP API; see the module docstring for the codes."""

    name = "ozeki"
    label = "Ozeki"

    def __init__(self, *, url: str, username: str, password: str, sender: str | None = None,
                 timeout: float = 15.0, session: requests.Session | None = None, max_parts: int = 6,
                 plus_prefix: bool = True):
        if not url or not username or not password:
            raise ValueError("Ozeki needs the API address, a username and a password")
        super().__init__(timeout=timeout, session=session, max_parts=max_parts, plus_prefix=plus_prefix)
        self.url = url
        self.username = username
        self._password = password
        self.sender = sender or None

    def __repr__(self) -> str:
        return f"OzekiClient(url={self.url!r}, username={self.username!r})"

    def send(self, message: OutgoingMessage) -> Accepted:
        parts = self.check(message)
        params = {"command": "SendSms", "Username": self.username, "Password": self._password}
        if self.sender:
            params["Sender"] = self.sender
        params["Recipient"] = self.number(message.recipient)
        params["Message"] = sendable_text(message.text)
        if message.callback_url:
            # Both spellings: Ozeki's pages write DeliveryReportURL, the seed's table DelivaryReportURL.
            params["DeliveryReportURL"] = params["DelivaryReportURL"] = message.callback_url
        answer = self._request("GET", self.url, params=params)
        root = self._read(answer.status, answer.body)
        code_text = _child(root, "Code") or ""
        if not code_text.isdigit():
            raise TransientError("Ozeki's answer carries no result code")
        code = int(code_text)
        if code != 200:
            raise _error(code)
        return Accepted(provider_message_id=_child(root, "SmsId") or None, parts=parts)

    def _read(self, status: int, body: bytes) -> Element:
        if status >= 500:
            raise TransientError(f"Ozeki is unavailable (HTTP {status})")
        try:
            return parse_answer(body)
        except ValueError:
            if status in (401, 403, 404, 405) or 300 <= status < 400:
                raise AccountError(f"Ozeki refused the request with HTTP {status}: check SMS_OZEKI_URL "
                                   "and the HTTP API's settings") from None
            raise TransientError(f"Ozeki gave an answer we cannot read (HTTP {status})") from None



def _error(code: int) -> ProviderError:
    if code in CODES:
        kind, words = CODES[code]
        return kind(words)
    if 700 <= code < 800:
        return AccountError(f"Ozeki reports a configuration error (code {code}): check its SMS set-up")
    return TransientError(f"Ozeki answered with an unknown code {code}")


def parse_report(fields: Mapping[str, str]) -> DeliveryReport:
    """Turn the fields of an Ozeki delivery-report request into a `DeliveryReport`.

    `SmsId` becomes `provider_message_id` (the caller knows our row from the signed URL). The outcome
    comes from `Delivered` if present, else from the status word in `DeliveryStatus`, `Status` or `State`.
    An undelivered report's reason names Ozeki's status word only (letters, never free text, so never a
    number). Raises `ValueError` for anything that is not a well-formed SMS delivery report.
    """
    name = fields.get("NotificationName")
    if name is not None and name.strip().lower() != "smsdeliveryreport":
        raise ValueError("not an SMS delivery report")
    sms_id = (fields.get("SmsId") or "").strip()
    if not sms_id or len(sms_id) > 100:
        raise ValueError("the report carries no SmsId")
    word = next((fields[key].strip() for key in ("DeliveryStatus", "Status", "State")
                 if fields.get(key, "").strip()), "")
    delivered = (fields.get("Delivered") or "").strip().lower()
    if delivered in _TRUE:
        outcome = "delivered"
    elif delivered in _FALSE:
        outcome = "undelivered"
    elif delivered:
        raise ValueError("unreadable Delivered value")
    else:
        outcome = _STATUS_WORDS.get(word.lower().replace(" ", "").replace("_", ""))
        if outcome is None:
            raise ValueError("no delivery outcome in the report")
    reason = ""
    if outcome == "undelivered":
        shown = word if _WORD.fullmatch(word) else ""
        reason = "Ozeki reported the message undelivered" + (f" ({shown})" if shown else "")
    return DeliveryReport(outcome=outcome, provider_message_id=sms_id, reason=reason)
