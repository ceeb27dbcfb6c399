"""Signed callback URLs for the providers that report delivery by calling us back (Accolades, Ozeki).

`callback_url` builds `{SMS_PUBLIC_URL}/reports/{provider}/{token}` for one send of a row; the token
carries the row id, the row's resend count at that send, and an HMAC-SHA256 over both keyed with
`SMS_WEBHOOK_SECRET` and salted with the provider's name, so it cannot be forged, altered to name another
row or send, or moved to another provider's route. `verify_token` gives both back or raises `BadToken`.

Tokens do not expire: a provider may report days later, and a replayed genuine report is harmless because
reports are applied forward-only. They are, however, a capability for their one row, so the webhook app
never logs them.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

from itsdangerous import BadSignature, URLSafeSerializer

from settings import Settings

WEBHOOK_PROVIDERS = ("accolades", "ozeki")


class BadToken(Exception):
    """The token was not signed by us for this provider (forged, altered, or another provider's)."""


class CallbackFor(NamedTuple):
    """What a verified token was issued for: a row, and which send of it (`resends`; None in tokens issued
    before they carried it, which then stand for whichever send the row is on)."""

    row_id: int
    resends: int | None


def _serializer(settings: Settings, provider: str) -> URLSafeSerializer | None:
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if not secret:
        return None
    return URLSafeSerializer(secret, salt=f"sms-report:{provider}",
                             signer_kwargs={"digest_method": hashlib.sha256})


def callback_url(settings: Settings, provider: str, reference: int, resends: int) -> str | None:
    """Where `provider` should report on row `reference`'s send after `resends` operator resends, or None
    when `SMS_PUBLIC_URL` or `SMS_WEBHOOK_SECRET` is unset (the message is then sent without a callback)."""
    if provider not in WEBHOOK_PROVIDERS:
        raise ValueError(f"{provider!r} does not report delivery by HTTP callback")
    serializer = _serializer(settings, provider)
    if serializer is None or not settings.public_url:
        return None
    token = serializer.dumps([int(reference), int(resends)])
    return f"{settings.public_url.rstrip('/')}/reports/{provider}/{token}"


def verify_token(settings: Settings, provider: str, token: str) -> CallbackFor:
    """The row and send that `token` was issued for on `provider`'s route; `BadToken` otherwise."""
    serializer = _serializer(settings, provider)
    if serializer is None or provider not in WEBHOOK_PROVIDERS:
        raise BadToken("no webhook secret is configured, or no such provider route")
    try:
        payload = serializer.loads(token)
    except BadSignature:
        raise BadToken("the token's signature does not match") from None
    reference, resends = payload if type(payload) is list and len(payload) == 2 else (payload, None)
    if type(reference) is not int or reference <= 0 or not (resends is None or type(resends) is int):
        raise BadToken("the token does not name a row")
    return CallbackFor(reference, resends)
