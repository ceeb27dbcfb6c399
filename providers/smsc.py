"""SMS Center (smsc.ru) over SMPP 3.4: the submitting client, and the reading of receipts and replies.

`SmscClient` keeps one bound transmitter session per client object (one per worker process: each process
builds its own client, so N processes keep N submits in flight). The session is bound on first use,
guarded by a lock so two threads never share it, kept alive past the server's two-minute idle drop by a
background `enquire_link`, checked for a closed peer before every submit, and rebound after a broken
connection; after a failed connect or bind, binds are retried no sooner than an exponential backoff
allows, and sends meanwhile fail fast with the same kind of error. A one-part message is one round trip.

`submit_sm_resp` statuses map to errors as in `STATUS_ERRORS`: throttled or queue full ->
`ThrottledError`; login and account problems -> `AccountError`; a bad destination or a malformed message
-> `PermanentError`; system errors and anything unknown -> `TransientError`.

A long text goes as UDH-concatenated parts, submitted one after another (see `providers.smsc_text` for
encodings, the comment after `"\n~~~\n"`, and channel prefixes). A text with a channel prefix is sent
only when its channel is among `channels` (`SMS_SMSC_CHANNELS`: `viber`, `tgm` …); otherwise, like a text
that is only a comment, it is refused with `PermanentError` before anything is sent. If a later part fails
after earlier parts were accepted, the message is reported as `PermanentError`: a retry would send the
first parts twice. A connection lost after a submit was written but before its answer is a
`TransientError`; whether that part arrived is unknown, so a retry may deliver it twice (at-least-once, as
with any SMPP client).

`parse_deliver_sm` turns the fields of a `deliver_sm` into a `DeliveryReport`: a delivery receipt in the
text form (`id:… sub:… dlvrd:… submit date:… done date:… stat:… err:… text:…`), the HLR form (`id:… stat:…
err:… imsi:… mcc:… mnc:… cn:… net:… …`, strings URL-encoded) or with the TLVs `receipted_message_id`,
`message_state`, `network_error_code` (the TLVs win); or a recipient's reply (an MO message).
"""
from __future__ import annotations

import logging
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from smpplib import client as smpp_client
from smpplib import consts, exceptions, smpp

from providers import smsc_text
from providers.base import (
    Accepted,
    AccountError,
    DeliveryReport,
    OutgoingMessage,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
)
from providers.text import check_recipient, sendable_text

log = logging.getLogger(__name__)
SMPPLIB_LOGGER = f"{__name__}.smpplib"
# smpplib dumps every PDU in hex at DEBUG, numbers and texts included: keep it at INFO whatever the root.
logging.getLogger(SMPPLIB_LOGGER).setLevel(logging.INFO)

ESM_UDHI = 0x40
# What a failed submit_sm_resp means. Anything not listed is TransientError (retried, then `error`).
STATUS_ERRORS: dict[int, tuple[type[ProviderError], str]] = {
    0x01: (PermanentError, "the message length is invalid"),
    0x04: (TransientError, "the SMPP session was not bound"),
    0x05: (TransientError, "the SMPP session was already bound"),
    0x06: (PermanentError, "invalid priority flag"),
    0x07: (PermanentError, "invalid delivery receipt request"),
    0x08: (TransientError, "smsc.ru had a system error"),
    0x0A: (AccountError, "smsc.ru refused the sender name (source address): check SMS_SMSC_SOURCE_ADDR"),
    0x0B: (PermanentError, "invalid recipient number"),
    0x0D: (AccountError, "smsc.ru refused the login: check SMS_SMSC_SYSTEM_ID and SMS_SMSC_PASSWORD"),
    0x0E: (AccountError, "smsc.ru refused the password: check SMS_SMSC_PASSWORD"),
    0x0F: (AccountError, "smsc.ru does not know the login: check SMS_SMSC_SYSTEM_ID"),
    0x14: (ThrottledError, "smsc.ru's queue is full"),
    0x15: (PermanentError, "invalid service type"),
    0x43: (PermanentError, "invalid message class (esm_class)"),
    0x45: (TransientError, "smsc.ru did not take the message (submit failed)"),
    0x48: (AccountError, "smsc.ru refused the sender name type: check SMS_SMSC_SOURCE_ADDR"),
    0x49: (AccountError, "smsc.ru refused the sender name type: check SMS_SMSC_SOURCE_ADDR"),
    0x50: (PermanentError, "invalid recipient number type"),
    0x51: (PermanentError, "invalid recipient number plan"),
    0x53: (AccountError, "smsc.ru refused the system type: check SMS_SMSC_SYSTEM_TYPE"),
    0x58: (ThrottledError, "smsc.ru asked to slow down (too fast, or the same message within a minute)"),
    0x61: (PermanentError, "invalid scheduled delivery time"),
    0x62: (PermanentError, "invalid validity period"),
    0x64: (TransientError, "smsc.ru had a temporary error"),
    0x65: (PermanentError, "smsc.ru rejected the message permanently"),
    0x66: (PermanentError, "smsc.ru rejected the message"),
    0xC0: (PermanentError, "smsc.ru could not read an optional field of the message"),
    0xC1: (PermanentError, "smsc.ru does not allow an optional field of the message"),
    0xC2: (PermanentError, "smsc.ru read an optional field of the wrong length"),
    0xC3: (PermanentError, "smsc.ru expected an optional field"),
    0xC4: (PermanentError, "smsc.ru refused the value of an optional field"),
}
_THROTTLE_RETRY_S = {0x58: 60.0, 0x14: 10.0}
"""0x58 waits out the identical-request minute (our own rate limiter already keeps us under the rate)."""
_BIND_STATUSES = {0x04, 0x0D, 0x0E, 0x0F}
"""Statuses after which the session is dropped and bound again."""


def status_error(status: int) -> ProviderError:
    """The error a failed `submit_sm_resp` (or bind response) with `status` stands for."""
    kind, words = STATUS_ERRORS.get(status, (TransientError, "smsc.ru answered an unknown error"))
    text = f"{words} (SMPP status 0x{status:02X})"
    if kind is ThrottledError:
        return ThrottledError(text, retry_after=_THROTTLE_RETRY_S.get(status, 60.0))
    return kind(text)


class _SessionLost(Exception):
    """The SMPP connection broke or the peer unbound; the session must be bound anew."""


def _address_fields(source_addr: str | None) -> dict[str, Any]:
    if not source_addr:
        return {"source_addr_ton": consts.SMPP_TON_UNK, "source_addr_npi": consts.SMPP_NPI_UNK,
                "source_addr": ""}
    if source_addr.lstrip("+").isdigit():
        return {"source_addr_ton": consts.SMPP_TON_INTL, "source_addr_npi": consts.SMPP_NPI_ISDN,
                "source_addr": source_addr.lstrip("+")}
    return {"source_addr_ton": consts.SMPP_TON_ALNUM, "source_addr_npi": consts.SMPP_NPI_UNK,
            "source_addr": source_addr}


class SmscClient:
    """smsc.ru over SMPP; see the module docstring. Thread-safe; one bound session per object."""

    name = "smsc"

    def __init__(self, *, host: str, port: int, system_id: str, password: str, system_type: str = "",
                 source_addr: str | None = None, timeout: float = 15.0, max_parts: int = 6,
                 enquire_link_s: float = 30.0, rebind_min_s: float = 0.5, rebind_max_s: float = 60.0,
                 channels: frozenset[str] = frozenset()):
        self.host, self.port = host, int(port)
        self._system_id, self._password, self._system_type = system_id, password, system_type or ""
        self._source = _address_fields(source_addr)
        self.timeout = timeout
        self.max_parts = max_parts
        self.channels = frozenset(channels)
        """Names of the channels (`smsc_text.channel_name`) a text may ask for by its prefix."""
        self.enquire_link_s = enquire_link_s
        self._rebind_min_s, self._rebind_max_s = rebind_min_s, rebind_max_s
        self._lock = threading.Lock()
        self._smpp: smpp_client.Client | None = None
        self._last_io = 0.0
        self._bind_failures = 0
        self._bind_retry_at = 0.0
        self._bind_error: ProviderError | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self.binds = 0
        """How many sessions this client has bound (the tests watch reconnects through it)."""

    @property
    def iso(self) -> bool:
        return self._system_type.upper() == "ISO"

    # --- the Provider protocol ------------------------------------------------------------------
    def check(self, message: OutgoingMessage) -> int:
        return self._layout(message).billed_parts

    def send(self, message: OutgoingMessage) -> Accepted:
        plan = self._layout(message)
        short_messages = plan.short_messages(ref=message.reference)
        ids: list[str] = []
        with self._lock:
            for octets in short_messages:
                try:
                    ids.append(self._submit(message.recipient, plan, octets))
                except ProviderError as exc:
                    if not ids:
                        raise
                    raise PermanentError(
                        f"smsc.ru accepted only {len(ids)} of {len(short_messages)} parts ({exc}); the rest "
                        "is not resent, so that the first parts are not sent twice"
                    ) from exc
        return Accepted(provider_message_id=",".join(ids), parts=plan.billed_parts, reports_by_id=True)

    def close(self) -> None:
        """Stop the keep-alive and unbind."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=self.timeout)
            self._keeper = None
        with self._lock:
            if self._smpp is not None:
                try:
                    self._exchange(smpp.make_pdu("unbind", client=self._smpp), min(self.timeout, 2.0))
                except (_SessionLost, ProviderError):
                    pass
                self._drop()

    # --- text -----------------------------------------------------------------------------------
    def _layout(self, message: OutgoingMessage) -> smsc_text.Layout:
        check_recipient(message.recipient)
        channel = smsc_text.channel_of(message.text)
        if channel is None:
            sendable_text(message.text)  # refuses an empty text and one that is only a comment
        elif smsc_text.channel_name(channel) not in self.channels:
            raise PermanentError(f"the text starts with smsc.ru's {channel} channel prefix, and the "
                                 f"{smsc_text.channel_name(channel)} channel is not enabled (SMS_SMSC_CHANNELS)")
        plan = smsc_text.layout(message.text, iso=self.iso)
        if plan.billed_parts > self.max_parts:
            raise PermanentError(f"the message text is too long: {plan.billed_parts} SMS parts, "
                                 f"at most {self.max_parts} allowed")
        return plan

    # --- session --------------------------------------------------------------------------------
    def _submit(self, recipient: str, plan: smsc_text.Layout, octets: bytes) -> str:
        """Submit one part on a live session; return smsc.ru's message id. Caller holds the lock."""
        self._ensure_session()
        payload = {"short_message": octets} if len(octets) <= smsc_text.MAX_SHORT_MESSAGE \
            else {"message_payload": octets}
        pdu = smpp.make_pdu(
            "submit_sm", client=self._smpp, **self._source,
            dest_addr_ton=consts.SMPP_TON_INTL, dest_addr_npi=consts.SMPP_NPI_ISDN,
            destination_addr=recipient, esm_class=ESM_UDHI if plan.concatenated else 0,
            registered_delivery=1, data_coding=plan.data_coding, **payload,
        )
        try:
            resp = self._exchange(pdu, self.timeout)
        except _SessionLost as exc:
            self._drop()
            raise TransientError(f"the connection to smsc.ru broke before it answered ({exc})") from None
        if resp.status != consts.SMPP_ESME_ROK:
            if resp.status in _BIND_STATUSES:
                self._drop()
            raise status_error(resp.status)
        return (resp.message_id or b"").decode("ascii", "replace")

    def _ensure_session(self) -> None:
        """Make sure a bound, live session exists, binding one if needed. Caller holds the lock."""
        if self._smpp is not None:
            try:
                self._drain()
                if time.monotonic() - self._last_io > self.enquire_link_s:
                    self._exchange(smpp.make_pdu("enquire_link", client=self._smpp), self.timeout)
            except _SessionLost:
                log.info("smsc SMPP session lost; binding again")
                self._drop()
        if self._smpp is None:
            self._bind()

    def _bind(self) -> None:
        now = time.monotonic()
        if self._bind_error is not None and now < self._bind_retry_at:
            raise type(self._bind_error)(str(self._bind_error))
        conn = smpp_client.Client(self.host, self.port, timeout=self.timeout, allow_unknown_opt_params=True,
                                  logger_name=SMPPLIB_LOGGER)
        try:
            conn.connect()
            conn.bind_transmitter(system_id=self._system_id, password=self._password,
                                  system_type=self._system_type)
        except exceptions.PDUError as exc:
            status = exc.args[1] if len(exc.args) > 1 else consts.SMPP_ESME_RBINDFAIL
            raise self._bind_failed(conn, status_error(status)) from None
        except (exceptions.ConnectionError, OSError, exceptions.UnknownCommandError, struct.error):
            raise self._bind_failed(
                conn, TransientError(f"cannot connect to smsc.ru SMPP at {self.host}:{self.port}")
            ) from None
        self._smpp, self._last_io = conn, time.monotonic()
        self._bind_failures, self._bind_error = 0, None
        self.binds += 1
        log.info("smsc SMPP session bound as transmitter")
        if self._keeper is None and self.enquire_link_s > 0:
            self._stop.clear()
            self._keeper = threading.Thread(target=self._keep_alive, name="smsc-enquire-link", daemon=True)
            self._keeper.start()

    def _bind_failed(self, conn: smpp_client.Client, error: ProviderError) -> ProviderError:
        """Note a failed bind and when the next may be tried; return `error` for the caller to raise."""
        conn.disconnect()
        self._bind_failures += 1
        delay = min(self._rebind_max_s, self._rebind_min_s * 2 ** (self._bind_failures - 1))
        self._bind_retry_at, self._bind_error = time.monotonic() + delay, error
        log.warning("smsc SMPP bind failed (%s); next try in %.1f s", error, delay)
        return error

    def _drop(self) -> None:
        if self._smpp is not None:
            self._smpp.disconnect()
            self._smpp = None

    def _drain(self) -> None:
        """Answer what the peer sent while we were idle, and notice a closed connection before we
        write a submit into it (a write to a closed peer succeeds, only the read would fail)."""
        sock = self._smpp._socket  # smpplib exposes no readiness check of its own
        while select.select([sock], [], [], 0)[0]:
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    raise _SessionLost("closed by smsc.ru")
            except OSError as exc:
                raise _SessionLost("connection reset") from exc
            self._answer_peer(self._read())

    def _read(self):
        try:
            pdu = self._smpp.read_pdu()
        except (exceptions.ConnectionError, exceptions.PDUError, exceptions.UnknownCommandError,
                OSError, struct.error) as exc:
            raise _SessionLost(type(exc).__name__) from exc
        self._last_io = time.monotonic()
        return pdu

    def _exchange(self, request, timeout: float):
        """Send `request` and return its response, answering whatever else the peer sends meanwhile."""
        deadline = time.monotonic() + timeout
        try:
            self._smpp.send_pdu(request)
        except (exceptions.ConnectionError, exceptions.PDUError, OSError) as exc:
            raise _SessionLost(type(exc).__name__) from exc
        while True:
            if time.monotonic() > deadline:
                raise _SessionLost(f"no answer within {timeout:g} s")
            pdu = self._read()
            if pdu.is_response() and pdu.sequence == request.sequence:
                return pdu
            self._answer_peer(pdu)

    def _answer_peer(self, pdu) -> None:
        if pdu.command == "enquire_link":
            self._reply(pdu, "enquire_link_resp")
        elif pdu.command == "unbind":
            self._reply(pdu, "unbind_resp")
            raise _SessionLost("smsc.ru unbound the session")

    def _reply(self, request, command: str) -> None:
        resp = smpp.make_pdu(command, client=self._smpp)
        resp.sequence = request.sequence
        try:
            self._smpp.send_pdu(resp)
        except (exceptions.ConnectionError, exceptions.PDUError, OSError) as exc:
            raise _SessionLost(type(exc).__name__) from exc

    def _keep_alive(self) -> None:
        """Background thread: an enquire_link whenever the session has been idle for enquire_link_s."""
        while not self._stop.wait(max(0.05, self.enquire_link_s / 4)):
            idle = time.monotonic() - self._last_io >= self.enquire_link_s
            if not idle or not self._lock.acquire(blocking=False):  # a busy session needs no keep-alive
                continue
            try:
                if self._smpp is not None:
                    self._drain()
                    self._exchange(smpp.make_pdu("enquire_link", client=self._smpp), self.timeout)
            except _SessionLost:
                log.info("smsc SMPP session lost while idle; it is bound again on the next send")
                self._drop()
            finally:
                self._lock.release()


# --- receipts and replies ---------------------------------------------------------------------------
ESM_RECEIPT_TYPES = {0x04, 0x20}
"""esm_class message types (bits 2-5) of an SMSC delivery receipt and an intermediate notification."""

# SMPP message_state values (TLV 0x0427) and the receipt `stat:` words they correspond to.
MESSAGE_STATES = {1: "ENROUTE", 2: "DELIVRD", 3: "EXPIRED", 4: "DELETED", 5: "UNDELIV", 6: "ACCEPTD",
                  7: "UNKNOWN", 8: "REJECTD"}
_STAT_OUTCOME = {
    "DELIVRD": ("delivered", ""),
    "DELIVERED": ("delivered", ""),
    "ENROUTE": ("accepted", ""),
    "ACCEPTD": ("accepted", ""),
    "ACCEPTED": ("accepted", ""),
    "UNDELIV": ("undelivered", "not delivered: the network could not deliver it"),
    "UNDELIVERABLE": ("undelivered", "not delivered: the network could not deliver it"),
    "EXPIRED": ("undelivered", "not delivered: the phone was unreachable until the message expired"),
    "REJECTD": ("undelivered", "not delivered: rejected by the operator or by smsc.ru"),
    "REJECTED": ("undelivered", "not delivered: rejected by the operator or by smsc.ru"),
    "DELETED": ("undelivered", "not delivered: deleted before delivery"),
    "UNKNOWN": ("undelivered", "not delivered: the final status is unknown"),
}
# smsc.ru's error codes in a status ("коды ошибок в статусе", public docs), in operators' words.
SMSC_ERRORS = {
    1: "the number does not exist",
    6: "the phone is off or out of coverage",
    11: "the number cannot receive SMS",
    12: "an error in the recipient's phone or SIM card",
    13: "the recipient is blocked by the operator",
    21: "the recipient's phone does not support the service",
    200: "virtual sending (smsc.ru test mode)",
    219: "the recipient changed the SIM card recently",
    220: "the operator's queue for this recipient is full",
    240: "the recipient is busy",
    243: "no contract for this destination",
    244: "mailings are forbidden for this recipient",
    245: "no status was received",
    246: "sending time restriction",
    247: "message limit exceeded",
    248: "no route to this number",
    249: "invalid number format",
    250: "the number is forbidden by the account settings",
    251: "the limit of messages to one number was exceeded",
    252: "the number is forbidden",
    253: "rejected by the spam filter",
    254: "the sender name is not registered",
    255: "rejected by the operator",
}
_RECEIPT_KEY = re.compile(r"(?:^|\s)(id|sub|dlvrd|submit date|done date|stat|err|text|imsi|msc|mcc|mnc|cn|"
                          r"net|rcn|rnet):", re.IGNORECASE)
_URL_ENCODED = {"cn", "net", "rcn", "rnet"}
_HLR_EXTRA = ("mcc", "mnc", "cn", "net", "rcn", "rnet")
"""HLR facts kept in `extra` (the IMSI and MSC identify a subscriber and are left out)."""


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).rstrip(b"\0").decode("latin-1")
    return str(value)


def parse_receipt_text(text: str) -> dict[str, str]:
    """The `key:value` fields of a receipt text (keys lower-case; `text:` takes the rest of the line;
    URL-encoded HLR strings decoded)."""
    fields: dict[str, str] = {}
    matches = list(_RECEIPT_KEY.finditer(text))
    for match, following in zip(matches, matches[1:] + [None]):
        key = match.group(1).lower()
        if key == "text":
            fields[key] = text[match.end():]
            break
        value = text[match.end(): following.start() if following else len(text)].strip()
        fields[key] = unquote_plus(value) if key in _URL_ENCODED else value
    return fields


def _reason(stat: str, err: str, words: str) -> str:
    if not words:
        return ""
    code = int(err) if err.isdigit() else None
    if code and code in SMSC_ERRORS:
        return f"{words} ({SMSC_ERRORS[code]}, error {code})"
    return f"{words} (error {err})" if code else words


def _strip_udh(data: bytes, esm_class: int) -> bytes:
    if esm_class & ESM_UDHI and data:
        return data[1 + data[0]:]
    return data


def _user_data(fields: Mapping[str, Any]) -> bytes:
    """A `deliver_sm`'s octets: `message_payload` when present, else `short_message`."""
    data = fields.get("message_payload") or fields.get("short_message") or b""
    return data.encode("latin-1") if isinstance(data, str) else bytes(data)


@dataclass(frozen=True)
class ReplyPart:
    """Where one `deliver_sm` sits in a reply the phone split into several SMS: the sender's `reference`
    for the whole reply, how many parts it has (`count`, at least 2) and this one's `number` (from 1)."""

    reference: int
    count: int
    number: int


def reply_part(fields: Mapping[str, Any]) -> ReplyPart | None:
    """The part of a split reply that a `deliver_sm` (fields as for `parse_deliver_sm`) carries, from its
    user data header (information element 0x00 or 0x08) or its `sar_*` parameters; None for anything else."""
    data = _user_data(fields)
    found = None
    if int(fields.get("esm_class") or 0) & ESM_UDHI and data:
        header, k = data[1:1 + data[0]], 0
        while k + 2 <= len(header):
            element, size = header[k], header[k + 1]
            value = header[k + 2:k + 2 + size]
            if len(value) < size:  # a header cut short: no part can be read from it
                break
            if element == 0x00 and size == 3:
                found = (value[0], value[1], value[2])
            elif element == 0x08 and size == 4:
                found = (int.from_bytes(value[:2], "big"), value[2], value[3])
            k += 2 + size
    elif fields.get("sar_msg_ref_num") is not None:
        found = tuple(int(fields.get(name) or 0) for name in
                      ("sar_msg_ref_num", "sar_total_segments", "sar_segment_seqnum"))
    if found is None or not (2 <= found[1] and 1 <= found[2] <= found[1]):
        return None
    return ReplyPart(*found)


def parse_deliver_sm(fields: Mapping[str, Any]) -> DeliveryReport:
    """A `DeliveryReport` from the fields of a `deliver_sm` (`vars()` of smpplib's PDU, or any mapping
    with `esm_class`, `source_addr`, `data_coding`, `short_message`, and optionally `message_payload`,
    `receipted_message_id`, `message_state`, `network_error_code`). Raises `ValueError` for a receipt
    that names no message."""
    esm_class = int(fields.get("esm_class") or 0)
    data = _user_data(fields)
    receipted_id = _text(fields.get("receipted_message_id"))
    is_receipt = (esm_class & 0x3C) in ESM_RECEIPT_TYPES or bool(receipted_id)
    if not is_receipt:
        sender = "".join(ch for ch in _text(fields.get("source_addr")) if ch.isdigit())
        text = smsc_text.decode(_strip_udh(bytes(data), esm_class), int(fields.get("data_coding") or 0))
        return DeliveryReport(outcome="accepted", reply_text=text, recipient=sender or None)

    parsed = parse_receipt_text(bytes(data).decode("latin-1"))
    message_id = receipted_id or parsed.get("id", "")
    if not message_id:
        raise ValueError("a delivery receipt without a message id")
    stat = parsed.get("stat", "").upper()
    state = fields.get("message_state")
    if state is not None and int(state) in MESSAGE_STATES:
        stat = MESSAGE_STATES[int(state)]
    err = parsed.get("err", "")
    network_error = fields.get("network_error_code")
    if isinstance(network_error, (bytes, bytearray)) and len(network_error) == 3:
        err = str(int.from_bytes(network_error[1:], "big"))
    outcome, words = _STAT_OUTCOME.get(stat, ("accepted", ""))
    extra = {"stat": stat, "err": err}
    extra.update({key: parsed[key] for key in _HLR_EXTRA if parsed.get(key)})
    return DeliveryReport(outcome=outcome, provider_message_id=message_id, reason=_reason(stat, err, words),
                          extra=extra)
