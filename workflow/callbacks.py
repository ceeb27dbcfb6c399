"""Signed callback URLs for the providers that report delivery by calling us back (Accolades, Ozeki).

`callback_url` builds `{SMS_PUBLIC_URL}/reports/{provider}/{token}` for one attempt of one send of a row;
the token carries the row id, the row's resend count at that send, the attempt (the send's fencing token,
`sms_dispatch.attempts`), the time it was issued, and an HMAC-SHA256 over
them keyed with the first key of `SMS_WEBHOOK_SECRET` and salted with the provider's name, so it cannot be
forged, altered to name another row or send, or moved to another provider's route. `verify_token` gives
row, send and attempt back, or raises `BadToken`.

Tokens expire `SMS_WEBHOOK_TOKEN_TTL_S` after they were issued (longer than the report timeout, after which
nobody waits for the report). Every key of `SMS_WEBHOOK_SECRET` verifies, so a key is rotated by putting a
new one first and dropping the old one once the TTL has passed.

Tokens issued before they carried a time never expire by themselves: they are accepted while signed with
the signing (first) key, so the first rotation retires them. A token is a capability for its one row, so
the webhook app never logs it.
"""
from __future__ import annotations

import hashlib
import time
from typing import NamedTuple

from itsdangerous import BadSignature, URLSafeSerializer, URLSafeTimedSerializer

from providers import registry
from settings import Settings

WEBHOOK_PROVIDERS = registry.reporting_by("webhook")


class BadToken(Exception):
    """The token was not signed by us for this provider (forged, altered, or another provider's), or it
    has expired."""


class CallbackFor(NamedTuple):
    """What a verified token was issued for: a row, which send of it (`resends`) and which attempt of that
    send (`attempt`); None in tokens issued before they carried it, which then stand for whichever send or
    attempt the row is on."""

    row_id: int
    resends: int | None
    attempt: int | None


def _serializer(settings: Settings, provider: str, *, timed: bool = True):
    """The signer of `provider`'s tokens (None without keys). itsdangerous signs with the last key of its
    list and verifies with all; ours lists the signing key first. Tokens without a time verify with the
    signing key only."""
    keys = settings.webhook_keys
    if not keys:
        return None
    kind, keys = (URLSafeTimedSerializer, keys[::-1]) if timed else (URLSafeSerializer, keys[0])
    return kind(keys, salt=f"sms-report:{provider}", signer_kwargs={"digest_method": hashlib.sha256})


def callback_url(settings: Settings, provider: str, reference: int, resends: int, *, attempt: int) -> str | None:
    """Where `provider` should report on attempt `attempt` of row `reference`'s send after `resends`
    operator resends, or None when `SMS_PUBLIC_URL` or `SMS_WEBHOOK_SECRET` is unset (the message is then
    sent without a callback)."""
    if provider not in WEBHOOK_PROVIDERS:
        raise ValueError(f"{provider!r} does not report delivery by HTTP callback")
    serializer = _serializer(settings, provider)
    if serializer is None or not settings.public_url:
        return None
    token = serializer.dumps([int(reference), int(resends), int(attempt)])
    return f"{settings.public_url.rstrip('/')}/reports/{provider}/{token}"


def verify_token(settings: Settings, provider: str, token: str) -> CallbackFor:
    """The row, send and attempt that `token` was issued for on `provider`'s route; `BadToken` otherwise,
    and when it was issued more than `SMS_WEBHOOK_TOKEN_TTL_S` ago."""
    serializer = _serializer(settings, provider)
    if serializer is None or provider not in WEBHOOK_PROVIDERS:
        raise BadToken("no webhook secret is configured, or no such provider route")
    try:
        payload, issued = serializer.loads(token, return_timestamp=True)
    except BadSignature:
        payload = _untimed(settings, provider, token)
    else:
        # Measured here rather than by itsdangerous's `max_age`, which also refuses a token issued "in the
        # future": one from a worker whose clock runs a little ahead of this host's.
        if time.time() - issued.timestamp() > settings.token_ttl_s:
            raise BadToken("the token has expired")
    fields = payload if type(payload) is list and len(payload) in (2, 3) else [payload]
    reference, resends, attempt = fields + [None] * (3 - len(fields))
    if (type(reference) is not int or reference <= 0
            or not all(value is None or type(value) is int for value in (resends, attempt))):
        raise BadToken("the token does not name a row")
    return CallbackFor(reference, resends, attempt)


def _untimed(settings: Settings, provider: str, token: str):
    """The payload of a token issued before tokens carried a time (`payload.signature`)."""
    if token.count(".") != 1:
        raise BadToken("the token's signature does not match")
    try:
        return _serializer(settings, provider, timed=False).loads(token)
    except BadSignature:
        raise BadToken("the token's signature does not match") from None
