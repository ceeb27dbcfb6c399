"""Per-process resources of the workflow: settings, the database engine, provider clients, the throttle.

Everything is built on first use inside the process that uses it (after Celery's prefork pool forked), and
kept for the life of the process, so a task reuses HTTP keep-alive connections, SMPP binds and the DB pool
instead of setting them up per message.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter

from providers.base import Provider
from settings import Settings, get_settings

# Which setting names the account of each provider: the rate limit and the identical-request rule are per
# account, shared by every process that sends through it.
ACCOUNT_FIELD = {
    "mobilgroup": "mobilgroup_user_id",
    "accolades": "accolades_account",
    "ozeki": "ozeki_username",
    "smsc": "smsc_system_id",
}


HTTP_POOL_SIZE = 64
"""Keep-alive connections kept per provider host and process: one per thread of a `--pool threads` worker
(requests keeps 10 and opens, then drops, a new connection for every request beyond them)."""


def http_session() -> requests.Session:
    """A session for a provider whose pool keeps `HTTP_POOL_SIZE` connections. The environment (proxies and
    `no_proxy`, the CA bundle, `.netrc`) is read by the client once per request shape
    (`providers.http.HttpClient`), not by requests on every request."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=HTTP_POOL_SIZE)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def build_client(name: str, s: Settings) -> Provider:
    """A provider client configured from the settings (credentials were checked at start-up)."""
    def secret(value):
        return value.get_secret_value() if value is not None else ""

    if name == "mobilgroup":
        from providers.mobilgroup import MobilgroupClient

        return MobilgroupClient(
            url=s.mobilgroup_url, user_id=s.mobilgroup_user_id, user=s.mobilgroup_user,
            password=secret(s.mobilgroup_password), sender=s.mobilgroup_sender,
            valid_hours=s.mobilgroup_valid_hours, unicode=s.mobilgroup_unicode,
            unicode_tag=s.mobilgroup_unicode_tag, timeout=s.http_timeout_s, session=http_session(),
        )
    if name == "accolades":
        from providers.accolades import AccoladesClient

        return AccoladesClient(url=s.accolades_url, account=s.accolades_account,
                               password=secret(s.accolades_password), timeout=s.http_timeout_s,
                               session=http_session())
    if name == "ozeki":
        from providers.ozeki import OzekiClient

        return OzekiClient(url=s.ozeki_url, username=s.ozeki_username, password=secret(s.ozeki_password),
                           sender=s.ozeki_sender, timeout=s.http_timeout_s, session=http_session())
    if name == "smsc":
        from tasks.smpp_receiver import smsc_client

        return smsc_client(s)
    raise ValueError(f"unknown provider {name!r}")


@dataclass
class Runtime:
    settings: Settings
    _clients: dict = field(default_factory=dict)
    _throttle: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def engine(self):
        from db.engine import engine_for

        return engine_for(self.settings.database_url)

    def client(self, name: str) -> Provider:
        with self._lock:
            if name not in self._clients:
                self._clients[name] = build_client(name, self.settings)
            return self._clients[name]

    @property
    def throttle(self):
        with self._lock:
            if self._throttle is None:
                from tasks.throttle import make_throttle

                self._throttle = make_throttle(self.settings)
            return self._throttle

    def account(self, provider: str) -> str:
        return f"{provider}:{getattr(self.settings, ACCOUNT_FIELD[provider])}"

    def identity_key(self, provider: str) -> bytes:
        """The key of `provider`'s identical-request digests (`tasks.throttle.identity_of`)."""
        password = getattr(self.settings, f"{provider}_password")
        return password.get_secret_value().encode() if password else b""

    def rate(self, provider: str) -> float:
        return getattr(self.settings, f"{provider}_rate")

    def identical_s(self, provider: str) -> float:
        return getattr(self.settings, f"{provider}_identical_s")


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built from the environment on first use."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings())
    return _runtime
