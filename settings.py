"""Every setting of the dispatcher, read from the environment (or a `.env` file) and validated once.

`get_settings()` is the one entry point. A bad or missing value raises `ConfigError`, whose message names
the environment variable to fix; processes let it stop them at start-up. Secrets are `SecretStr`, and the
passwords in URLs are masked in `repr()` and `str()`, so they never appear in a log line or Flower. Start-up
refuses the example Flower login and weak webhook keys (see `.env.example`), and `startup_warnings()` names
what is allowed but unsafe.

The variable names are a contract with operators (see `../shared/DESIGN.md`, "Configuration contract"):
add new ones in the same style, never rename.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import os
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url as redis_url_parts
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from providers.registry import PROVIDERS, REGISTRY
from providers.smsc import MAX_PASSWORD_CHARS, MAX_SYSTEM_ID_CHARS, credential_problem
from providers.smsc_text import CHANNEL_PREFIXES, channel_name

ProviderName = Literal[PROVIDERS]

VAR_DIR = Path(os.environ.get("SMS_VAR_DIR", "var")).resolve()


URL_FIELDS = ("database_url", "broker_url", "redis_url")
"""Settings that are URLs and may carry a password."""

EXAMPLE_FLOWER_LOGIN = "admin:change-me"
EXAMPLE_WEBHOOK_SECRET = "change-me-to-64-random-characters-eg-openssl-rand-hex-32"
"""The placeholders of `.env.example`: anyone who read it knows them, so start-up refuses them."""
WEBHOOK_KEY_MIN_CHARS = 32
FLOWER_PASSWORD_MIN_CHARS = 12
OPTOUT_WORDS_DEFAULT = "STOP, СТОП, ОТПИСАТЬСЯ, UNSUBSCRIBE"
OPTOUT_WORD_MAX = 32
"""`sms_optout.word` holds this many characters."""


class ConfigError(RuntimeError):
    """A setting is missing or invalid; the message names the environment variable."""


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"SMS_{field.upper()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SMS_", env_file=".env", extra="ignore", populate_by_name=True, frozen=True
    )

    # --- storage and broker -------------------------------------------------------------------
    database_url: str = Field(default_factory=lambda: f"sqlite:///{VAR_DIR / 'sms.db'}")
    broker_url: str = Field(default="filesystem://", validation_alias="CELERY_BROKER_URL")
    redis_url: str | None = None
    """Redis for the fleet-wide rate limits; defaults to the broker when the broker is Redis."""
    redis_prefix: str = ""
    """Prefix of the broker's Redis keys (its queues): lets deployments share a Redis. The rate limits' keys
    do not carry it: a provider account's rate and identical-request rule are the account's, whoever sends."""
    throttle_prefix: str = ""
    """Prefix of the rate limits' Redis keys, which are per provider account: deployments sending through
    the same accounts must have the same (the default, none). Another only where one account name means two
    accounts (two Ozeki gateways with the same user name), or to keep test runs apart."""

    # --- routing ------------------------------------------------------------------------------
    default_provider: ProviderName | None = None
    routes: str = ""
    """Prefix routes such as `7=mobilgroup,40=accolades`; the longest matching prefix wins."""
    default_region: str = "RU"
    """Where a number typed without a country code is assumed to be (ISO 3166 code)."""
    failover: str = ""
    """Failover routes such as `mobilgroup:accolades,ozeki:accolades` (a provider, then the providers to
    try next, in order): while a provider is unavailable, its waiting rows go through the next available one."""
    failover_after_s: float = Field(default=60.0, gt=0)
    """How long every send to a provider must fail on the way there (refused, timeouts, 5xx) before it
    counts as unavailable (its circuit opens, as after an account error)."""
    allowed_countries: str = ""
    """Where numbers may be, as calling codes (`7,40`) or ISO codes (`RU,RO`): a guard against SMS pumping
    fraud. Empty: the countries `SMS_ROUTES` names and the default region (see `allowed_numbers`)."""

    # --- dispatch, retries, healing -----------------------------------------------------------
    dispatch_interval_s: float = Field(default=2.0, gt=0)
    dispatch_batch: int = Field(default=500, ge=1, le=10_000)
    retry_window_s: int = Field(default=3600, ge=0)
    """How long transient failures (network, 5xx) are retried before a message ends as `error`."""
    retry_base_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    account_retry_s: float = Field(default=300.0, gt=0)
    """Pause before retrying after an account-level error (bad credentials, blocked, no money)."""
    account_retry_window_s: int = Field(default=86_400, ge=0)
    """How long messages wait through account-level errors before they end as `error`."""
    login_retry_min_s: float = Field(default=620.0, gt=0)
    """The least pause between two tries of credentials a provider refused, whatever `SMS_ACCOUNT_RETRY_S`
    says: smsc.ru blocks an address after 5 refused logins in 30 minutes, and a little over 10 minutes apart
    (the circuit's times are whole seconds) makes at most 3 in any 30 minutes, leaving room for a second
    process refused in the same instant. Shorten it only to test."""
    unreachable_retry_s: float = Field(default=30.0, gt=0)
    """Pause before probing a provider that could not be reached (connection refused, timeouts, 5xx for
    `SMS_FAILOVER_AFTER_S`) again: short, so that its rows come back from the fallback within a minute."""
    send_lease_s: int = Field(default=180, ge=10)
    """A send not finished after this long is considered lost (worker killed) and is retried."""
    reap_interval_s: float = Field(default=60.0, gt=0)
    requeue_after_s: int = Field(default=600, ge=5)
    """A provider whose queued rows no worker has taken for this long is reported (`ALERT:`): is a worker
    consuming its queue?"""
    lost_task_s: int = Field(default=30, ge=5)
    """A queued row whose send task has not started this long after it was put in the broker is enqueued
    again (the broker lost it, or the worker that held it died); a twin that was only late does nothing."""
    max_age_s: int = Field(default=3 * 86_400, ge=60)
    """A row due longer ago than this is not sent: it ends `failed` ("expired")."""
    report_timeout_s: int = Field(default=3 * 86_400, ge=60)
    """Stop waiting for a delivery report after this long; the row keeps `success`."""
    http_timeout_s: float = Field(default=15.0, gt=0)
    """The longest a provider call may take, connecting and answering together (a total deadline)."""

    # --- campaigns (a batch of more than one row) ----------------------------------------------
    quiet_hours: str = ""
    """`21:00-09:00`: campaign rows wait while it is that time at the recipient's; empty: never."""
    quiet_hours_tz: str | None = None
    """The zone (a zoneinfo key, `Europe/Moscow`) of numbers whose zones differ in local time (Russian
    mobiles); default the default region's main zone (`workflow.campaigns.main_zone`)."""
    optout_words: str = OPTOUT_WORDS_DEFAULT
    """Comma-separated replies that opt a number out of campaigns (case, spaces and punctuation around them
    ignored); empty: replies opt nobody out."""

    # --- webhooks -----------------------------------------------------------------------------
    public_url: str | None = None
    webhook_secret: SecretStr | None = None
    """Comma-separated keys: the first signs callback URLs, every one verifies them (rotation)."""
    webhook_token_ttl_s: int | None = Field(default=None, ge=60)
    """How long a callback URL is accepted after it was issued; default a day more than the report timeout."""
    flower_basic_auth: SecretStr | None = Field(default=None, validation_alias="FLOWER_BASIC_AUTH")
    """Flower's logins, `user:password[,user:password…]`, read here only to refuse the example one."""

    # --- retention ----------------------------------------------------------------------------
    retention_days: int = Field(default=90, ge=1)
    """Our own records of finished rows are pruned this long after they finished (see `db.retention`)."""

    # --- Mobilgroup ---------------------------------------------------------------------------
    mobilgroup_url: str = "https://sms.mobilgroup.ru/extxml.php"
    mobilgroup_user_id: str | None = None
    mobilgroup_user: str | None = None
    mobilgroup_password: SecretStr | None = None
    mobilgroup_sender: str | None = None
    mobilgroup_valid_hours: int = Field(default=1, ge=1, le=48)
    mobilgroup_unicode: Literal["auto", "0", "1"] = "auto"
    """`rus_sms`: 0 transliterates (140 chars), 1 sends Unicode (64 chars), auto picks per text."""
    mobilgroup_unicode_tag: Literal["rus_sms", "translit"] = "rus_sms"
    """The seed's table calls the flag `rus_sms`, its sample request `translit`."""
    mobilgroup_rate: float = Field(default=10.0, gt=0)
    mobilgroup_poll_after_s: int | None = Field(default=None, ge=0)
    """Seconds after acceptance before the status is asked; default is the lifetime (valid hours)."""
    mobilgroup_poll_retry_s: int = Field(default=1800, ge=1)
    mobilgroup_poll_max: int = Field(default=6, ge=1)
    mobilgroup_poll_interval_s: float = Field(default=60.0, gt=0)

    # --- Accolades ----------------------------------------------------------------------------
    accolades_url: str = "https://client.voipit.ro"
    accolades_account: str | None = None
    accolades_password: SecretStr | None = None
    accolades_rate: float = Field(default=10.0, gt=0)

    # --- Ozeki --------------------------------------------------------------------------------
    ozeki_url: str | None = None
    ozeki_username: str | None = None
    ozeki_password: SecretStr | None = None
    ozeki_sender: str | None = None
    ozeki_rate: float = Field(default=10.0, gt=0)

    # --- smsc.ru (SMPP) -----------------------------------------------------------------------
    smsc_host: str = "smpp.smsc.ru"
    """One host or several, comma-separated (`smpp.smsc.ru,smpp2.smsc.ru`), each optionally `host:port`;
    a session binds to the first that accepts."""
    smsc_port: int | None = Field(default=None, ge=1, le=65535)
    """Default 3700, or 3443 with `SMS_SMSC_TLS`."""
    smsc_system_id: str | None = None
    smsc_password: SecretStr | None = None
    smsc_system_type: str = ""
    smsc_source_addr: str | None = None
    smsc_rate: float = Field(default=30.0, gt=0)
    smsc_channels: str = ""
    """smsc.ru's non-SMS channels a text may ask for by its prefix, e.g. `viber,tgm` for `__VIBER__:` and
    `__TGM__:` texts; empty: none (such texts end `failed`)."""

    smsc_window: int = Field(default=300, ge=1, le=10_000)
    """Submits in flight at once on a worker process's SMPP session (smsc.ru's sample: 300 at 30/s)."""
    smsc_tls: bool = False
    smsc_ca_file: str | None = None
    """PEM file of the certificate authorities that may sign smsc.ru's TLS certificate; default the system's."""
    smsc_bind: Literal["transmitter", "transceiver"] = "transmitter"
    """`transceiver`: workers' sessions also take receipts and replies (accounts that allow it)."""

    # --- per provider: room in the broker, threads, unknown outcomes -----------------------------
    mobilgroup_max_inflight: int | None = Field(default=None, ge=1)
    accolades_max_inflight: int | None = Field(default=None, ge=1)
    ozeki_max_inflight: int | None = Field(default=None, ge=1)
    smsc_max_inflight: int | None = Field(default=None, ge=1)
    """Rows of that provider in the broker or being sent at once; the rest wait in the database. Default:
    one dispatch interval and `INFLIGHT_MARGIN_S` of its rate (at least `INFLIGHT_MIN`), see `max_inflight()`."""
    mobilgroup_threads: int | None = Field(default=None, ge=1)
    accolades_threads: int | None = Field(default=None, ge=1)
    ozeki_threads: int | None = Field(default=None, ge=1)
    smsc_threads: int | None = Field(default=None, ge=1)
    """Threads of one worker process that may be in a call to that provider at once; see `threads_for()`."""
    accolades_on_unknown: Literal["resend", "error"] = "resend"
    ozeki_on_unknown: Literal["resend", "error"] = "resend"
    smsc_on_unknown: Literal["resend", "error"] = "resend"
    """A send whose answer never came (timeout, crash): `resend` (the recipient may get it twice) or `error`
    (it may not get it at all). Mobilgroup has no such setting: it refuses a repeated request id."""
    mobilgroup_id_prefix: str = Field(default="", pattern=r"^[0-9]{0,6}$")
    """Digits put before every Mobilgroup request id, so that two deployments on one account never send
    under the same id; recorded in the database at first start, and a later change refused."""

    # --- identical-request rule, per provider -------------------------------------------------
    mobilgroup_identical_s: float = Field(default=60.0, ge=0)
    accolades_identical_s: float = Field(default=60.0, ge=0)
    ozeki_identical_s: float = Field(default=60.0, ge=0)
    smsc_identical_s: float = Field(default=60.0, ge=0)
    """Minimum seconds between two requests with the same account, recipient and text; 0 turns it off."""

    @field_validator("routes", "failover", "allowed_countries", "smsc_channels")
    @classmethod
    def _check_list(cls, value: str, info) -> str:
        # Each is a comma-separated list read by its own parser (below), whose ValueError names what is wrong.
        LIST_PARSERS[info.field_name](value)
        return value

    @field_validator("mobilgroup_url", "accolades_url", "ozeki_url", "public_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        # Without a scheme every request fails inside requests, message by message, or (SMS_PUBLIC_URL)
        # providers are given callback addresses they cannot call. Empty is unset.
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host name")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_keys(cls, value: SecretStr | None) -> SecretStr | None:
        # A short key can be guessed offline from one callback URL; the example one is public.
        if value is not None and value.get_secret_value() and not _keys(value):
            raise ValueError("lists no key (keys are separated by commas)")
        for key in _keys(value):
            if key == EXAMPLE_WEBHOOK_SECRET or len(key) < WEBHOOK_KEY_MIN_CHARS:
                raise ValueError(f"every key must be at least {WEBHOOK_KEY_MIN_CHARS} random characters and "
                                 "not the example one (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _check_flower_login(cls, value: SecretStr | None) -> SecretStr | None:
        for login in filter(None, (part.strip() for part in (value.get_secret_value() if value else "").split(","))):
            user, _, password = login.partition(":")
            if login == EXAMPLE_FLOWER_LOGIN or not user or len(password) < FLOWER_PASSWORD_MIN_CHARS:
                raise ValueError(f"each login must be user:password with a password of at least "
                                 f"{FLOWER_PASSWORD_MIN_CHARS} characters, and not the example one")
        return value

    @field_validator("default_region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        # A region the phone-number library does not know makes every number typed without a country code
        # unreadable: each such message would end `failed` instead of the process refusing to start.
        region = value.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region code the phone-number library knows (such as RU or RO)")
        return region

    @field_validator("quiet_hours")
    @classmethod
    def _check_quiet_hours(cls, value: str) -> str:
        parse_quiet_hours(value)  # its ValueError says what is wrong
        return value.strip()

    @field_validator("quiet_hours_tz")
    @classmethod
    def _check_zone(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone of the tz database (such as Europe/Moscow)") from None
        return value.strip()

    @field_validator("optout_words")
    @classmethod
    def _check_words(cls, value: str) -> str:
        if any(len(word) > OPTOUT_WORD_MAX for word in parse_words(value)):
            raise ValueError(f"each word may have at most {OPTOUT_WORD_MAX} characters")
        return value

    @field_validator("smsc_host")
    @classmethod
    def _check_smsc_host(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",")]
        if not all(entries) or any(" " in entry for entry in entries):
            raise ValueError("must be one host name or several, comma-separated (host or host:port each)")
        return value

    @field_validator("smsc_system_id", "smsc_password")
    @classmethod
    def _check_smsc_credentials(cls, value, info):
        # smpplib would cut a longer one silently; every bind would then be a refused login (see providers.smsc).
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        limit = MAX_SYSTEM_ID_CHARS if info.field_name == "smsc_system_id" else MAX_PASSWORD_CHARS
        problem = credential_problem(secret, limit) if secret else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("smsc_ca_file")
    @classmethod
    def _check_ca_file(cls, value: str | None) -> str | None:
        if value and not Path(value).is_file():
            raise ValueError("names no readable file")
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            redis_url_parts(value)  # its ValueError names the accepted schemes, never the URL (a password)
        return value

    @model_validator(mode="after")
    def _lease_outlasts_a_call(self) -> "Settings":
        # A send starts its provider call only while its lease outlasts the call's deadline by a margin
        # (workflow.LEASE_MARGIN_S): with a shorter lease no send would ever start.
        if self.send_lease_s < self.http_timeout_s + LEASE_HEADROOM_S:
            raise ValueError(f"SMS_SEND_LEASE_S ({self.send_lease_s}) must be at least SMS_HTTP_TIMEOUT_S "
                             f"({self.http_timeout_s:g}) + {LEASE_HEADROOM_S} s")
        return self

    @model_validator(mode="after")
    def _default_redis(self) -> "Settings":
        if self.redis_url is None and self.broker_url.startswith(("redis://", "rediss://")):
            object.__setattr__(self, "redis_url", self.broker_url)
        return self

    @model_validator(mode="after")
    def _default_smsc_port(self) -> "Settings":
        if self.smsc_port is None:
            object.__setattr__(self, "smsc_port", 3443 if self.smsc_tls else 3700)
        return self

    @model_validator(mode="after")
    def _check_token_ttl(self) -> "Settings":
        # A callback URL that expires before the report timeout refuses reports we still wait for.
        if self.webhook_token_ttl_s is not None and self.webhook_token_ttl_s <= self.report_timeout_s:
            raise ValueError(f"SMS_WEBHOOK_TOKEN_TTL_S ({self.webhook_token_ttl_s}) must be longer than "
                             f"SMS_REPORT_TIMEOUT_S ({self.report_timeout_s})")
        # A pruned row sent again starts its sends afresh: no callback URL of its earlier sends may still work.
        if self.token_ttl_s >= self.retention_days * 86_400:
            raise ValueError(f"SMS_RETENTION_DAYS ({self.retention_days}) must be longer than callback URLs "
                             f"stay valid (SMS_WEBHOOK_TOKEN_TTL_S, {self.token_ttl_s} s)")
        return self

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name in URL_FIELDS and value else value

    # ------------------------------------------------------------------------------------------
    @property
    def route_table(self) -> list[tuple[str, str]]:
        """`SMS_ROUTES` as (prefix, provider) pairs, longest prefix first."""
        return parse_routes(self.routes)

    @property
    def failover_table(self) -> dict[str, list[str]]:
        """`SMS_FAILOVER` as {provider: the providers to try next, in order}."""
        return parse_failover(self.failover)

    @property
    def allowed_numbers(self) -> "Countries":
        """Where numbers may be: `SMS_ALLOWED_COUNTRIES`, or else every calling code a route's prefix
        names (`7` for `7=…`, every `3…` code for `3=…`, `44` for `4477=…`) and the default region."""
        return resolve_allowed_countries(self.allowed_countries, self.routes, self.default_region)

    @property
    def smsc_channel_names(self) -> frozenset[str]:
        """`SMS_SMSC_CHANNELS` as channel names (`viber`, `tgm` …)."""
        return parse_channels(self.smsc_channels)

    @property
    def providers_in_use(self) -> set[str]:
        """Every provider rows may be sent through: routes, the default, and the failover routes' fallbacks
        (they need credentials and workers too)."""
        used = {provider for _, provider in self.route_table}
        if self.default_provider:
            used.add(self.default_provider)
        table = self.failover_table
        pending = list(used)
        while pending:  # a fallback's own fallbacks too
            for fallback in table.get(pending.pop(), ()):
                if fallback not in used:
                    used.add(fallback)
                    pending.append(fallback)
        return used

    @property
    def quiet_window(self) -> tuple[time, time] | None:
        """`SMS_QUIET_HOURS` as (start, end) wall times, or None when unset."""
        return parse_quiet_hours(self.quiet_hours)

    @property
    def optout_word_list(self) -> list[str]:
        """`SMS_OPTOUT_WORDS`, each as written."""
        return parse_words(self.optout_words)

    def max_inflight(self, provider: str) -> int:
        """`SMS_<PROVIDER>_MAX_INFLIGHT`, else `SMS_DISPATCH_INTERVAL_S` + `INFLIGHT_MARGIN_S` worth of its
        rate, at least `INFLIGHT_MIN`: enough to keep its workers busy from one dispatch tick to the next,
        little enough that a single message released behind a campaign waits only a few seconds of the
        provider's rate in the broker (the broker's queue is first in, first out)."""
        configured = getattr(self, f"{provider}_max_inflight")
        seconds = self.dispatch_interval_s + INFLIGHT_MARGIN_S
        return configured or max(INFLIGHT_MIN, math.ceil(getattr(self, f"{provider}_rate") * seconds))

    def threads_for(self, provider: str, concurrency: int, providers_served: int) -> int:
        """`SMS_<PROVIDER>_THREADS`, else: a worker serving one provider lets it use all its threads but
        `THREADS_RESERVED` (so that, should it hang, the sends queued behind its calls still give their rows
        back at once instead of waiting out its timeouts); one serving several gives each at most half, so
        that one provider that hangs leaves the others half the worker. The beat tasks have threads of their
        own (`celery_ext.pool`)."""
        configured = getattr(self, f"{provider}_threads")
        if configured:
            return configured
        if providers_served <= 1:
            return max(1, concurrency - THREADS_RESERVED)
        return max(1, concurrency // 2)

    def resends_unknown(self, provider: str) -> bool:
        """Whether a send of `provider` whose answer never came is sent again."""
        return REGISTRY[provider].repeat_harmless or getattr(self, f"{provider}_on_unknown") == "resend"

    @property
    def uses_id_prefix(self) -> bool:
        """Whether `SMS_MOBILGROUP_ID_PREFIX` shapes requests this deployment sends (Mobilgroup is in use)."""
        return "mobilgroup" in self.providers_in_use

    @property
    def webhook_keys(self) -> list[str]:
        """`SMS_WEBHOOK_SECRET`'s keys, the signing one first; empty when unset."""
        return _keys(self.webhook_secret)

    @property
    def token_ttl_s(self) -> int:
        """`SMS_WEBHOOK_TOKEN_TTL_S`, or a day more than the report timeout."""
        return self.webhook_token_ttl_s or self.report_timeout_s + 86_400

    def startup_warnings(self) -> list[str]:
        """What is allowed but unsafe, for a process to log once as it starts."""
        warnings = []
        host = urlsplit(self.public_url).hostname if self.public_url else None
        if self.public_url and self.public_url.startswith("http:") and not _loopback(host):
            warnings.append("SMS_PUBLIC_URL is plain http:// on a host that is not loopback: callback URLs, "
                            "each a capability for its message, cross the network unencrypted; use https://")
        return warnings

    def poll_after_s(self) -> int:
        if self.mobilgroup_poll_after_s is not None:
            return self.mobilgroup_poll_after_s
        return self.mobilgroup_valid_hours * 3600

    def require(self, *fields: str) -> None:
        """Raise `ConfigError` naming every variable among `fields` that is unset."""
        missing = [_env_name(f) for f in fields if getattr(self, f) in (None, "")]
        if missing:
            raise ConfigError(f"set {', '.join(missing)} in the environment or .env")

    def require_sending(self) -> None:
        """Check what a worker or beat needs before it starts: a provider, and its credentials."""
        if not self.default_provider:
            raise ConfigError(
                "set SMS_DEFAULT_PROVIDER to one of " + ", ".join(PROVIDERS)
                + " (and optionally SMS_ROUTES for prefix routes)"
            )
        for provider in sorted(self.providers_in_use):
            self.require(*REGISTRY[provider].required)


LEASE_HEADROOM_S = 10
INFLIGHT_MARGIN_S = 1.0
INFLIGHT_MIN = 20
THREADS_RESERVED = 2



def _keys(secret: SecretStr | None) -> list[str]:
    return [key.strip() for key in (secret.get_secret_value() if secret else "").split(",") if key.strip()]


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """`url` with its password, if any, shown as `***`."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy reads (a broker list, say): nothing of it is shown
        return "<url hidden>"


def parse_quiet_hours(value: str) -> tuple[time, time] | None:
    """Parse `21:00-09:00` (start-end, 24-hour wall times; the end may be past midnight); empty is None."""
    if not value.strip():
        return None
    try:
        start, end = (time.fromisoformat(part.strip()) for part in value.split("-"))
    except ValueError:
        raise ValueError(f"{value!r} is not a window such as 21:00-09:00 (start-end, 24-hour times)") from None
    if start == end:
        raise ValueError(f"{value!r} starts when it ends: give a window such as 21:00-09:00")
    return start, end


def parse_words(value: str) -> list[str]:
    """Comma-separated words, each stripped; empty items are dropped."""
    return [word.strip() for word in value.split(",") if word.strip()]


def parse_routes(value: str) -> list[tuple[str, str]]:
    """Parse `7=mobilgroup,40=accolades` into pairs sorted longest prefix first."""
    routes = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        prefix, sep, provider = item.partition("=")
        prefix, provider = prefix.strip().lstrip("+"), provider.strip()
        if not sep or not prefix.isdigit() or provider not in PROVIDERS:
            raise ValueError(
                f"route {item!r} must look like DIGITS=PROVIDER with PROVIDER one of {', '.join(PROVIDERS)}"
            )
        routes.append((prefix, provider))
    return sorted(routes, key=lambda route: -len(route[0]))


def parse_failover(value: str) -> dict[str, list[str]]:
    """Parse `mobilgroup:accolades,ozeki:accolades:smsc` into {provider: [fallbacks in order]}."""
    table: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        names = [name.strip() for name in item.split(":")]
        if len(names) < 2 or any(name not in PROVIDERS for name in names) or len(set(names)) != len(names):
            raise ValueError(f"failover route {item!r} must look like PROVIDER:FALLBACK[:FALLBACK…] with distinct "
                             f"providers among {', '.join(PROVIDERS)}")
        if names[0] in table:
            raise ValueError(f"{names[0]} has two failover routes")
        table[names[0]] = names[1:]
    return table


@dataclass(frozen=True)
class Countries:
    """Calling codes and ISO region codes; a number is in it when either its code or its region is."""

    codes: frozenset[int]
    regions: frozenset[str]

    def __contains__(self, number: phonenumbers.PhoneNumber) -> bool:
        return number.country_code in self.codes or phonenumbers.region_code_for_number(number) in self.regions

    def __str__(self) -> str:
        return ",".join([str(code) for code in sorted(self.codes)] + sorted(self.regions))


@functools.lru_cache(maxsize=8)
def resolve_allowed_countries(allowed: str, routes: str, default_region: str) -> Countries:
    """`SMS_ALLOWED_COUNTRIES` from the three settings it depends on (read once: dispatch asks per row)."""
    if allowed.strip():
        return parse_countries(allowed)
    prefixes = [prefix for prefix, _ in parse_routes(routes)]
    codes = {code for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE for prefix in prefixes
             if str(code).startswith(prefix) or prefix.startswith(str(code))}
    return Countries(frozenset(codes), frozenset({default_region}))


def parse_countries(value: str) -> Countries:
    """Parse `7,40` or `RU,RO` (or both, mixed) into `Countries`; `ValueError` naming the bad item."""
    codes, regions = set(), set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        if item.lstrip("+").isdigit() and int(item) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            codes.add(int(item))
        elif item.upper() in phonenumbers.SUPPORTED_REGIONS:
            regions.add(item.upper())
        else:
            raise ValueError(f"{item!r} is neither a country calling code (such as 7 or 40) nor a region code "
                             "(such as RU or RO)")
    return Countries(frozenset(codes), frozenset(regions))


def parse_channels(value: str) -> frozenset[str]:
    """Parse `viber,tgm` into channel names; `ValueError` naming an unknown one."""
    known = {channel_name(prefix) for prefix in CHANNEL_PREFIXES}
    names = {part.strip().lower() for part in value.split(",") if part.strip()}
    if names - known:
        raise ValueError(f"unknown channel {sorted(names - known)[0]!r}: the channels are "
                         + ", ".join(sorted(known)))
    return frozenset(names)


def load_settings(**overrides) -> Settings:
    """Read the settings now, raising `ConfigError` that names each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            name = _env_name(field) if field in Settings.model_fields else field or "settings"
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


LIST_PARSERS = {"routes": parse_routes, "failover": parse_failover, "allowed_countries": parse_countries,
                "smsc_channels": parse_channels}
"""The parser of each comma-separated list setting, for `Settings._check_list`."""
