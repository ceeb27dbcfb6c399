"""The smsc.ru SMPP receiver (`smsctl smpp-receiver`): a long-running loop, bound as a receiver, that
turns every `deliver_sm` (delivery receipts and recipients' replies) into a `DeliveryReport` and applies
it through `workflow.reports.apply_smpp_receipt`; and `ReceiptHandler`, which the workers' client also
hands what its transceiver session receives (with `SMS_SMSC_BIND=transceiver`).

It connects as the workers do (`SMS_SMSC_HOST` tried in order, TLS with `SMS_SMSC_TLS`), keeps the session
alive with `enquire_link` while idle (smsc.ru drops a session idle for two minutes), notices a dead peer
when nothing at all came back for two keep-alive periods, and binds again after a broken connection or a
failed bind with an exponential backoff; a session that ended within `stable_s` of its bind counts as a
failure too, so a peer that drops us at once, or sends what cannot be read, is not met with a tight loop
of binds. A bind refused for the login is the fleet's business (`workflow.logins`): the receiver opens
smsc.ru's circuit in the database, does not bind while it is open for a refused login, and binds again
only as the fleet's one probe (or at once when started with other credentials). A PDU announcing a length
outside what SMPP allows (`providers.smsc.MAX_PDU_OCTETS`) closes the session before any of it is read;
one that is framed but unreadable is answered `generic_nack`, a `deliver_sm` whose fields make no sense is
acknowledged and ignored, and the session goes on.

Every `deliver_sm` is answered: `ESME_ROK` once the report was applied, or when it names no message of
ours or cannot be read (sending it again would not help); `ESME_RX_T_APPN` (temporary error, so that
smsc.ru delivers it again later) only when applying it failed, e.g. the database was down.

Receipts (`workflow.reports.apply_smpp_receipt`): the id is looked up as written and in its other forms
(`providers.smsc.message_id_forms`: smsc.ru does not say whether receipts write ids in decimal or
hexadecimal). A message sent in several parts is `delivered` only once every part's receipt said so (each
delivered part's id is settled in `sms_message_ids`, `db.store.settle_delivered_part`); one undelivered
part makes it `failed` with that part's reason. Should the database fail between settling the last part
and applying the report, the row keeps `success` without its final state (smsc.ru's redelivery then finds
no id).

A receipt can overtake the worker that records its message id: smsc.ru may answer `submit_sm` and send
an immediate receipt (a rejection, say) before the worker has written the id down. A receipt for an id we
do not know is therefore acknowledged at once but applied again after `UNKNOWN_RETRY_S` before it is
given up (kept in memory: a receiver restart in those seconds loses it, and the row keeps `success`).

A reply the phone split into several SMS arrives as several `deliver_sm`, in any order: the parts are held
until the last one comes and applied as one reply, so `responsenote` gets all of it. One still incomplete
after `SPLIT_REPLY_WAIT_S` is applied as far as it came, the gap marked (held in memory: a receiver restart
in that time loses the parts held, and parts delivered to different processes' transceiver sessions are
not joined).
"""
from __future__ import annotations

import functools
import heapq
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from smpplib import consts

from db.engine import engine_for
from providers import registry
from providers.base import DeliveryReport, LoginRefused, ProviderError
from providers.registry import RECEIVED
from providers.smsc import (
    ESME_RINVCMDID,
    ESME_RX_T_APPN,
    BadPdu,
    Link,
    ReplyPart,
    SessionLost,
    bind,
    parse_deliver_sm,
    parse_hosts,
    reply_part,
    tls_context,
)

from workflow.logins import ReceiverLogins
from workflow.reports import apply_smpp_receipt

log = logging.getLogger(__name__)

Apply = Callable[[str, DeliveryReport], str]
UNKNOWN_RETRY_S = (1.0, 4.0, 15.0)
SPLIT_REPLY_WAIT_S = 300.0
"""How long the parts of a split reply wait for the rest."""
MISSING_PART = "[…]"
_POLL_S = 0.5


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
                result = apply(RECEIVED, report)
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
                result = apply(RECEIVED, self._joined(key))
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


class ReceiptHandler:
    """What becomes of each `deliver_sm`, on the receiver's session or a worker's transceiver session:
    `deliver(fields)` applies it (or holds it) and returns the `deliver_sm_resp` status; `tick()` applies
    what waited long enough (overtaken receipts, incomplete split replies). Thread-safe."""

    def __init__(self, apply: Apply, unknown_retry_s: tuple[float, ...] = UNKNOWN_RETRY_S,
                 split_reply_wait_s: float = SPLIT_REPLY_WAIT_S):
        self._apply = apply
        self._overtaken = _Overtaken(unknown_retry_s)
        self._split = _SplitReplies(split_reply_wait_s)
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._overtaken.run_due(self._apply)
            self._split.run_due(self._apply)

    def deliver(self, fields: dict[str, Any]) -> int:
        try:
            report = parse_deliver_sm(fields)
            part = reply_part(fields) if report.reply_text is not None else None
        except Exception as exc:  # any field of a PDU may be nonsense; sending it again would not help
            log.warning("smsc deliver_sm ignored: it cannot be read (%s)", type(exc).__name__)
            return consts.SMPP_ESME_ROK
        with self._lock:
            return self._deliver(report, part)

    def _deliver(self, report: DeliveryReport, part: ReplyPart | None) -> int:
        whole = None
        if part is not None:
            whole = self._split.add(report, part)
            if not whole:
                log.info("smsc reply part %d of %d %s", part.number, part.count,
                         "held for the rest" if whole is None else "of a reply already applied; ignored")
                return consts.SMPP_ESME_ROK
            report = whole[1]
        kind = "reply" if report.reply_text is not None else f"receipt ({report.outcome})"
        try:
            result = self._apply(RECEIVED, report)
        except Exception:
            # A split reply's parts stay held: smsc.ru's next delivery of this part completes it again.
            log.exception("smsc %s could not be applied; smsc.ru will deliver it again", kind)
            return ESME_RX_T_APPN
        if whole:
            self._split.applied(whole[0])
        log.info("smsc %s: %s", kind, result)
        if result == "unknown" and report.reply_text is None:
            self._overtaken.add(report)
        return consts.SMPP_ESME_ROK


_SETTINGS_DATABASE = object()
"""`run_receiver`'s default `logins`: the circuit in the settings' database."""


def run_receiver(settings, stop_event: threading.Event | None = None, apply: Apply | None = None, *,
                 enquire_link_s: float = 30.0, reconnect_min_s: float = 1.0,
                 reconnect_max_s: float = 60.0, unknown_retry_s: tuple[float, ...] = UNKNOWN_RETRY_S,
                 split_reply_wait_s: float = SPLIT_REPLY_WAIT_S, stable_s: float = 60.0,
                 logins: ReceiverLogins | None | object = _SETTINGS_DATABASE) -> None:
    """Receive smsc.ru receipts and replies until `stop_event` is set; without one, until SIGTERM or
    SIGINT (the session is then unbound cleanly). `apply` is called as `apply(provider, report)`; it
    defaults to `workflow.reports.apply_smpp_receipt` on the settings' database. `logins` is the account
    circuit the binds obey, by default the one in the settings' database; None only where there is no
    database (a test of the session alone)."""
    settings.require(*registry.entry(RECEIVED).required)
    if apply is None:
        apply = functools.partial(apply_smpp_receipt, engine_for(settings.database_url),
                                  optout_words=settings.optout_word_list)
    if logins is _SETTINGS_DATABASE:
        logins = ReceiverLogins(engine_for(settings.database_url), settings, RECEIVED)
    stop = stop_event or threading.Event()
    if stop_event is None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    handler = ReceiptHandler(apply, unknown_retry_s, split_reply_wait_s)
    hosts = parse_hosts(settings.smsc_host, settings.smsc_port)
    tls = tls_context(settings.smsc_ca_file) if settings.smsc_tls else None
    failures = 0
    while not stop.is_set():
        if failures:
            delay = min(reconnect_max_s, reconnect_min_s * 2 ** (failures - 1))
            log.info("smsc SMPP receiver binds again in %.1f s", delay)
            if stop.wait(delay):
                break
        held = logins.wait_s() if logins is not None else 0.0
        if held:
            log.info("smsc SMPP receiver: smsc.ru refused our login; waiting for the fleet's probe (%.0f s)", held)
            stop.wait(held)
            continue
        try:
            link = bind(hosts, mode="receiver", system_id=settings.smsc_system_id,
                        password=settings.smsc_password.get_secret_value(),
                        system_type=settings.smsc_system_type, timeout=settings.http_timeout_s, tls=tls)
        except ProviderError as exc:
            if logins is not None and isinstance(exc, LoginRefused):
                failures = 0  # the circuit, not this loop's backoff, says when to try again
                logins.refused(exc)
                continue
            failures += 1
            if logins is not None:
                logins.failed()
            log.warning("smsc SMPP receiver could not bind (%s)", exc)
            continue
        if logins is not None:
            logins.bound()
        bound_at = time.monotonic()
        try:
            _serve_session(link, stop, handler, enquire_link_s)
        except SessionLost as exc:
            log.warning("smsc SMPP receiver session lost (%s)", exc)
        finally:
            link.close()
        failures = failures + 1 if time.monotonic() - bound_at < stable_s else 1


def _serve_session(link: Link, stop: threading.Event, handler: ReceiptHandler, enquire_link_s: float) -> None:
    """Serve one bound session until the peer goes away (raises `SessionLost`) or `stop` is set (unbinds)."""
    last_rx = last_tx = time.monotonic()
    while not stop.is_set():
        handler.tick()
        now = time.monotonic()
        if now - last_rx > 2 * enquire_link_s + link.timeout:
            raise SessionLost("smsc.ru stopped answering")
        if now - max(last_rx, last_tx) > enquire_link_s:
            link.send(link.make("enquire_link"))
            last_tx = now
        try:
            pdu = link.read(_POLL_S)
        except BadPdu as bad:
            log.warning("smsc SMPP receiver: %s", bad)
            link.nack(bad)
            continue
        if pdu is None:
            continue
        last_rx = time.monotonic()
        if pdu.command == "deliver_sm":
            link.answer(pdu.sequence, "deliver_sm_resp", handler.deliver(vars(pdu)))
        elif pdu.command == "enquire_link":
            link.answer(pdu.sequence, "enquire_link_resp")
        elif pdu.command == "unbind":
            link.answer(pdu.sequence, "unbind_resp")
            raise SessionLost("smsc.ru unbound the session")
        elif not pdu.is_response():
            link.answer(pdu.sequence, "generic_nack", ESME_RINVCMDID)
    try:
        link.send(link.make("unbind"))
        link.read(1.0)
    except (SessionLost, BadPdu):
        pass
