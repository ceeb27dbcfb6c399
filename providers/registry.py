"""The registry of providers: one entry per provider, the one place the rest of the dispatcher reads what
differs between them.

An entry says how to build the provider's client from the settings, which settings it needs and which one
names its account, how its delivery reports come (`poll`: we ask, once the message's lifetime is over;
`webhook`: it calls `webhooks/`; `smpp`: receipts on an SMPP session), whether sending the same request
again is harmless (Mobilgroup refuses a repeated request id with error 7, so a resend after a lost answer
cannot reach the phone twice), how a webhook report is read and by which HTTP methods it may come, and its
broker queue. Adding a provider is a client module here, an entry below, its settings in `settings.py` and
a stand-in in `simulators/`.

The settings object is taken as it is (attributes named `<provider>_<setting>`), not imported: providers
know protocols, not our configuration.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import accolades, mobilgroup, ozeki, smsc
from .base import DeliveryReport, Provider

ReportsBy = Literal["poll", "webhook", "smpp"]


def _secret(value) -> str:
    return value.get_secret_value() if value is not None else ""


def _row_id(_settings, row_id: int, _resends: int) -> int:
    return row_id


@dataclass(frozen=True)
class ProviderEntry:
    name: str
    make_client: Callable[..., Provider]
    """`make_client(settings, session=…, receipts=…, login_gate=…)`: `session` a `requests.Session` for HTTP
    providers, `receipts` a factory of the handler an SMPP session hands receipts to (None: it keeps none),
    `login_gate` what an SMPP client calls before each bind (it raises to forbid it); HTTP clients log in
    with every request, and their one probe is the workflow's."""
    required: tuple[str, ...]
    """Settings that must be set to send through it."""
    account: str
    """The setting that names its account: the rate limit and the identical-request rule are per account."""
    reports: ReportsBy
    repeat_harmless: bool
    """Whether a request sent again after a lost answer is refused by the provider rather than delivered
    twice: a send whose outcome is unknown is then always sent again."""
    reference: Callable[[Any, int, int], int] = _row_id
    """`reference(settings, row_id, resends)`: the id our request carries (and a poll asks about)."""
    parse_report: Callable[[Mapping[str, str]], DeliveryReport] | None = None
    """Reads a webhook report's fields (`reports == "webhook"`)."""
    webhook_methods: tuple[str, ...] = ()
    report_fields: frozenset[str] = frozenset()
    """The fields its webhook reports are known to carry; others are logged by name, once."""

    @property
    def queue(self) -> str:
        """Its own broker queue: a slow or paused provider never holds up another's sends."""
        return f"send.{self.name}"


def _mobilgroup(s, *, session=None, receipts=None, login_gate=None) -> Provider:
    return mobilgroup.MobilgroupClient(
        url=s.mobilgroup_url, user_id=s.mobilgroup_user_id, user=s.mobilgroup_user,
        password=_secret(s.mobilgroup_password), sender=s.mobilgroup_sender, valid_hours=s.mobilgroup_valid_hours,
        unicode=s.mobilgroup_unicode, unicode_tag=s.mobilgroup_unicode_tag, timeout=s.http_timeout_s,
        session=session,
    )


def _mobilgroup_request_id(s, row_id: int, resends: int) -> int:
    return mobilgroup.request_id(s.mobilgroup_id_prefix, row_id, resends)


def _accolades(s, *, session=None, receipts=None, login_gate=None) -> Provider:
    return accolades.AccoladesClient(url=s.accolades_url, account=s.accolades_account, password=_secret(s.accolades_password),
                           timeout=s.http_timeout_s, session=session)


def _ozeki(s, *, session=None, receipts=None, login_gate=None) -> Provider:
    return ozeki.OzekiClient(url=s.ozeki_url, username=s.ozeki_username, password=_secret(s.ozeki_password),
                       sender=s.ozeki_sender, timeout=s.http_timeout_s, session=session)


def _smsc(s, *, session=None, receipts=None, login_gate=None) -> Provider:
    """With `SMS_SMSC_BIND=transceiver`, receipts and replies that arrive on the workers' own session go to
    a handler from `receipts`, as the receiver's do."""
    return smsc.SmscClient(
        host=s.smsc_host, port=s.smsc_port, system_id=s.smsc_system_id or "", password=_secret(s.smsc_password),
        system_type=s.smsc_system_type, source_addr=s.smsc_source_addr, timeout=s.http_timeout_s,
        window=s.smsc_window, tls=s.smsc_tls, ca_file=s.smsc_ca_file, bind=s.smsc_bind,
        channels=s.smsc_channel_names, login_gate=login_gate,
        receipts=receipts() if receipts is not None and s.smsc_bind == "transceiver" else None,
    )


REGISTRY: dict[str, ProviderEntry] = {entry.name: entry for entry in (
    ProviderEntry("mobilgroup", _mobilgroup, account="mobilgroup_user_id", reports="poll", repeat_harmless=True,
                  required=("mobilgroup_url", "mobilgroup_user_id", "mobilgroup_user", "mobilgroup_password"),
                  reference=_mobilgroup_request_id),
    ProviderEntry("accolades", _accolades, account="accolades_account", reports="webhook", repeat_harmless=False,
                  required=("accolades_url", "accolades_account", "accolades_password"),
                  parse_report=accolades.parse_report, webhook_methods=("GET", "POST"),
                  report_fields=accolades.REPORT_FIELDS),
    ProviderEntry("ozeki", _ozeki, account="ozeki_username", reports="webhook", repeat_harmless=False,
                  required=("ozeki_url", "ozeki_username", "ozeki_password"),
                  parse_report=ozeki.parse_report, webhook_methods=("GET", "POST"),
                  report_fields=ozeki.REPORT_FIELDS),
    ProviderEntry("smsc", _smsc, account="smsc_system_id", reports="smpp", repeat_harmless=False,
                  required=("smsc_host", "smsc_port", "smsc_system_id", "smsc_password")),
)}

PROVIDERS: tuple[str, ...] = tuple(REGISTRY)


def entry(name: str) -> ProviderEntry:
    """The entry of `name`; ValueError for a name that is not a provider."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r} (one of {', '.join(PROVIDERS)})") from None


def reporting_by(kind: ReportsBy) -> tuple[str, ...]:
    """The providers whose delivery reports come this way."""
    return tuple(name for name, e in REGISTRY.items() if e.reports == kind)


def _the_one(kind: ReportsBy) -> str:
    (name,) = reporting_by(kind)
    return name


POLLED = _the_one("poll")
"""The provider whose status is polled (`sms.poll`): its lifetime, poll settings and status request."""
RECEIVED = _the_one("smpp")
"""The provider whose receipts and replies `smsctl smpp-receiver` receives."""
