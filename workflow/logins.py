"""Refused logins, for the whole fleet at once.

Providers count refused logins per address and shut it out after a few: smsc.ru blocks an address after 5
refused logins in 30 minutes, until its support lifts it; Accolades blacklists one for a while after too
many invalid requests (403.6). So the first refusal (`LoginRefused`) opens the provider's circuit in the
database with a fingerprint of the credentials refused, and from then on:

- no process logs in with those credentials (`gate`, called by the SMPP client before every bind), except
  the fleet's one probe, taken in the circuit (`db.store.take_probe`) by a dispatch tick or the receiver;
- probes are spaced by `retry_s`: `SMS_ACCOUNT_RETRY_S`, but never less than `SMS_LOGIN_RETRY_MIN_S`
  (620 s: at most 3 refused logins in any 30 minutes, and room for one more process refused in the same
  instant as the first);
- a process whose credentials have another fingerprint (fixed and restarted) may take the probe at once.

The fingerprint (`fingerprint`) is a keyed, slow hash of the provider's required settings, the key a random
one kept in `sms_meta`: it tells credentials apart without keeping anything a password could be read from.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from db import store
from providers import registry
from providers.base import LoginHeld, LoginRefused, TransientError

log = logging.getLogger(__name__)

KEY_NAME = "credentials_key"
"""`sms_meta` name of the deployment's random key of credential fingerprints."""


def retry_s(settings) -> float:
    """How long a circuit opened by a refused login stays shut before its next probe."""
    return max(settings.account_retry_s, settings.login_retry_min_s)


def fingerprint(engine: Engine, settings, provider: str) -> str:
    """A keyed hash of `provider`'s required settings (URL or host, account, password): equal for equal
    credentials, and nothing of the password can be read from it without the key, and slowly even so."""
    key = store.remember(engine, KEY_NAME, secrets.token_hex(16))
    values = []
    for name in registry.entry(provider).required:
        value = getattr(settings, name)
        values.append(value.get_secret_value() if hasattr(value, "get_secret_value") else str(value or ""))
    return hashlib.scrypt("\0".join(values).encode(), salt=key.encode(), n=2 ** 14, r=8, p=1, dklen=16).hex()


def alert_refused(provider: str, exc: LoginRefused, pause_s: float, *, probe: bool) -> None:
    """The `ALERT:` line of a refused login: what to fix, and when the credentials are tried again."""
    log.error("ALERT: %s refused our login%s: %s. Fix the credentials and restart the workers and the receiver: a "
              "process with other credentials tries them at once; these are tried again by one probe for the "
              "whole fleet in %.0f s (providers block an address after a few refused logins; smsc.ru after 5 "
              "in 30 minutes)", provider, " again (the probe)" if probe else "", exc, pause_s)


def gate(engine: Engine, provider: str) -> Callable[[], None]:
    """What a client calls before it logs in: raises `LoginHeld` while `provider`'s circuit holds a refused
    login and no probe is under way (the probe itself may log in), and `TransientError` when the circuit
    cannot be read (no login is risked blind). Read from the database each time, never from a cache: the
    refusal another process met a moment ago counts."""
    def check() -> None:
        try:
            state = store.breaker_states(engine).get(provider)
        except SQLAlchemyError as exc:
            raise TransientError(f"{provider}: the account circuit could not be read ({type(exc).__name__}); "
                                 "not logging in blind") from None
        if state is not None and state.open and state.refused_login and not state.probing:
            raise LoginHeld(f"{provider} refused our login ({state.reason}); not logging in until the fleet's "
                            f"probe in {state.open_for_s} s")
    return check


class ReceiverLogins:
    """The SMPP receiver's part in the circuit: it does not bind while the circuit holds its login refused,
    takes the fleet's one probe when that is due (or at once with other credentials), and reports what
    its binds met."""

    def __init__(self, engine: Engine, settings, provider: str):
        self.engine, self.settings, self.provider = engine, settings, provider
        self._fingerprint: str | None = None
        self.probing = False

    def wait_s(self) -> float:
        """0 when the receiver may bind now (it may then hold the fleet's probe), else how long to wait
        before asking again."""
        try:
            state = store.breaker_states(self.engine).get(self.provider)
            if state is None or not state.open or not state.refused_login:
                return 0.0
            if self._fingerprint is None:
                self._fingerprint = fingerprint(self.engine, self.settings, self.provider)
            changed = self._fingerprint != state.refused_login
            if (changed or state.open_for_s == 0) and not state.probing and store.take_probe(
                    self.engine, self.provider, self.settings.send_lease_s, credentials=self._fingerprint):
                self.probing = True
                log.warning("%s SMPP receiver: our login was refused (%s); this bind is the fleet's probe%s",
                            self.provider, state.reason, " (other credentials)" if changed else "")
                return 0.0
            return float(min(max(state.open_for_s, 5), 60))
        except SQLAlchemyError as exc:
            log.warning("%s SMPP receiver: the account circuit could not be read (%s); not binding blind",
                        self.provider, type(exc).__name__)
            return 5.0

    def refused(self, exc: LoginRefused) -> None:
        """The bind was refused for the login: the circuit opens (again) for the fleet."""
        pause = retry_s(self.settings)
        try:
            if self._fingerprint is None:
                self._fingerprint = fingerprint(self.engine, self.settings, self.provider)
            store.trip_breaker(self.engine, self.provider, pause, str(exc), refused_login=self._fingerprint)
        except SQLAlchemyError as db_exc:
            log.error("%s SMPP receiver: the refused login could not be recorded (%s)", self.provider,
                      type(db_exc).__name__)
        alert_refused(self.provider, exc, pause, probe=self.probing)
        self.probing = False

    def bound(self) -> None:
        """A bind went through: if it was the probe, the circuit closes and the waiting rows go."""
        if not self.probing:
            return
        self.probing = False
        try:
            if store.close_breaker(self.engine, self.provider):
                log.error("ALERT: %s accepts our login again (the receiver's probe bound): sending resumes",
                          self.provider)
        except SQLAlchemyError as exc:  # the probe's lease runs out, and the next probe decides
            log.warning("%s SMPP receiver: its probe bound, but the circuit could not be closed (%s)",
                        self.provider, type(exc).__name__)

    def failed(self) -> None:
        """A bind failed for another reason (a host that cannot be reached): a probe held goes back."""
        if self.probing:
            self.probing = False
            try:
                store.drop_probe(self.engine, self.provider)
            except SQLAlchemyError:  # its lease runs out instead
                pass
