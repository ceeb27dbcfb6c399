"""Per-process resources of the workflow: settings, the database engine, provider clients, the throttle.

Everything is built on first use inside the process that uses it (after Celery's prefork pool forked), and
kept for the life of the process, so a task reuses HTTP keep-alive connections, SMPP binds and the DB pool
instead of setting them up per message.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter
from sqlalchemy.exc import SQLAlchemyError

from db import store
from db.engine import engine_for
from providers import registry
from providers.base import Provider
from settings import Settings, get_settings
from workflow import logins
from workflow.reports import apply_smpp_receipt
from workflow.smpp_receiver import ReceiptHandler
from workflow.throttle import make_throttle

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
    """A provider client configured from the settings (`providers.registry`); ValueError for settings its
    constructor refuses. An SMPP transceiver session hands what it receives to a `ReceiptHandler` that
    applies it to this database; an SMPP client binds only as the fleet's account circuit allows
    (`workflow.logins.gate`)."""
    def receipts():
        return ReceiptHandler(functools.partial(apply_smpp_receipt, engine_for(s.database_url),
                                                optout_words=s.optout_word_list))

    return registry.entry(name).make_client(s, session=http_session(), receipts=receipts,
                                            login_gate=logins.gate(engine_for(s.database_url), name))


SLOT_WAIT_S = 0.2
"""How long a send waits for one of its provider's threads before it gives its row back."""

HANGING_AFTER_S = 1.0
"""When none of a provider's calls in this process has ended for this long while all its threads are in
calls, the provider is taken to hang: a send gives its row back at once instead of waiting `SLOT_WAIT_S`.
Otherwise the sends a worker prefetched each waited in turn, and the worker took in nothing new (its beat
tasks included) until they were through: 7 s in `tests/test_isolation.py`'s hanging Ozeki."""

BREAKER_CACHE_S = 1.0
"""How long a process trusts what it last read of the providers' account circuits: a send that was already
in the broker when its account's circuit opened reaches the provider at most this long after."""


ALERT_EVERY_S = 60.0
"""A repeated `ALERT:` line (a queue no worker takes, a provider failed over) is logged at most this often."""

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    _clients: dict = field(default_factory=dict)
    _throttle: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    concurrency: int = 0
    """Threads (or processes) of this worker, set when the worker starts; 0 outside a worker (no shares)."""
    providers_served: int = 1
    """How many providers' queues this worker consumes; set when the worker starts."""
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set on a warm shutdown: no new provider call starts, the rows are handed back."""
    _slots: dict = field(default_factory=dict)
    _call_ended: dict = field(default_factory=dict)
    """When a call to each provider last ended in this process (`HANGING_AFTER_S`)."""
    _breakers: tuple = (0.0, {})
    _refused_at: dict = field(default_factory=dict)
    """When a send of this process last met a refused login, per provider (`note_refused_login`)."""
    alerted: dict = field(default_factory=dict)
    """When this process last logged each kind of repeated `ALERT:` (`alert_once`)."""
    confirm_asked: dict = field(default_factory=dict)
    """When this process last asked each unavailable provider about rows in doubt (`workflow.dispatch.fail_over`)."""
    _fingerprints: dict = field(default_factory=dict)
    waiting: Callable[[], AbstractContextManager] = nullcontext
    """Marks a stretch spent waiting for a provider; a worker sets its pool's (`celery_ext.pool.waiting`),
    which lets another task run meanwhile."""

    @property
    def engine(self):
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
                self._throttle = make_throttle(self.settings)
            return self._throttle

    @contextmanager
    def provider_call(self, provider: str):
        """Yields True while this thread holds one of `provider`'s threads (`Settings.threads_for`), False
        when they stay all in use for `SLOT_WAIT_S` (at once when the provider hangs: `HANGING_AFTER_S`): a
        provider that hangs then holds at most its share of the worker, and the caller puts the row back to
        wait; a burst to a provider that answers at once waits a moment for a thread instead of going back
        to the database. The whole stretch counts as waiting for the worker's pool (`celery_ext.pool.waiting`),
        which lets other sends run meanwhile."""
        if not self.concurrency:
            with self.waiting():
                yield True
            return
        with self._lock:
            slots = self._slots.get(provider)
            if slots is None:
                size = self.settings.threads_for(provider, self.concurrency, self.providers_served)
                slots = self._slots[provider] = threading.BoundedSemaphore(size)
                self._call_ended[provider] = time.monotonic()
        with self.waiting():
            got = slots.acquire(blocking=False)
            if not got and time.monotonic() - self._call_ended[provider] < HANGING_AFTER_S:
                got = slots.acquire(timeout=SLOT_WAIT_S)
            try:
                yield got
            finally:
                if got:
                    self._call_ended[provider] = time.monotonic()
                    slots.release()

    def alert_once(self, key: str, message: str, *args) -> None:
        """Log an `ALERT:` line at most every `ALERT_EVERY_S` per `key` in this process."""
        if time.monotonic() - self.alerted.get(key, -math.inf) >= ALERT_EVERY_S:
            self.alerted[key] = time.monotonic()
            log.error(message, *args)

    def breaker(self, provider: str):
        """`provider`'s account circuit (`db.store.BreakerState`) as last read, at most `BREAKER_CACHE_S`
        ago; None while it is closed and never tripped."""
        read_at, states = self._breakers
        if time.monotonic() - read_at > BREAKER_CACHE_S:
            try:
                states = store.breaker_states(self.engine)
            except SQLAlchemyError:  # keep what was last read: the send itself meets the database next
                pass
            self._breakers = (time.monotonic(), states)
        return states.get(provider)

    def fingerprint(self, provider: str) -> str:
        """The fingerprint of this process's credentials for `provider` (`workflow.logins.fingerprint`)."""
        with self._lock:
            if provider not in self._fingerprints:
                self._fingerprints[provider] = logins.fingerprint(self.engine, self.settings, provider)
            return self._fingerprints[provider]

    def note_refused_login(self, provider: str) -> None:
        """A send of this process has just met a refused login: this process's other sends hold back at
        once, before the circuit this send opens in the database is read back (`BREAKER_CACHE_S`)."""
        self._refused_at[provider] = time.monotonic()
        self.forget_breakers()

    def login_refused_just_now(self, provider: str) -> bool:
        """Whether a send of this process met a refused login within the last `BREAKER_CACHE_S` and a bit."""
        return time.monotonic() - self._refused_at.get(provider, -math.inf) < 2 * BREAKER_CACHE_S

    def forget_breakers(self) -> None:
        """Read the circuits afresh next time (this process has just changed one)."""
        self._breakers = (0.0, {})

    def account(self, provider: str) -> str:
        return f"{provider}:{getattr(self.settings, registry.entry(provider).account)}"

    def identity_key(self, provider: str) -> bytes:
        """The key of `provider`'s identical-request digests (`workflow.throttle.identity_of`)."""
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
