"""Signed callback URLs for the providers that report delivery by calling us back (Accolades, Ozeki).

`callback_url` builds `{SMS_PUBLIC_URL}/reports/{provider}/{token}` for one row; the token carries the
row id and an HMAC-SHA256 over it keyed with `SMS_WEBHOOK_SECRET` and salted with the provider's name,
so it cannot be forged, altered to name another row, or moved to another provider's route.
`verify_token` gives the row id back or raises `BadToken`.

Tokens do not expire: a provider may report days later, and a replayed genuine report is harmless because
reports are applied forward-only. They are, however, a capability for their one row, so the webhook app
never logs them.
"""
from __future__ import annotations

import hashlib

from itsdangerous import BadSignature, URLSafeSerializer

from settings import Settings

WEBHOOK_PROVIDERS = ("accolades", "ozeki")


class BadToken(Exception):
    """The token was not signed by us for this provider (forged, altered, or another provider's)."""


def _serializer(settings: Settings, provider: str) -> URLSafeSerializer | None:
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if not secret:
        return None
    return URLSafeSerializer(secret, salt=f"sms-report:{provider}",
                             signer_kwargs={"digest_method": hashlib.sha256})


def callback_url(settings: Settings, provider: str, reference: int) -> str | None:
    """Where `provider` should report on row `reference`, or None when `SMS_PUBLIC_URL` or
    `SMS_WEBHOOK_SECRET` is unset (the message is then sent without a callback)."""
    if provider not in WEBHOOK_PROVIDERS:
        raise ValueError(f"{provider!r} does not report delivery by HTTP callback")
    serializer = _serializer(settings, provider)
    if serializer is None or not settings.public_url:
        return None
    return f"{settings.public_url.rstrip('/')}/reports/{provider}/{serializer.dumps(int(reference))}"


def verify_token(settings: Settings, provider: str, token: str) -> int:
    """The row id that `token` was issued for on `provider`'s route; `BadToken` otherwise."""
    serializer = _serializer(settings, provider)
    if serializer is None or provider not in WEBHOOK_PROVIDERS:
        raise BadToken("no webhook secret is configured, or no such provider route")
    try:
        reference = serializer.loads(token)
    except BadSignature:
        raise BadToken("the token's signature does not match") from None
    if type(reference) is not int or reference <= 0:
        raise BadToken("the token does not name a row")
    return reference
