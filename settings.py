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
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import phonenumbers
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url as redis_url_parts
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

PROVIDERS = ("mobilgroup", "accolades", "ozeki", "smsc")
ProviderName = Literal["mobilgroup", "accolades", "ozeki", "smsc"]

VAR_DIR = Path(os.environ.get("SMS_VAR_DIR", "var")).resolve()


URL_FIELDS = ("database_url", "broker_url", "redis_url")
"""Settings that are URLs and may carry a password."""

EXAMPLE_FLOWER_LOGIN = "admin:change-me"
EXAMPLE_WEBHOOK_SECRET = "change-me-to-64-random-characters-eg-openssl-rand-hex-32"
"""The placeholders of `.env.example`: anyone who read it knows them, so start-up refuses them."""
WEBHOOK_KEY_MIN_CHARS = 32
FLOWER_PASSWORD_MIN_CHARS = 12


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
    """Prefix of every Redis key we write (broker queues and rate limits): lets deployments share a Redis."""

    # --- routing ------------------------------------------------------------------------------
    default_provider: ProviderName | None = None
    routes: str = ""
    """Prefix routes such as `7=mobilgroup,40=accolades`; the longest matching prefix wins."""
    default_region: str = "RU"
    """Where a number typed without a country code is assumed to be (ISO 3166 code)."""

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
    send_lease_s: int = Field(default=180, ge=10)
    """A send not finished after this long is considered lost (worker killed) and is retried."""
    reap_interval_s: float = Field(default=60.0, gt=0)
    requeue_after_s: int = Field(default=600, ge=5)
    """A claimed row whose send task has not started after this long is enqueued again (broker lost it)."""
    dispatch_max_inflight: int = Field(default=5000, ge=1)
    """Dispatch claims no more rows while this many are claimed but not yet sent (backpressure)."""
    report_timeout_s: int = Field(default=3 * 86_400, ge=60)
    """Stop waiting for a delivery report after this long; the row keeps `success`."""
    http_timeout_s: float = Field(default=15.0, gt=0)

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
    smsc_port: int = Field(default=3700, ge=1, le=65535)
    smsc_system_id: str | None = None
    smsc_password: SecretStr | None = None
    smsc_system_type: str = ""
    smsc_source_addr: str | None = None
    smsc_rate: float = Field(default=30.0, gt=0)

    # --- identical-request rule, per provider -------------------------------------------------
    mobilgroup_identical_s: float = Field(default=60.0, ge=0)
    accolades_identical_s: float = Field(default=60.0, ge=0)
    ozeki_identical_s: float = Field(default=60.0, ge=0)
    smsc_identical_s: float = Field(default=60.0, ge=0)
    """Minimum seconds between two requests with the same account, recipient and text; 0 turns it off."""

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: str) -> str:
        parse_routes(value)
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

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            redis_url_parts(value)  # its ValueError names the accepted schemes, never the URL (a password)
        return value

    @model_validator(mode="after")
    def _default_redis(self) -> "Settings":
        if self.redis_url is None and self.broker_url.startswith(("redis://", "rediss://")):
            object.__setattr__(self, "redis_url", self.broker_url)
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
    def providers_in_use(self) -> set[str]:
        used = {provider for _, provider in self.route_table}
        if self.default_provider:
            used.add(self.default_provider)
        return used

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
            self.require(*REQUIRED_BY_PROVIDER[provider])


REQUIRED_BY_PROVIDER = {
    "mobilgroup": ("mobilgroup_url", "mobilgroup_user_id", "mobilgroup_user", "mobilgroup_password"),
    "accolades": ("accolades_url", "accolades_account", "accolades_password"),
    "ozeki": ("ozeki_url", "ozeki_username", "ozeki_password"),
    "smsc": ("smsc_host", "smsc_port", "smsc_system_id", "smsc_password"),
}


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
