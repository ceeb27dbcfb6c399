"""Text rules shared by the HTTP providers that bill by SMS part (Accolades, Ozeki).

`count_parts` counts parts the way the networks do (GSM-7: 160 characters in one part, 153 per part when
concatenated, extension characters `€[]{}\\^~|` counting double; anything outside GSM-7 goes as UCS-2:
70, or 67 per part), with the GSM 03.38 table of `providers.smsc_text`, which encodes smsc.ru's texts.
`redact` makes a provider's free text fit for asterCC's `error_msg`, which operators read and which must
never show a phone number.
"""
from __future__ import annotations

import re

from providers.base import OutgoingMessage, PermanentError
from providers.smsc_text import sms_count

_LONG_DIGITS = re.compile(r"\+?\d[\d \-]{4,}\d")
_REASON_MAX = 200


def count_parts(text: str, max_parts: int) -> int:
    """How many SMS parts `text` takes; `PermanentError` if it is empty or needs more than `max_parts`."""
    if not text or not text.strip():
        raise PermanentError("the message text is empty")
    parts = sms_count(text)
    if parts > max_parts:
        raise PermanentError(f"the message text is too long: {parts} SMS parts, at most {max_parts} allowed")
    return parts


def check_parts(message: OutgoingMessage, max_parts: int) -> int:
    """`PermanentError` unless the recipient is international digits and the text fits `max_parts` parts;
    else the number of parts."""
    check_recipient(message.recipient)
    return count_parts(message.text, max_parts)


def check_recipient(recipient: str) -> None:
    """`PermanentError` unless `recipient` is international digits (what `OutgoingMessage` promises)."""
    if not (recipient.isascii() and recipient.isdigit() and 6 <= len(recipient) <= 15):
        raise PermanentError("the recipient number must be 6 to 15 digits in international format")


def redact(text: object) -> str:
    """A provider's free text, safe for `error_msg`: whitespace folded, digit runs that could be a phone
    number masked, length capped."""
    return _LONG_DIGITS.sub("…", " ".join(str(text).split()))[:_REASON_MAX]
