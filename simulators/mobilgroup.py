"""A local stand-in for Mobilgroup's `extxml.php` (seed `003`), for demos, tests and staging.

It takes the seed's request XML in windows-1251 (either flag tag, `rus_sms` or the sample's `translit`,
both meaning 1 = Unicode, 64 characters, else transliterated, 140) and answers exactly in the seed's
printed, not well-formed style (`<id>1</ id>`, `</response >`, a line break inside `<time>`), so clients
are tested against what the real server is documented to send.

Behaviour, in the order the checks run: credentials (error 3 wrong client id, 4 wrong login or password),
`blocked` (5), unknown command (6); for `send`: missing parameter (2), recipients not comma-separated
digits (8), id not digits or `valid` not 1..48 (2; the seed names no code for the latter), an id seen
before (7, nothing is sent again), text too long for its flag (10), bad `schedule` (11), `balance` below
`price` per recipient (9). `status` of an unknown id is 12. A recipient ending in `undeliverable_suffix`
is reported 2 (not delivered), every other one 1 (delivered); 0 (queued) while a scheduled time is still
ahead, and 8 (sent) while the request is younger than `pending_s`. The whole request is 2 (running) while
any recipient is 0 or 8, else 4 (finished).

Each command is journalled: `kind` = the command (`send`, `status`, `balance`, or `request` when the XML
could not be read or the command is unknown), `id`, `outcome` (`accepted`, `duplicate`, `ok` or
`error N`), and for `send` the decoded `phone`, `message`, `unicode` flag, `sender`, `valid`, `schedule`.
"""
from __future__ import annotations

import re
import threading
import time
from datetime import datetime
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from simulators.base import SimulatorHandler, SimulatorServer, run_until_interrupted

API_PATH = "/extxml.php"
"""Where clients POST: `simulator.url + API_PATH` (the server also answers at `/`)."""
DEFAULT_PORT = 8101

_DIGITS = re.compile(r"[0-9]+")
_PHONES = re.compile(r"[0-9]+(,[0-9]+)*")
_SCHEDULE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}")
_DECLARED_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
# Accept the seed's own sample request, which closes a tag as `</ id>`.
_LOOSE_END_TAG = re.compile(r"</\s*([A-Za-z_][\w.-]*)\s*>")
_HEAD = '<?xml version="1.0" encoding="windows-1251"?>\n<response>\n'


class _BadRequest(Exception):
    """The request cannot be read: answer error 1."""


def _parse_request(body: bytes) -> Element:
    match = _DECLARED_ENCODING.match(body)
    try:
        text = body.decode(match.group(1).decode("ascii") if match else "windows-1251")
        root = safe_xml.fromstring(_LOOSE_END_TAG.sub(r"</\1>", text.strip()), forbid_dtd=True)
    except (LookupError, UnicodeDecodeError, ParseError, DefusedXmlException) as exc:
        raise _BadRequest from exc
    if root.tag != "request":
        raise _BadRequest
    return root


def _field(request: Element, tag: str, strip: bool = True) -> str:
    child = request.find(tag)
    text = (child.text or "") if child is not None else ""
    return text.strip() if strip else text


def _due(schedule: str) -> float | None:
    """Epoch seconds of a `yyyy-MM-dd hh:mm` schedule in local time; None if empty; ValueError if bad."""
    if not schedule:
        return None
    if not _SCHEDULE.fullmatch(schedule):
        raise ValueError(schedule)
    return datetime.strptime(schedule, "%Y-%m-%d %H:%M").timestamp()


def _answer(error: int, request_id: str = "", body: str = "") -> bytes:
    """The seed's answer layout, its stray blanks included."""
    result = "ERROR" if error else "OK"
    text = f"{_HEAD}<result>{result}</result>\n<error>{error}</error>\n{body}"
    if request_id:
        text += f"<id>{request_id}</ id>\n"
    return (text + "</response >\n").encode("windows-1251", errors="xmlcharrefreplace")


class MobilgroupHandler(SimulatorHandler):
    server: "MobilgroupSimulator"

    def handle_api(self, method, path, query, body):
        if not (path == "/" or path.endswith("extxml.php")):
            return 404, "text/plain", b"Not Found"
        if method != "POST":
            return 405, "text/plain", b"POST an XML request"
        return 200, "application/xml; charset=windows-1251", self.server.answer(body)


class MobilgroupSimulator(SimulatorServer):
    """Mobilgroup on 127.0.0.1:`port` (0 picks a free one). Options: `user_id`, `user`, `password` (the
    account it accepts), `blocked`, `balance`, `price` (charged per recipient; 0 never runs out),
    `undeliverable_suffix`, `pending_s`, and the base's `fail_rate`, `lost_rate`, `latency_s`, `seed`."""

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", user_id: str = "1", user: str = "demo",
                 password: str = "demo", blocked: bool = False, balance: float = 1000.0, price: float = 0.0,
                 undeliverable_suffix: str = "13", pending_s: float = 0.0, fail_rate: float = 0.0,
                 lost_rate: float = 0.0, latency_s: float = 0.0, seed: int | None = None):
        super().__init__(MobilgroupHandler, host, port, fail_rate=fail_rate, lost_rate=lost_rate,
                         latency_s=latency_s, seed=seed)
        self.user_id, self.user, self.password = str(user_id), user, password
        self.blocked = blocked
        self.balance = balance
        self.price = price
        self.undeliverable_suffix = undeliverable_suffix
        self.pending_s = pending_s
        self.requests: dict[str, dict] = {}
        """Accepted send requests by id: phones, accepted time, schedule."""
        self._state = threading.Lock()

    @property
    def api_url(self) -> str:
        return self.url + API_PATH

    def answer(self, body: bytes) -> bytes:
        """Handle one request body; journal it; return the answer's bytes."""
        try:
            request = _parse_request(body)
        except _BadRequest:
            self.record(kind="request", id=None, outcome="error 1")
            return _answer(1)
        command = _field(request, "command")
        request_id = _field(request, "id")
        error = self._account_error(request)
        event, extra = {}, ""
        if error is None:
            handler = {"send": self._send, "status": self._status, "balance": self._balance}.get(command)
            if handler is None:
                error = 6
            else:
                error, event, extra = handler(request, request_id)
        self.record(kind=command if command in ("send", "status", "balance") else "request",
                    id=request_id or None, outcome=event.pop("outcome", f"error {error}"), **event)
        return _answer(error or 0, request_id, extra)

    def _account_error(self, request: Element) -> int | None:
        if _field(request, "user_id") != self.user_id:
            return 3
        if _field(request, "user") != self.user or _field(request, "pwd") != self.password:
            return 4
        return 5 if self.blocked else None

    def _send(self, request: Element, request_id: str):
        phone, text = _field(request, "phone"), _field(request, "message", strip=False)
        unicode = _field(request, "rus_sms") or _field(request, "translit") or "0"
        valid, schedule = _field(request, "valid") or "1", _field(request, "schedule")
        event = {"phone": phone, "message": text, "unicode": unicode, "sender": _field(request, "sender"),
                 "valid": valid, "schedule": schedule}
        if not (phone and text.strip() and request_id):
            return 2, event, ""
        if not _PHONES.fullmatch(phone):
            return 8, event, ""
        if not _DIGITS.fullmatch(request_id) or not (_DIGITS.fullmatch(valid) and 1 <= int(valid) <= 48):
            return 2, event, ""
        phones = phone.split(",")
        with self._state:
            if request_id in self.requests:
                return 7, {**event, "outcome": "duplicate"}, ""
            if len(text) > (64 if unicode == "1" else 140):
                return 10, event, ""
            try:
                due = _due(schedule)
            except ValueError:
                return 11, event, ""
            cost = self.price * len(phones)
            if cost > self.balance:
                return 9, event, ""
            self.balance -= cost
            self.requests[request_id] = {"phones": phones, "accepted": time.time(), "due": due}
        return None, {**event, "outcome": "accepted"}, ""

    def _status(self, request: Element, request_id: str):
        with self._state:
            sent = self.requests.get(request_id)
        if sent is None:
            return 12, {}, ""
        now = time.time()
        dests = [(phone, self._dest_status(phone, sent, now)) for phone in sent["phones"]]
        overall = 2 if any(status in (0, 8) for _, status in dests) else 4
        stamp = datetime.fromtimestamp(max(sent["accepted"], sent["due"] or 0)).strftime("%Y-%m-%d  \n%H:%M")
        lines = "".join(f"<dest><phone>{phone}</phone><time>{stamp}</time><status>{status}</status></dest>  \n"
                        for phone, status in dests)
        extended = f"<extended>  \n{lines}</extended>  \n" if _field(request, "extended") not in ("", "0") else ""
        return None, {"outcome": "ok", "statuses": [status for _, status in dests]}, \
            f"<status>{overall} </status>  \n{extended}"

    def _dest_status(self, phone: str, sent: dict, now: float) -> int:
        if sent["due"] is not None and now < sent["due"]:
            return 0
        if now - max(sent["accepted"], sent["due"] or 0) < self.pending_s:
            return 8
        return 2 if self.undeliverable_suffix and phone.endswith(self.undeliverable_suffix) else 1

    def _balance(self, request: Element, request_id: str):
        with self._state:
            balance = self.balance
        shown = f"{balance:.0f}" if balance == int(balance) else f"{balance:.2f}"
        return None, {"outcome": "ok"}, f"<balance>{shown}</balance>\n"


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options) -> None:
    """Serve a Mobilgroup stand-in until interrupted (Ctrl-C); `options` as for `MobilgroupSimulator`."""
    simulator = MobilgroupSimulator(port, host=host, **options)
    run_until_interrupted(simulator, f"Mobilgroup simulator at {simulator.api_url} "
                                     f"(user_id {simulator.user_id}, user {simulator.user})")
