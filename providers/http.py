"""What the HTTP provider clients (Mobilgroup, Accolades, Ozeki) share: one keep-alive session per client,
answers read with a size cap under one total deadline, and network failures reported in words that never
quote the request URL (Ozeki's carries the password): `TransientError` when the request cannot have reached
the provider (refused, no route, connect timeout), `UnknownOutcome` when it left and no answer came.
"""
from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone

import requests
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import Timeout

from providers.base import OutgoingMessage, TransientError, UnknownOutcome
from providers.text import check_parts

# urllib3 logs every request line, query string included, at DEBUG, and the whole URL in a WARNING when an
# answer's headers do not parse: Ozeki's carries the password and the recipient's number. Neither debug
# logging (`smsctl -v`, `celery -l debug`) nor a provider's malformed answer may leak them.
logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)
logging.getLogger("urllib3.connection").setLevel(logging.ERROR)

MAX_ANSWER_BYTES = 64 * 1024
"""Real answers are a few hundred bytes; anything near this is not the provider's reply."""
CONNECT_TIMEOUT_S = 5.0
"""At most this of the deadline goes to opening the connection."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


class HttpClient:
    """Base of an HTTP provider client. `label` names the provider in error messages. A `session` passed
    in stays the caller's to close; otherwise `close()` closes the client's own."""

    label = "the provider"

    def __init__(self, *, timeout: float, session: requests.Session | None = None):
        self.timeout = timeout
        self._own_session = session is None
        self._session = session or requests.Session()
        self._prepared: dict[tuple, tuple[requests.PreparedRequest, dict]] = {}

    def _request(self, method: str, url: str, *, params: Mapping[str, str] | None = None,
                 data: bytes | Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> Answer:
        """One request, redirects not followed, answered within `timeout` seconds in all (connecting,
        sending, reading: a total deadline, so that a provider dribbling its answer cannot hold a thread
        longer). Raises `TransientError` when the request cannot have reached the provider or the answer is
        oversized, `UnknownOutcome` when it left and its answer did not come in time or the connection broke.
        What it sends is what `session.request` would send."""
        base, settings = self._base(method, url, headers)
        prepared = base.copy()
        if params:
            prepared.prepare_url(url, params)
        if data is not None:
            prepared.prepare_body(data, None)
        if self._session.cookies:
            prepared.prepare_cookies(self._session.cookies)
        deadline = time.monotonic() + self.timeout
        # urllib3's `total` bounds connect and every read together; the body loop checks it between chunks.
        timeout = Timeout(connect=min(CONNECT_TIMEOUT_S, self.timeout), total=self.timeout)
        try:
            with self._session.send(prepared, timeout=timeout, allow_redirects=False, **settings) as response:
                body = b""
                # read1: at most one receive per call, so the deadline is checked however slowly bytes come.
                while chunk := response.raw.read1(8192, decode_content=True):
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise TransientError(f"unreadable answer from {self.label} (far too large)")
                    if time.monotonic() > deadline:
                        raise UnknownOutcome(f"{self.label} did not finish answering within {self.timeout:g} s")
                return Answer(response.status_code, response.headers, body)
        except requests.RequestException as exc:
            # `from None`: the library's message names the URL, and with it possibly a password.
            if _never_left(exc):
                raise TransientError(f"could not reach {self.label} ({type(exc).__name__})", reached=False) from None
            if isinstance(exc, requests.Timeout):
                raise UnknownOutcome(f"{self.label} did not answer within {self.timeout:g} s") from None
            raise UnknownOutcome(f"the connection to {self.label} broke before its answer "
                                 f"({type(exc).__name__})") from None

    def _base(self, method: str, url: str, headers: Mapping[str, str] | None) -> tuple[requests.PreparedRequest, dict]:
        """The request for `method`, `url` and `headers` as the session prepares it, without body, query or
        cookies, and the settings the environment gives it; both made once per client. `session.request` redoes
        that merging of the session's headers, auth, hooks and environment on every call: in a loop against
        the Mobilgroup simulator, 0.78-0.83 ms of client CPU per request with it, 0.50-0.66 ms without.
        Each distinct (method, URL, headers) is kept for the client's life: vary the query or the body per
        request, never the URL or the headers."""
        key = (method, url, tuple(sorted(headers.items())) if headers else ())
        made = self._prepared.get(key)
        if made is None:
            base = self._session.prepare_request(requests.Request(method, url, headers=headers))
            base.headers.pop("Cookie", None)  # the jar's current cookies are added per request
            settings = self._session.merge_environment_settings(base.url, {}, True, None, None)
            made = self._prepared[key] = (base, settings)
        return made

    def close(self) -> None:
        if self._own_session:
            self._session.close()


class PartBilledClient(HttpClient):
    """An HTTP provider that bills by SMS part (Accolades, Ozeki): texts over `max_parts` parts are refused
    before sending; numbers go out as international digits, with a leading `+` if `plus_prefix`."""

    def __init__(self, *, timeout: float, session: requests.Session | None, max_parts: int, plus_prefix: bool):
        super().__init__(timeout=timeout, session=session)
        self.max_parts = max_parts
        self.plus_prefix = plus_prefix

    def check(self, message: OutgoingMessage) -> int:
        """Raise `PermanentError` for a recipient that is not international digits, an empty text, or a
        text over `max_parts` parts; else return the number of parts."""
        return check_parts(message, self.max_parts)

    def number(self, recipient: str) -> str:
        return ("+" if self.plus_prefix else "") + recipient


def _never_left(exc: requests.RequestException) -> bool:
    """Whether the request failed before any of it could reach the provider: the connection was refused,
    timed out while connecting, or the name did not resolve."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return True
    cause = exc.args[0] if exc.args else None
    reason = getattr(cause, "reason", cause)  # MaxRetryError wraps what happened
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError, NameResolutionError))


RETRY_AFTER_BOUNDS_S = (1.0, 3600.0)
"""Any `Retry-After` is held within these: a provider's answer (or whatever stands in for it) must neither
make a row retry at once in a loop nor park it for days."""


def retry_after(header: str | None, now: float | None = None) -> float:
    """Seconds to wait from a `Retry-After` header, in seconds or as an HTTP-date (`now`: the epoch seconds
    it is measured from, default the clock), always within `RETRY_AFTER_BOUNDS_S`: less (0, negative, a date
    in the past) is 1 s, more (days, infinity, a date far ahead) is an hour; absent or unreadable (NaN, text)
    is a minute."""
    low, high = RETRY_AFTER_BOUNDS_S
    value = (header or "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return 60.0
        if when.tzinfo is None:  # an HTTP-date is GMT; a date without a zone is read as such
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return 60.0
    return min(max(seconds, low), high)
