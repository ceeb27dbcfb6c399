"""Which number, through which provider: phone-number normalisation and prefix routing.

asterCC stores the number as an agent typed it (`+`, spaces, dashes, a national `8` prefix…). A number is
normalised to international digits without `+` with Google's libphonenumber rules, assuming
`SMS_DEFAULT_REGION` for numbers typed without a country code. A number that cannot be a phone number
(wrong length for its country, letters) is refused here, before any money is spent.
"""
from __future__ import annotations

import phonenumbers

from settings import Settings


class InvalidNumber(ValueError):
    """The target cannot be a phone number; the message says why in an operator's words."""


def normalise(target: str, region: str) -> str:
    """`target` as international digits without `+`, or `InvalidNumber`."""
    if not target or not target.strip():
        raise InvalidNumber("the recipient's phone number is empty")
    try:
        number = phonenumbers.parse(target, region.upper())
    except phonenumbers.NumberParseException:
        raise InvalidNumber("the recipient's phone number cannot be read as a phone number") from None
    if not phonenumbers.is_possible_number(number):
        raise InvalidNumber("the recipient's phone number has the wrong length for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def route(recipient: str, settings: Settings) -> str:
    """The provider for an international number: the longest `SMS_ROUTES` prefix, else the default."""
    for prefix, provider in settings.route_table:
        if recipient.startswith(prefix):
            return provider
    if not settings.default_provider:
        raise RuntimeError("SMS_DEFAULT_PROVIDER is not set")
    return settings.default_provider
