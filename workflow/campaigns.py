"""What applies to campaign rows only (a batch of more than one row; see `db.store.claim_due`): opt-outs by
reply and quiet hours at the recipient's. Single messages (an agent's, a batch of one) are never held.

Opt-out: a reply that is one of `SMS_OPTOUT_WORDS` (case, surrounding spaces and punctuation ignored) puts
its number in `sms_optout`; waiting campaign rows to it end `failed` at the next dispatch tick, before
any provider is called.

Quiet hours: `SMS_QUIET_HOURS` (`21:00-09:00`) is the recipient's local time, in the zone the number
belongs to (`phonenumbers.timezone`); where a number's zones differ in local time now (a Russian mobile may
be in any of eleven), `SMS_QUIET_HOURS_TZ`, by default the zone of most of the default region's numbering
areas (Europe/Moscow for RU). The arithmetic is zoneinfo's, so a window on a daylight-saving day is as long
as the clocks there make it.
"""
from __future__ import annotations

import collections
import functools
import unicodedata
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import timezone as number_zones
from phonenumbers.tzdata import TIMEZONE_DATA

from settings import Settings

OPERATOR = "smsctl"
"""The word recorded for a number an operator added with `smsctl optout add`."""


def _fold(text: str) -> str:
    """`text` compared as an opt-out word: punctuation and spaces around it dropped, case folded."""
    edge = "".join(ch for ch in {*text} if unicodedata.category(ch)[0] in "PZSC")
    return text.strip().strip(edge).casefold()


def optout_word(reply: str, words: list[str]) -> str | None:
    """The word of `words` (as `SMS_OPTOUT_WORDS` spells it) that `reply` is, or None: `stop`, ` Stop! ` and
    `«СТОП».` are STOP and СТОП; `stop it` and `don't stop` are no opt-out."""
    folded = _fold(reply)
    return next((word for word in words if _fold(word) == folded), None) if folded else None


def optout_reason(word: str, opted_on: date) -> str:
    """What a campaign row to an opted-out number ends `failed` with, in asterCC's `error_msg`."""
    if word == OPERATOR:
        return f"the recipient is on the opt-out list (added by an operator on {opted_on:%Y-%m-%d})"
    return f"the recipient opted out by replying {word} on {opted_on:%Y-%m-%d}"


# --- quiet hours ----------------------------------------------------------------------------------

def recipient_zone(recipient: str, settings: Settings) -> str:
    """The zoneinfo key of the recipient's local time: the number's zone, or (its zones differ in local
    time now, or none is known) `SMS_QUIET_HOURS_TZ`, by default the default region's main zone.
    `recipient` is international digits without `+` (`workflow.routing.normalise`)."""
    zones = number_zones.time_zones_for_number(phonenumbers.parse("+" + recipient))
    now = datetime.now(timezone.utc)
    known = [z for z in zones if z != number_zones.UNKNOWN_TIMEZONE]
    if known and len({now.astimezone(ZoneInfo(z)).utcoffset() for z in known}) == 1:
        return known[0]
    return settings.quiet_hours_tz or main_zone(settings.default_region)


@functools.lru_cache(maxsize=None)
def main_zone(region: str) -> str:
    """The zone of most of `region`'s numbering areas in libphonenumber's data (Europe/Moscow for RU,
    Europe/Bucharest for RO); UTC when it has none."""
    code = str(phonenumbers.country_code_for_region(region))
    areas: collections.Counter[str] = collections.Counter()
    for prefix, zones in TIMEZONE_DATA.items():
        if prefix.startswith(code) and len(zones) == 1 and _area_of(prefix, region, code):
            areas[zones[0]] += 1
    return areas.most_common(1)[0][0] if areas else "UTC"


def _area_of(prefix: str, region: str, code: str) -> bool:
    """Whether numbers starting with `prefix` are `region`'s. Countries share some calling codes (RU and KZ
    share +7): the code's main region takes them all; another region only its own valid numbers."""
    if phonenumbers.region_code_for_country_code(int(code)) == region:
        return True
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse("+" + prefix.ljust(11, "0"))) == region
    except phonenumbers.NumberParseException:
        return False


def quiet_left_s(zone: str, window: tuple[time, time], now: datetime) -> float | None:
    """Seconds from `now` (aware) until the quiet `window` (start, end; local wall times, the end may be past
    midnight) ends in `zone`, or None when it is not quiet there now. The end is the first instant the
    clocks of `zone` show the end time (an end that a spring-forward skips is read as before the change,
    so it falls as late as the gap is long)."""
    start, end = window
    local = now.astimezone(ZoneInfo(zone))
    wall = local.time().replace(tzinfo=None)
    inside = start <= wall < end if start < end else (wall >= start or wall < end)
    if not inside:
        return None
    day = local.date() if wall < end else local.date() + timedelta(days=1)
    ends = datetime.combine(day, end, tzinfo=ZoneInfo(zone))
    return (ends.astimezone(timezone.utc) - now.astimezone(timezone.utc)).total_seconds()
