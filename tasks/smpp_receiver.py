"""The smsc.ru SMPP receiver (`smsctl smpp-receiver`): a long-running loop, bound as a receiver, that
turns every `deliver_sm` (delivery receipts and recipients' replies) into a `DeliveryReport` and applies
it through `tasks.reports.apply_report`.

It keeps the session alive with `enquire_link` while idle (smsc.ru drops a session idle for two minutes),
notices a dead peer when nothing at all came back for two keep-alive periods, and binds again after a
broken connection or a failed bind with an exponential backoff. Every `deliver_sm` is answered:
`ESME_ROK` once the report was applied, or when it names no message of ours or cannot be read (sending it
again would not help); `ESME_RX_T_APPN` (temporary error, so that smsc.ru delivers it again later) only
when applying it failed, e.g. the database was down.

A receipt can overtake the worker that records its message id: smsc.ru may answer `submit_sm` and send
an immediate receipt (a rejection, say) before the worker has written the id down. A receipt for an id we
do not know is therefore acknowledged at once but applied again after `UNKNOWN_RETRY_S` before it is
given up (kept in memory: a receiver restart in those seconds loses it, and the row keeps `success`).

A reply the phone split into several SMS arrives as several `deliver_sm`, in any order: the parts are held
until the last one comes and applied as one reply, so `responsenote` gets all of it. One still incomplete
after `SPLIT_REPLY_WAIT_S` is applied as far as it came, the gap marked (held in memory: a receiver restart
in that time loses the parts held).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from smpplib import client as smpp_client
from smpplib import consts, exceptions, smpp

from providers.base import DeliveryReport
from providers.smsc import SMPPLIB_LOGGER, ReplyPart, parse_deliver_sm, reply_part

log = logging.getLogger(__name__)

Apply = Callable[[str, DeliveryReport], str]
ESME_RX_T_APPN = 0x64
UNKNOWN_RETRY_S = (1.0, 4.0, 15.0)
SPLIT_REPLY_WAIT_S = 300.0
"""How long the parts of a split reply wait for the rest."""
MISSING_PART = "[…]"
_POLL_S = 0.5
_BROKEN = (exceptions.ConnectionError, exceptions.PDUError, exceptions.UnknownCommandError, OSError,
           struct.error)


def _default_apply(provider: str, report: DeliveryReport) -> str:
    from tasks.reports import apply_report

    return apply_report(provider, report)


class _Overtaken:
    """Receipts that named no known message yet, each applied again after the next of `delays`."""

    def __init__(self, delays: tuple[float, ...]):
        self.delays = delays
        self._due: list[tuple[float, int, int, DeliveryReport]] = []
        self._seq = itertools.count()

    def add(self, report: DeliveryReport, attempt: int = 0) -> None:
        if attempt < len(self.delays):
            heapq.heappush(self._due, (time.monotonic() + self.delays[attempt], next(self._seq), attempt, report))

    def run_due(self, apply: Apply) -> None:
        while self._due and self._due[0][0] <= time.monotonic():
            _, _, attempt, report = heapq.heappop(self._due)
            try:
                result = apply("smsc", report)
            except Exception:
                log.exception("smsc receipt could not be applied on its retry")
                result = "unknown"
            if result == "unknown":
                if attempt + 1 == len(self.delays):
                    log.info("smsc receipt for an id we never sent; ignored")
                self.add(report, attempt + 1)
            else:
                log.info("smsc receipt (%s), applied on retry: %s", report.outcome, result)


_Key = tuple[str, int, int]  # sender, the sender's reference, how many parts


class _SplitReplies:
    """Parts of split replies, held until each reply is whole or has waited `wait_s`."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self._held: dict[_Key, tuple[float, dict[int, DeliveryReport]]] = {}
        self._applied: dict[_Key, float] = {}  # a part delivered again after its reply was applied

    def add(self, report: DeliveryReport, part: ReplyPart) -> tuple[_Key, DeliveryReport] | None | bool:
        """Hold one part; returns the key and the whole reply once every part is in, None while parts are
        missing, False for a part of a reply already applied."""
        key = (report.recipient or "", part.reference, part.count)
        if key in self._applied:
            return False
        parts = self._held.setdefault(key, (time.monotonic(), {}))[1]
        parts[part.number] = report
        return (key, self._joined(key)) if len(parts) == part.count else None

    def applied(self, key: _Key) -> None:
        self._held.pop(key, None)
        self._applied[key] = time.monotonic()

    def run_due(self, apply: Apply) -> None:
        """Apply the replies that waited `wait_s` for a missing part, as far as they came."""
        now = time.monotonic()
        self._applied = {key: at for key, at in self._applied.items() if now - at < self.wait_s}
        for key in [key for key, (since, _) in self._held.items() if now - since >= self.wait_s]:
            came = len(self._held[key][1])
            try:
                result = apply("smsc", self._joined(key))
            except Exception:
                log.exception("smsc reply with a part missing could not be applied; trying again later")
                self._held[key] = (now, self._held[key][1])
                continue
            self.applied(key)
            log.info("smsc reply with %d of its %d parts (the rest never came): %s", came, key[2], result)

    def _joined(self, key: _Key) -> DeliveryReport:
        parts = self._held[key][1]
        text = "".join(parts[n].reply_text if n in parts else MISSING_PART for n in range(1, key[2] + 1))
        return replace(parts[min(parts)], reply_text=text)


def run_receiver(settings, stop_event: threading.Event | None = None, apply: Apply | None = None, *,
                 enquire_link_s: float = 30.0, reconnect_min_s: float = 1.0,
                 reconnect_max_s: float = 60.0, unknown_retry_s: tuple[float, ...] = UNKNOWN_RETRY_S,
                 split_reply_wait_s: float = SPLIT_REPLY_WAIT_S) -> None:
    """Receive smsc.ru receipts and replies until `stop_event` is set; without one, until SIGTERM or
    SIGINT (the session is then unbound cleanly). `apply` is called as `apply("smsc", report)`; it
    defaults to `tasks.reports.apply_report`."""
    settings.require("smsc_host", "smsc_port", "smsc_system_id", "smsc_password")
    stop = stop_event or threading.Event()
    if stop_event is None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    apply = apply or _default_apply
    overtaken = _Overtaken(unknown_retry_s)
    split = _SplitReplies(split_reply_wait_s)
    failures = 0
    while not stop.is_set():
        conn = smpp_client.Client(settings.smsc_host, settings.smsc_port, timeout=settings.http_timeout_s,
                                  allow_unknown_opt_params=True, logger_name=SMPPLIB_LOGGER)
        try:
            conn.connect()
            conn.bind_receiver(system_id=settings.smsc_system_id,
                               password=settings.smsc_password.get_secret_value(),
                               system_type=settings.smsc_system_type)
        except _BROKEN as exc:
            conn.disconnect()
            failures += 1
            delay = min(reconnect_max_s, reconnect_min_s * 2 ** (failures - 1))
            log.warning("smsc SMPP receiver could not bind (%s); next try in %.1f s", exc, delay)
            stop.wait(delay)
            continue
        failures = 0
        log.info("smsc SMPP receiver bound")
        try:
            _serve_session(conn, stop, apply, enquire_link_s, overtaken, split)
        except _BROKEN as exc:
            log.warning("smsc SMPP receiver session lost (%s); binding again", type(exc).__name__)
        finally:
            conn.disconnect()


def _serve_session(conn: smpp_client.Client, stop: threading.Event, apply: Apply,
                   enquire_link_s: float, overtaken: _Overtaken, split: _SplitReplies) -> None:
    """Serve one bound session until the peer goes away (raises) or `stop` is set (unbinds)."""
    last_rx = last_tx = time.monotonic()
    while not stop.is_set():
        overtaken.run_due(apply)
        split.run_due(apply)
        now = time.monotonic()
        if now - last_rx > 2 * enquire_link_s + conn.timeout:
            raise exceptions.ConnectionError("smsc.ru stopped answering")
        if now - max(last_rx, last_tx) > enquire_link_s:
            conn.send_pdu(smpp.make_pdu("enquire_link", client=conn))
            last_tx = now
        if not select.select([conn._socket], [], [], _POLL_S)[0]:  # smpplib has no readiness check
            continue
        pdu = conn.read_pdu()
        last_rx = time.monotonic()
        if pdu.command == "deliver_sm":
            _reply(conn, pdu, "deliver_sm_resp", _handle_deliver(pdu, apply, overtaken, split))
        elif pdu.command == "enquire_link":
            _reply(conn, pdu, "enquire_link_resp")
        elif pdu.command == "unbind":
            _reply(conn, pdu, "unbind_resp")
            raise exceptions.ConnectionError("smsc.ru unbound the session")
    try:
        conn.unbind()
    except _BROKEN:
        pass


def _handle_deliver(pdu, apply: Apply, overtaken: _Overtaken, split: _SplitReplies) -> int:
    """Apply one deliver_sm (or hold it, a part of a split reply); return the command_status of its
    deliver_sm_resp."""
    fields = vars(pdu)
    try:
        report = parse_deliver_sm(fields)
    except ValueError as exc:
        log.warning("smsc deliver_sm ignored: %s", exc)
        return consts.SMPP_ESME_ROK
    whole = None
    part = reply_part(fields) if report.reply_text is not None else None
    if part is not None:
        whole = split.add(report, part)
        if not whole:
            log.info("smsc reply part %d of %d %s", part.number, part.count,
                     "held for the rest" if whole is None else "of a reply already applied; ignored")
            return consts.SMPP_ESME_ROK
        report = whole[1]
    kind = "reply" if report.reply_text is not None else f"receipt ({report.outcome})"
    try:
        result = apply("smsc", report)
    except Exception:
        # A split reply's parts stay held: smsc.ru's next delivery of this part completes it again.
        log.exception("smsc %s could not be applied; smsc.ru will deliver it again", kind)
        return ESME_RX_T_APPN
    if whole:
        split.applied(whole[0])
    log.info("smsc %s: %s", kind, result)
    if result == "unknown" and report.reply_text is None:
        overtaken.add(report)
    return consts.SMPP_ESME_ROK


def _reply(conn: smpp_client.Client, request, command: str, status: int = consts.SMPP_ESME_ROK) -> None:
    resp = smpp.make_pdu(command, client=conn, status=status)
    resp.sequence = request.sequence
    conn.send_pdu(resp)
