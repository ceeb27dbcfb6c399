"""A provider's `Retry-After` cannot park a row for days or make it retry in a tight loop: every value a
provider (or a proxy in front of it) can send is held between 1 s and an hour."""
from __future__ import annotations

import email.utils

import pytest

from providers.http import RETRY_AFTER_BOUNDS_S, retry_after

NOW = 1_800_000_000.0


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(NOW + offset_s, usegmt=True)


@pytest.mark.parametrize("header, seconds", [
    (None, 60.0),                        # absent: a minute
    ("", 60.0),
    ("30", 30.0),
    (" 17 ", 17.0),
    ("2.5", 2.5),
    ("0", 1.0),                          # "now" would retry in a tight loop
    ("-5", 1.0),
    ("nan", 60.0),                       # unreadable: a minute, never NaN
    ("NaN", 60.0),
    ("inf", 3600.0),
    ("-inf", 1.0),
    ("1e400", 3600.0),
    ("864000", 3600.0),                  # ten days
    ("soon", 60.0),
    ("\x00\xff", 60.0),
    (http_date(120), 120.0),             # an HTTP-date two minutes ahead
    (http_date(-86_400), 1.0),           # a date in the past
    (http_date(30 * 86_400), 3600.0),    # a month ahead
    ("Fri, 31 Dec 9999 23:59:59 GMT", 3600.0),
    ("Mon, 01 Jan 0001 00:00:00 GMT", 1.0),
    ("Thu, 32 Foo 2026 99:99:99 GMT", 60.0),
], ids=repr)
def test_every_retry_after_is_bounded(header, seconds):
    assert retry_after(header, now=NOW) == seconds
    low, high = RETRY_AFTER_BOUNDS_S
    assert low <= retry_after(header) <= high
