"""Which number, through which provider: reading the number an agent typed, and prefix routing.

asterCC stores the target as an agent typed it. `normalise` accepts a phone number and nothing else:
ASCII digits with the usual separators (spaces, dashes, dots, brackets around digits) and at most one `+`,
at the start. Letters (the phone library would read them as keypad digits: `+7903IVANOVA` is someone's
real number), an extension, a second number, an e-mail address or a note are refused with a reason that
quotes what was typed, its digits masked (`providers.text.mask`). The digits are then read with Google's
libphonenumber rules (a national trunk prefix such as RU's `8` included) and must be a valid number of its
country's numbering plan, not merely of a possible length.

Digits typed without `+` are read in `SMS_DEFAULT_REGION` first and, when that is not a valid number
there, as international digits (`40712000042` from a deployment in RU is a Romanian mobile): asterCC and
Mobilgroup write numbers that way. Where both readings are valid, the default region's wins.

Last, the number must be in a country the deployment may send to (`SMS_ALLOWED_COUNTRIES`), a guard
against SMS pumping fraud. Everything here happens before any money is spent.
"""
from __future__ import annotations

import re
import unicodedata

import phonenumbers

from providers.text import mask
from settings import Settings


class InvalidNumber(ValueError):
    """The target cannot be a phone number; the message says why in an operator's words."""


_DIGITS = frozenset("0123456789")
_EXTENSION = re.compile(r"(ext|доб|x|#|;)\W*\d+\W*$", re.IGNORECASE)


def normalise(target: str, settings: Settings) -> str:
    """`target` as international digits without `+`, or `InvalidNumber` saying why it is not a phone number
    of a country `settings` allows."""
    number = _read(target, settings.default_region)
    allowed = settings.allowed_numbers
    if number not in allowed:
        raise InvalidNumber(f'the recipient "{mask(target)}" is in {_where(number)}, where this deployment '
                            f"does not send (SMS_ALLOWED_COUNTRIES: {allowed})")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def _read(target: str, region: str) -> phonenumbers.PhoneNumber:
    typed = (target or "").strip()
    if not typed:
        raise InvalidNumber("the recipient's phone number is empty")
    digits = _digits_of(typed)
    if typed.startswith("+"):
        number = _parse("+" + digits, None)
        if number is None:
            raise _not_a_number(typed, _no_such_number(digits))
        return number
    number = _parse(digits, region) or _parse("+" + digits, None)
    if number is None:
        raise _not_a_number(typed, f"it is neither a valid {region} number nor a valid international one")
    return number


def _not_a_number(typed: str, why: str) -> InvalidNumber:
    return InvalidNumber(f'the recipient "{mask(typed)}" is not a phone number: {why}')


def _parse(text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    """The number `text` reads as, if it is valid in its country's numbering plan."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    return number if phonenumbers.is_valid_number(number) else None


def _no_such_number(digits: str) -> str:
    """Why international `digits` are no number: an unknown country, or a number outside its plan."""
    try:
        number = phonenumbers.parse("+" + digits)
    except phonenumbers.NumberParseException:
        return "no country has such a calling code"
    return f"it is not a valid {_where(number)} number"


def _where(number: phonenumbers.PhoneNumber) -> str:
    """The country of `number` as an operator reads it: `GB`, or `+882` where the code names no country."""
    region = phonenumbers.region_code_for_number(number) \
        or phonenumbers.region_code_for_country_code(number.country_code)
    return region if region not in ("001", phonenumbers.UNKNOWN_REGION) else f"+{number.country_code}"


def _digits_of(typed: str) -> str:
    """The digits of a target made of digits and separators only, else `InvalidNumber` saying what else
    it holds."""
    if "@" in typed:
        raise _not_a_number(typed, "it looks like an e-mail address")
    if _EXTENSION.search(typed):
        raise _not_a_number(typed, "it has an extension, which an SMS cannot reach")
    if any(ch.isalpha() for ch in typed):
        raise _not_a_number(typed, "it contains letters")
    if "+" in typed[1:]:
        raise _not_a_number(typed, "it has a + after its start")
    if any(ch in ",/|\n\r" for ch in typed):
        raise _not_a_number(typed, "it holds more than one number")
    depth = 0
    for ch in typed:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif not (ch in _DIGITS or ch in ".+\t" or unicodedata.category(ch) in ("Zs", "Pd")):
            what = unicodedata.name(ch, "a control character").lower()
            raise _not_a_number(typed, f"it contains {what!r}")
        if depth not in (0, 1):
            raise _not_a_number(typed, "its brackets do not match")
    if depth:
        raise _not_a_number(typed, "its brackets do not match")
    return "".join(ch for ch in typed if ch in _DIGITS)


def route(recipient: str, settings: Settings) -> str:
    """The provider for an international number: the longest `SMS_ROUTES` prefix, else the default."""
    for prefix, provider in settings.route_table:
        if recipient.startswith(prefix):
            return provider
    if not settings.default_provider:
        raise RuntimeError("SMS_DEFAULT_PROVIDER is not set")
    return settings.default_provider
