"""Text rules shared by the providers: what of a text is sent, how many parts it takes, and how numbers and
provider words are quoted to operators.

`sendable_text` is the part of a text a recipient gets: what comes before the comment separator
(`"\n~~~\n"`, see `providers.smsc_text`) is the message, what follows is a note for the call centre that
no recipient ever sees and no provider counts. Mobilgroup, Accolades and Ozeki are sent that part only;
smsc.ru gets the whole text (its server strips the comment and shows it in the account's history). A text
starting with one of smsc.ru's channel prefixes (`__VIBER__:` …) is not an SMS: only smsc.ru may take it.

`count_parts` counts parts the way the networks do (GSM-7: 160 characters in one part, 153 per part when
concatenated, extension characters `€[]{}\\^~|` counting double; anything outside GSM-7 goes as UCS-2:
70, or 67 per part), with the GSM 03.38 table of `providers.smsc_text`, which encodes smsc.ru's texts.
`redact` makes a provider's free text fit for asterCC's `error_msg`, which operators read and which must
never show a phone number; `mask` quotes what someone typed (a target) with its number masked, for
`error_msg` and logs alike.
"""
from __future__ import annotations

import re

from providers.base import OutgoingMessage, PermanentError
from providers.smsc_text import COMMENT_SEPARATOR, channel_of, sms_count

_LONG_DIGITS = re.compile(r"\+?\d[\d \-]{4,}\d")
_REASON_MAX = 200
_QUOTE_MAX = 40
_SHOWN_DIGITS = 2
"""`mask` shows this many digits at each end of a number of 8 digits or more, and no digit of a shorter one."""


def sendable_text(text: str) -> str:
    """The part of `text` a recipient gets (before the comment separator), or `PermanentError` when there is
    nothing to send or the text is one of smsc.ru's channel messages, which only smsc.ru can take."""
    if not text or not text.strip():
        raise PermanentError("the message text is empty")
    channel = channel_of(text)
    if channel:
        raise PermanentError(f"the text starts with smsc.ru's {channel} channel prefix, which only smsc.ru "
                             "can send")
    body = text.partition(COMMENT_SEPARATOR)[0]
    if not body.strip():
        raise PermanentError("nothing to send: the text holds only a comment (after a ~~~ line)")
    return body


def count_parts(text: str, max_parts: int) -> int:
    """How many SMS parts `text` (a `sendable_text`) takes; `PermanentError` if more than `max_parts`."""
    parts = sms_count(text)
    if parts > max_parts:
        raise PermanentError(f"the message text is too long: {parts} SMS parts, at most {max_parts} allowed")
    return parts


def check_parts(message: OutgoingMessage, max_parts: int) -> int:
    """`PermanentError` unless the recipient is international digits and the sendable text (`sendable_text`)
    fits `max_parts` parts; else the number of parts."""
    check_recipient(message.recipient)
    return count_parts(sendable_text(message.text), max_parts)


def check_recipient(recipient: str) -> None:
    """`PermanentError` unless `recipient` is international digits (what `OutgoingMessage` promises)."""
    if not (recipient.isascii() and recipient.isdigit() and 6 <= len(recipient) <= 15):
        raise PermanentError("the recipient number must be 6 to 15 digits in international format")


def redact(text: object) -> str:
    """A provider's free text, safe for `error_msg`: whitespace folded, digit runs that could be a phone
    number masked, length capped."""
    return _LONG_DIGITS.sub("…", " ".join(str(text).split()))[:_REASON_MAX]


def mask(typed: object) -> str:
    """What someone typed, fit to quote to an operator or in a log line: whitespace and control characters
    folded to single spaces, every digit but the first two and the last two replaced by `*` (every digit of
    what holds fewer than 8), at most 40 characters. `+7 903 555-00-13` becomes `+7 9** ***-**-13`."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in str(typed)).split())
    places = [i for i, ch in enumerate(text) if ch.isdigit()]
    hidden = set(places[_SHOWN_DIGITS:-_SHOWN_DIGITS] if len(places) >= 8 else places)
    masked = "".join("*" if i in hidden else ch for i, ch in enumerate(text))
    return masked if len(masked) <= _QUOTE_MAX else masked[:_QUOTE_MAX - 1] + "…"
