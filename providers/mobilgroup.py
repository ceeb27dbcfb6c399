"""Mobilgroup's XML-over-HTTP API (`extxml.php`): send one SMS, poll its delivery status, read the balance.

The request is raw XML in windows-1251, POSTed as `application/xml`; the answer is XML wrapped in
`<response>` with `<result>` OK/ERROR and an `<error>` code (see `PROVIDERS.md`, seed `003`). Our request
`id` is the asterCC row id, so a resend after a lost answer is answered with error 7 ("already sent"),
which means the first attempt arrived: `send` raises `AlreadySentUnconfirmed`, and `confirm_already_sent`
(a status request) tells whether the request under that id is ours.

The provider's answers are not well-formed XML as its document prints them (`<id>1</ id>`,
`</response >`, line breaks inside values). `parse_answer` repairs exactly those defects, then parses
with defusedxml with every DTD forbidden, so an answer carrying a DOCTYPE or entity declaration is refused
(`TransientError`) without expanding anything.

HTTP outcomes: network errors, timeouts, 5xx, 408 and unreadable answers are `TransientError` (a resend
is safe thanks to error 7). 429 is `ThrottledError` (honouring `Retry-After`). Redirects are not followed
(a redirected POST may arrive as a GET and fail every message) and, like 401, 403, 404 and 405, they
mean the configured URL or the account's access is wrong for every message: `AccountError`. Any other
4xx is `TransientError`: the seed defines no HTTP-level errors, so we cannot tell that this message, rather
than something in between, is at fault.
"""
from __future__ import annotations

import re
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

import defusedxml.ElementTree as safe_xml
import requests
from defusedxml import DefusedXmlException

from providers.base import (
    Accepted,
    AccountError,
    AlreadySentUnconfirmed,
    LoginRefused,
    DeliveryReport,
    OutgoingMessage,
    PermanentError,
    ThrottledError,
    TransientError,
)
from providers.http import Answer, HttpClient, retry_after
from providers.text import sendable_text

TRANSLIT_LIMIT = 140
"""Characters allowed with `rus_sms` 0 (the provider transliterates the text)."""
UNICODE_LIMIT = 64
"""Characters allowed with `rus_sms` 1 (sent as Unicode)."""
MAX_VALID_HOURS = 48


class NoSuchRequestError(PermanentError):
    """Error 12: the provider has no request with this id (it never arrived, or was never sent)."""


class AlreadySentError(PermanentError):
    """Error 7: the provider already has a request with this id. `send` turns it into success; any
    other command treats it as the `PermanentError` it is."""


ERRORS: dict[int, tuple] = {
    1: (PermanentError, "the provider could not parse the request"),
    # 2 and 6 cannot come from one message's content (every request carries every mandatory field, and
    # the command is ours): the URL or the API's version is wrong for every message. Pause, do not fail.
    2: (AccountError, "the provider says a mandatory parameter is missing (check SMS_MOBILGROUP_URL)", False),
    3: (LoginRefused, "the provider does not know the client id (check SMS_MOBILGROUP_USER_ID)"),
    4: (LoginRefused, "the provider rejected the login or password (check SMS_MOBILGROUP_USER and "
                      "SMS_MOBILGROUP_PASSWORD)"),
    5: (AccountError, "the account is blocked by the provider"),
    6: (AccountError, "the provider does not know the command (check SMS_MOBILGROUP_URL)", False),
    7: (AlreadySentError, "the provider already has a request with this id"),
    8: (PermanentError, "the provider rejected the recipient number"),
    9: (AccountError, "not enough money on the account"),
    10: (PermanentError, "the message is too long for the provider"),
    11: (PermanentError, "the provider rejected the schedule time"),
    12: (NoSuchRequestError, "the provider has no request with this id"),
}
"""Mobilgroup error code -> (what we raise, operator-readable words[, whether an account error is one by
nature: 2 and 6 could only be the account's, but a message that somehow breaks the request could meet them
too, so they pause the account only once several messages meet them])."""

DEST_STATUSES: dict[str, tuple[str, str]] = {
    "0": ("accepted", ""),
    "1": ("delivered", ""),
    "2": ("undelivered", "not delivered: unreachable, lifetime expired, or subscriber blocked"),
    "8": ("accepted", ""),
    "16": ("undelivered", "provider error"),
}
"""Per-recipient status (`extended=1`) -> (DeliveryReport outcome, reason). 0 queued, 8 sent."""

_SENDER = re.compile(r"[A-Za-z0-9 -]{1,9}")
_DIGITS = re.compile(r"[0-9]+")
# Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_DECLARED_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
# The seed's answers close tags with blanks inside: `</ id>`, `</response >`.
_LOOSE_END_TAG = re.compile(r"</\s*([A-Za-z_][\w.-]*)\s*>")


def parse_answer(body: bytes) -> Element:
    """Parse a Mobilgroup answer as the seed prints them; raise `TransientError` if it is unreadable or
    declares a DTD or entities (refused, never expanded)."""
    match = _DECLARED_ENCODING.match(body)
    try:
        text = body.decode(match.group(1).decode("ascii") if match else "windows-1251")
    except (LookupError, UnicodeDecodeError) as exc:
        raise TransientError("unreadable answer from Mobilgroup (bad encoding)") from exc
    try:
        root = safe_xml.fromstring(_LOOSE_END_TAG.sub(r"</\1>", text.strip()), forbid_dtd=True)
    except DefusedXmlException as exc:
        raise TransientError("Mobilgroup's answer declares a DTD or entities; refused") from exc
    except ParseError as exc:
        raise TransientError("unreadable answer from Mobilgroup (not XML)") from exc
    if root.tag != "response":
        raise TransientError("unreadable answer from Mobilgroup (no <response>)")
    return root


def _value(element: Element, tag: str) -> str | None:
    """The text of `element`'s child `tag`, with the seed's stray blanks and line breaks collapsed."""
    child = element.find(tag)
    if child is None:
        return None
    return " ".join((child.text or "").split())


RESEND_STRIDE = 10**10
"""Above any asterCC row id (`int(11)`): the n-th resend of row r goes to Mobilgroup as r + n·10^10."""
PREFIX_STRIDE = 10**12
"""A deployment's id prefix stands above every row id and resend count."""


def request_id(prefix: str | None, row_id: int, resends: int) -> int:
    """The `id` of our request for a row. Mobilgroup refuses a second request with the same `id` (error 7),
    which is how a retry after a lost answer is recognised; an operator's resend must therefore go under a
    new id, and a second deployment on the same account under ids of its own (`prefix`, digits)."""
    return (int(prefix) if prefix else 0) * PREFIX_STRIDE + row_id + resends * RESEND_STRIDE


class MobilgroupClient(HttpClient):
    """A client for one Mobilgroup account. Configuration is validated here (`ValueError`).

    `unicode` is the `rus_sms` flag: "0" transliterates (140 characters), "1" sends Unicode (64),
    "auto" sends Unicode when the text has non-ASCII characters and fits 64, else transliterated.
    `unicode_tag` names the flag's XML tag: the seed's table says `rus_sms`, its sample `translit`.
    `password` is plain text; it goes into request bodies only. A `session` passed in stays the caller's
    to close; otherwise `close()` closes the client's own.
    """

    name = "mobilgroup"
    label = "Mobilgroup"

    def __init__(self, *, url: str, user_id: str, user: str, password: str, sender: str | None = None,
                 valid_hours: int = 1, unicode: str = "auto", unicode_tag: str = "rus_sms",
                 timeout: float = 15.0, session: requests.Session | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError("Mobilgroup URL must start with http:// or https://")
        if not _DIGITS.fullmatch(str(user_id)):
            raise ValueError("Mobilgroup user_id must be digits")
        if not user:
            raise ValueError("Mobilgroup user (login) must not be empty")
        if not password:
            raise ValueError("Mobilgroup password must not be empty")
        if sender and not _SENDER.fullmatch(sender):
            raise ValueError("Mobilgroup sender must be at most 9 Latin letters, digits, spaces or hyphens")
        if isinstance(valid_hours, bool) or not isinstance(valid_hours, int) \
                or not 1 <= valid_hours <= MAX_VALID_HOURS:
            raise ValueError(f"Mobilgroup valid_hours must be a whole number from 1 to {MAX_VALID_HOURS}")
        if unicode not in ("auto", "0", "1"):
            raise ValueError('Mobilgroup unicode must be "auto", "0" or "1"')
        if unicode_tag not in ("rus_sms", "translit"):
            raise ValueError('Mobilgroup unicode_tag must be "rus_sms" or "translit"')
        if not timeout > 0:
            raise ValueError("Mobilgroup timeout must be positive")
        super().__init__(timeout=timeout, session=session)
        self.url = url
        self.user_id = str(user_id)
        self.user = user
        self._password = password
        self.sender = sender or None
        self.valid_hours = valid_hours
        self.unicode = unicode
        self.unicode_tag = unicode_tag

    def __repr__(self) -> str:
        return f"MobilgroupClient(url={self.url!r}, user_id={self.user_id!r}, user={self.user!r})"

    def check(self, message: OutgoingMessage) -> int:
        """Raise `PermanentError` if Mobilgroup cannot take `message`; else return 1 (one SMS)."""
        self._unicode_flag(message)
        return 1

    def _unicode_flag(self, message: OutgoingMessage) -> str:
        """The `rus_sms` value for `message`, or `PermanentError` saying why it cannot be sent."""
        if not _DIGITS.fullmatch(message.recipient):
            raise PermanentError("the recipient number must be digits only, in international format")
        text = sendable_text(message.text)
        if _NOT_XML.search(text):
            raise PermanentError("the message text contains a control character that cannot be sent")
        if self.unicode == "1":
            if len(text) > UNICODE_LIMIT:
                raise PermanentError(f"the message is too long: {len(text)} characters, at most "
                                     f"{UNICODE_LIMIT} when sent in Unicode")
            return "1"
        if self.unicode == "auto" and not text.isascii() and len(text) <= UNICODE_LIMIT:
            return "1"
        if len(text) > TRANSLIT_LIMIT:
            raise PermanentError(f"the message is too long: {len(text)} characters, at most "
                                 f"{TRANSLIT_LIMIT} (or {UNICODE_LIMIT} in Unicode)")
        return "0"

    def send(self, message: OutgoingMessage) -> Accepted:
        """Send `message` (its text without the comment) with our row id as the request id. A resend of an
        id the provider already has (error 7) raises `AlreadySentUnconfirmed`: never send it again, confirm
        with `confirm_already_sent` that the request under that id is to this recipient. The confirmation is
        a request of its own, which the caller makes once it has a rate-limit slot for it."""
        fields = [("phone", message.recipient), ("message", sendable_text(message.text)),
                  ("id", str(message.reference))]
        if self.sender:
            fields.append(("sender", self.sender))
        fields += [(self.unicode_tag, self._unicode_flag(message)), ("valid", str(self.valid_hours))]
        try:
            self._call("send", fields, expect_id=message.reference)
        except AlreadySentError:
            raise AlreadySentUnconfirmed("Mobilgroup already has this request; it is ours once a status request "
                                         "confirms it") from None
        return Accepted(provider_message_id=str(message.reference))

    def confirm_already_sent(self, message: OutgoingMessage) -> None:
        """Error 7 says the provider has a request under this id; it is ours only if that request went to
        this recipient. Another sender on the account using the same ids (a staging copy, a second
        deployment without its own `SMS_MOBILGROUP_ID_PREFIX`), or ids used again after our records were
        pruned, would otherwise pass for a message that was sent. Raises `PermanentError` for another
        recipient's request, `TransientError` when the provider cannot say (ask again later)."""
        try:
            ours = self.holds_request_for(message.reference, message.recipient)
        except PermanentError:  # a refused status request says nothing about the request under this id
            ours = None
        if ours is None:  # error 12 right after error 7: the provider contradicts itself
            raise TransientError("Mobilgroup said it already had this request id, then that it has none")
        if not ours:
            raise PermanentError(f"Mobilgroup already has request id {message.reference} for another number: "
                                 "another sender on this account uses the same ids (give each deployment its "
                                 "own SMS_MOBILGROUP_ID_PREFIX); not sent")

    def status(self, reference: int) -> DeliveryReport:
        """Ask what became of the request `reference` (ask once its lifetime has passed, as the provider
        wishes). We send one recipient per request, so the first `<dest>` is the message's; without one,
        the report is `accepted` (no detail yet). Raises `PermanentError` if the provider has no such
        request (error 12)."""
        answer = self._call("status", [("id", str(reference)), ("extended", "1")], expect_id=reference)
        dest = answer.find("extended/dest")
        extra = {"status": _value(answer, "status") or ""}
        if dest is None:
            outcome, reason = "accepted", ""
        else:
            code = _value(dest, "status") or ""
            outcome, reason = DEST_STATUSES.get(code, ("accepted", ""))
            extra.update(dest_status=code, time=_value(dest, "time") or "")
        return DeliveryReport(outcome=outcome, reference=reference, provider_message_id=str(reference),
                              reason=reason, extra=extra)

    def holds_request_for(self, reference: int, recipient: str) -> bool | None:
        """Whether the provider's request under `reference` is one to `recipient` (digits): True when it is,
        or when its answer names no one (it has the request, no detail yet); False when it names another
        number; None when it has no request under that id (error 12), so that a send whose answer never
        came is known not to have arrived. One status request. Raises `ProviderError` when it cannot say."""
        try:
            answer = self._call("status", [("id", str(reference)), ("extended", "1")], expect_id=reference)
        except NoSuchRequestError:
            return None
        phone = _value(answer, "extended/dest/phone")
        return phone is None or re.sub(r"\D", "", phone) == recipient

    def balance(self) -> str:
        """The account balance as the provider writes it."""
        balance = _value(self._call("balance", []), "balance")
        if not balance:
            raise TransientError("unreadable answer from Mobilgroup (no balance)")
        return balance

    def _request_body(self, command: str, fields: list[tuple[str, str]]) -> bytes:
        lines = [f"<{tag}>{escape(value)}</{tag}>" for tag, value in
                 [("user_id", self.user_id), ("user", self.user), ("pwd", self._password),
                  ("command", command), *fields]]
        xml = '<?xml version="1.0" encoding="windows-1251"?>\n<request>\n' + "\n".join(lines) + "\n</request>\n"
        return xml.encode("windows-1251", errors="xmlcharrefreplace")

    def _call(self, command: str, fields: list[tuple[str, str]], expect_id: int | None = None) -> Element:
        """POST one command; return the parsed answer or raise the `ProviderError` its outcome means."""
        reply = self._request("POST", self.url, data=self._request_body(command, fields),
                              headers={"Content-Type": "application/xml", "Accept": "*/*"})
        _raise_for_http_status(reply)
        answer = parse_answer(reply.body)
        code_text = _value(answer, "error") or "0"
        if not _DIGITS.fullmatch(code_text):
            raise TransientError("unreadable answer from Mobilgroup (bad error code)")
        code = int(code_text)
        if code:
            kind, words, *nature = ERRORS.get(code, (TransientError, "unknown error"))
            if issubclass(kind, AccountError):
                raise kind(f"Mobilgroup error {code}: {words}", by_nature=nature[0] if nature else True)
            raise kind(f"Mobilgroup error {code}: {words}")
        if _value(answer, "result") != "OK":
            raise TransientError("unreadable answer from Mobilgroup (result is not OK)")
        answered_id = _value(answer, "id")
        if expect_id is not None and answered_id and answered_id != str(expect_id):
            raise TransientError("Mobilgroup answered for another request id")
        return answer


def _raise_for_http_status(response: Answer) -> None:
    status = response.status
    if status == 200:
        return
    if 300 <= status < 400:
        raise AccountError(f"Mobilgroup URL redirects (HTTP {status}) to "
                           f"{response.headers.get('Location', 'elsewhere')}; set SMS_MOBILGROUP_URL to "
                           "the final address")
    if status in (401, 403):
        raise AccountError(f"Mobilgroup refused access (HTTP {status})")
    if status in (404, 405):
        raise AccountError(f"Mobilgroup URL is wrong (HTTP {status}); check SMS_MOBILGROUP_URL")
    if status == 429:
        raise ThrottledError("Mobilgroup asks us to slow down (HTTP 429)",
                             retry_after=retry_after(response.headers.get("Retry-After")))
    raise TransientError(f"Mobilgroup answered HTTP {status}")
