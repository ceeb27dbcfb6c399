"""SMS Center (smsc.ru) over SMPP 3.4: the submitting client, the connection it and the receiver share, and
the reading of receipts and replies.

`SmscClient` keeps one bound session per client object, that is per worker process, shared by all its
threads (`--pool threads`). Up to `window` `submit_sm` are in flight on it at once; a reader thread matches
each answer to its submit by sequence number, so each `send()` still blocks its own caller until its own
`submit_sm_resp` (at most `timeout` seconds). A full window makes a sender wait (within the same
`timeout`), not fail. The session is bound on first use, kept alive past the server's two-minute idle
drop by `enquire_link` whenever nothing came from the peer for `enquire_link_s` (a peer that does not
answer it is taken for dead), and bound again after a lost connection. `hosts` are tried in order
(`host` or `host:port`, e.g. `smpp.smsc.ru,smpp2.smsc.ru`): a host that cannot be reached, or breaks off
before answering the bind, passes to the next; a bind refused for the account (a wrong password, say) is
not tried on the next host: smsc.ru counts refused logins per address, whichever host met them. When none
binds, binds are retried no sooner than an exponential backoff allows, and sends meanwhile fail fast with
the same error. `login_gate`, when given, is called before every bind and may forbid it by raising (the
workflow's fleet-wide circuit of refused logins, `LoginHeld`). With `tls`, every connection is TLS with the server's
certificate and name verified (against `ca_file`, else the system's CAs).

What a failed send raises, by when it failed:

| moment                                               | error                                       |
| ---------------------------------------------------- | ------------------------------------------- |
| before the submit was written (no session, no bind)  | `TransientError` (or `AccountError`)        |
| answered with an error status                        | as in `STATUS_ERRORS`                       |
| written, then the session was lost or no answer came | `UnknownOutcome`: it may have arrived       |
| a later part of a long text, after earlier parts were accepted | `UnknownOutcome` saying "k of n parts were sent" |

`submit_sm_resp` statuses map to errors as in `STATUS_ERRORS`: throttled or queue full ->
`ThrottledError`; login and account problems -> `AccountError`; a bad destination or a malformed message
-> `PermanentError`; system errors and anything unknown -> `TransientError`. ESME_RTHROTTLED (0x58) also
slows the session: from then on submits leave at least `PACE_START_S` apart, twice that after each further
0x58 (up to `PACE_MAX_S`), the gap halving every `PACE_HALF_LIFE_S` without one; a later part of a long
text that is throttled is submitted again at that pace within `timeout` rather than left half sent.

A system id longer than 15 characters or a password longer than 8 (SMPP 3.4's fields, which smpplib would
cut silently), or one that is not ASCII, is refused with `ValueError` by the constructor and by `bind`:
smsc.ru's SMPP page states no longer limit, and a cut password is a refused login.

A long text goes as UDH-concatenated parts with a 16-bit reference (see `providers.smsc_text` for
encodings, the comment after `"\\n~~~\\n"`, and channel prefixes), submitted one after another. A text
with a channel prefix is sent only when its channel is among `channels` (`SMS_SMSC_CHANNELS`: `viber`,
`tgm` …); otherwise, like a text that is only a comment, it is refused with `PermanentError` before
anything is sent.

With `bind="transceiver"` the session is bound as a transceiver and smsc.ru may deliver receipts and
replies on it: each `deliver_sm` goes to `receipts.deliver(fields)` (on a thread of its own, never the
reader's), whose return value is the `deliver_sm_resp` status; `receipts.tick()` is called about twice
a second meanwhile. On a transmitter session a stray `deliver_sm` is answered "try again later", so that
smsc.ru gives it to the receiver.

`parse_deliver_sm` turns the fields of a `deliver_sm` into a `DeliveryReport`: a delivery receipt in the
text form (`id:… sub:… dlvrd:… submit date:… done date:… stat:… err:… text:…`), the HLR form (`id:… stat:…
err:… imsi:… mcc:… mnc:… cn:… net:… …`, strings URL-encoded) or with the TLVs `receipted_message_id`,
`message_state`, `network_error_code` (the TLVs win), with smsc.ru's error code in words and in figures
(`SMSC_ERRORS`: "…: the subscriber is blocked (…) (smsc.ru error 13)") and, from smsc.ru's own TLVs, the
message's cost (0x2000) and number of parts (0x2002); or a recipient's reply (an MO message).
`message_id_forms` lists the forms an id in a receipt may stand for (decimal and hexadecimal).
"""
from __future__ import annotations

import logging
import queue
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import unquote_plus

from smpplib import command_codes, consts, smpp

from providers import smsc_text
from providers.base import (
    Accepted,
    AccountError,
    DeliveryReport,
    LoginRefused,
    OutgoingMessage,
    PartlySent,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UnknownOutcome,
)
from providers.text import check_recipient, sendable_text

log = logging.getLogger(__name__)

PLAIN_PORT, TLS_PORT = 3700, 3443
DEFAULT_WINDOW = 300
"""smsc.ru's sample session keeps a window of 300 pending submits at 30 messages/s (they advise
1,000–2,000 for bulk); a window larger than a process's threads costs nothing."""
BIND_MODES = ("transmitter", "transceiver", "receiver")
MAX_PDU_OCTETS = 16 + 512 + 4 + 0xFFFF + 1024
"""The longest PDU we read: the header, a deliver_sm's mandatory fields (under 400 octets), one
`message_payload` at its 64 KiB limit and room for the other optional fields. A peer announcing more is
talking nonsense (or trying to exhaust our memory): the connection is closed."""
MAX_SYSTEM_ID_CHARS, MAX_PASSWORD_CHARS = 15, 8
"""What SMPP 3.4's bind carries of a system id and a password (16 and 9 octets with the closing NUL).
smsc.ru's SMPP page states no other limit, and smpplib cuts a longer value without a word, so a longer one
is refused before any bind: cut, it would be refused as a wrong login, and smsc.ru blocks an address after
5 refused logins in 30 minutes."""
ESME_RINVCMDLEN, ESME_RINVCMDID, ESME_RX_T_APPN = 0x02, 0x03, 0x64
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
    0x0D: (LoginRefused, "smsc.ru refused the login: check SMS_SMSC_SYSTEM_ID and SMS_SMSC_PASSWORD"),
    0x0E: (LoginRefused, "smsc.ru refused the password: check SMS_SMSC_PASSWORD"),
    0x0F: (LoginRefused, "smsc.ru does not know the login: check SMS_SMSC_SYSTEM_ID"),
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
PACE_START_S, PACE_MAX_S, PACE_HALF_LIFE_S = 0.05, 2.0, 30.0
"""After ESME_RTHROTTLED the session leaves at least `PACE_START_S` between submits, twice as much after
each further one (up to `PACE_MAX_S`), and the gap halves every `PACE_HALF_LIFE_S` without one."""
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


def credential_problem(value: str, limit: int) -> str | None:
    """Why `value` cannot go whole into an SMPP 3.4 bind field of `limit` characters, or None."""
    if not value.isascii():
        return "must be Latin letters, digits and punctuation (smsc.ru accepts no others)"
    if len(value) > limit:
        return f"is {len(value)} characters long; SMPP 3.4 carries at most {limit}, and a cut one is refused"
    return None


def check_credentials(system_id: str, password: str) -> None:
    """Raise `ValueError` unless both go whole into an SMPP 3.4 bind (see `MAX_PASSWORD_CHARS`)."""
    for what, value, limit in (("system id", system_id, MAX_SYSTEM_ID_CHARS),
                               ("password", password, MAX_PASSWORD_CHARS)):
        problem = credential_problem(value, limit)
        if problem:
            raise ValueError(f"the smsc.ru SMPP {what} {problem}")


def _address_fields(source_addr: str | None) -> dict[str, Any]:
    if not source_addr:
        return {"source_addr_ton": consts.SMPP_TON_UNK, "source_addr_npi": consts.SMPP_NPI_UNK,
                "source_addr": ""}
    if source_addr.lstrip("+").isdigit():
        return {"source_addr_ton": consts.SMPP_TON_INTL, "source_addr_npi": consts.SMPP_NPI_ISDN,
                "source_addr": source_addr.lstrip("+")}
    return {"source_addr_ton": consts.SMPP_TON_ALNUM, "source_addr_npi": consts.SMPP_NPI_UNK,
            "source_addr": source_addr}


class SessionLost(Exception):
    """The SMPP connection broke, the peer unbound, or it sent what cannot be framed; bind anew."""


class BadPdu(Exception):
    """A PDU whose length was sound but whose command or body could not be read. The stream is still in
    step: answer it (`generic_nack` for a request) and go on."""

    def __init__(self, reason: str, command_id: int, sequence: int):
        super().__init__(reason)
        self.command_id, self.sequence = command_id, sequence

    @property
    def is_response(self) -> bool:
        return bool(self.command_id & 0x80000000)


DELIVER_SM = 0x00000005
VENDOR_TLV_TAGS = range(0x1400, 0x4000)
"""SMPP 3.4's range of vendor-specific TLV tags; smpplib knows none of them (it skips them with a warning)."""
_DELIVER_SM_HEAD = ("cstr", 2, "cstr", 2, "cstr", 3, "cstr", "cstr", 4)
"""deliver_sm's mandatory fields before sm_length: C strings and runs of one-octet integers."""


def split_vendor_tlvs(raw: bytes) -> tuple[bytes, dict[int, bytes]]:
    """A `deliver_sm` PDU without its vendor-specific TLVs (`VENDOR_TLV_TAGS`), and those TLVs by tag. A PDU
    whose fields cannot be walked is returned as it came, for smpplib to judge."""
    body, pos = raw[16:], 0
    try:
        for item in _DELIVER_SM_HEAD:
            pos = body.index(0, pos) + 1 if item == "cstr" else pos + item
        pos += 1 + body[pos]  # sm_length and short_message
        if pos > len(body):
            return raw, {}
        kept, vendor = bytearray(raw[:16] + body[:pos]), {}
        while pos < len(body):
            tag, size = struct.unpack(">HH", body[pos:pos + 4])
            value = body[pos + 4:pos + 4 + size]
            if len(value) < size:
                return raw, {}
            if tag in VENDOR_TLV_TAGS:
                vendor[tag] = value
            else:
                kept += body[pos:pos + 4 + size]
            pos += 4 + size
    except (ValueError, IndexError, struct.error):
        return raw, {}
    kept[:4] = struct.pack(">L", len(kept))
    return bytes(kept), vendor


def parse_hosts(hosts: str | Sequence[str], port: int) -> list[tuple[str, int]]:
    """`smpp.smsc.ru,smpp2.smsc.ru:3701` (or a list of such entries) as (host, port) pairs, in order; an
    entry without a port takes `port`."""
    entries = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    pairs = []
    for entry in filter(None, (e.strip() for e in entries)):
        name, sep, number = entry.rpartition(":")
        if sep and number.isdigit() and name:
            pairs.append((name, int(number)))
        else:
            pairs.append((entry, int(port)))
    if not pairs:
        raise ValueError("no SMPP host given")
    return pairs


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the server's certificate and name (against `ca_file`, else the
    system's certificate authorities)."""
    return ssl.create_default_context(cafile=ca_file or None)


class Link:
    """One SMPP connection (plain or TLS) shared by threads: framing with a bounded length, thread-safe
    sequence numbers, one PDU written at a time. A TLS connection is never read and written at the same
    moment (OpenSSL does not allow it): its reads take the writers' lock, without waiting for data while
    they hold it (a writer blocked on a peer that reads nothing ends at `timeout` and loses the session)."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float):
        self.peer, self.timeout = peer, timeout
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._io = threading.Lock()
        self._seq_lock = threading.Lock()
        self._sequence = 0
        self._buffer = bytearray()
        sock.settimeout(timeout)

    @classmethod
    def open(cls, host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> "Link":
        """Connect (and with `tls`, complete the handshake, verifying the server) within `timeout`."""
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return cls(sock, f"{host}:{port}", timeout)

    # smpplib's PDUs number themselves through these two
    @property
    def sequence(self) -> int:
        return self._sequence

    def next_sequence(self) -> int:
        with self._seq_lock:
            self._sequence = self._sequence % 0x7FFFFFFF + 1
            return self._sequence

    def make(self, command: str, **fields):
        return smpp.make_pdu(command, client=self, **fields)

    def answer(self, request_sequence: int, command: str, status: int = consts.SMPP_ESME_ROK, **fields) -> None:
        resp = smpp.make_pdu(command, client=self, status=status, **fields)
        resp.sequence = request_sequence
        self.send(resp)

    def send(self, pdu) -> None:
        """Write one PDU whole; `SessionLost` if the connection is gone (then it did not leave whole)."""
        data = pdu.generate()
        try:
            with self._io:
                self._sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise SessionLost(f"write failed ({type(exc).__name__})") from exc

    def read(self, wait_s: float):
        """The next PDU, or None if none came within `wait_s`. Raises `SessionLost` when the peer closed,
        the connection broke, or a PDU announced a length outside 16..`MAX_PDU_OCTETS` (nothing of it is
        read into memory); `BadPdu` for one that was framed but cannot be read."""
        deadline = time.monotonic() + wait_s
        while True:
            pdu = self._next_buffered()
            if pdu is not None:
                return pdu
            left = deadline - time.monotonic()
            pending = getattr(self._sock, "pending", None)
            if not (pending and pending()):
                try:
                    ready = select.select([self._sock], [], [], max(0.0, left))[0]
                except (OSError, ValueError) as exc:
                    raise SessionLost("connection closed") from exc
                if not ready:
                    return None
            chunk = self._recv_tls() if self._tls else self._recv()
            if chunk == b"":
                raise SessionLost("closed by the peer")
            if chunk:
                self._buffer += chunk
            elif left <= 0:
                return None

    def _recv(self) -> bytes:
        """What a plain socket that select() found readable holds (it does not block)."""
        try:
            return self._sock.recv(65536)
        except (OSError, ValueError) as exc:
            raise SessionLost(f"read failed ({type(exc).__name__})") from exc

    def _recv_tls(self) -> bytes | None:
        """What a TLS socket holds, None when its bytes were a record with no data for us (a session
        ticket, say); never waits, and never while a writer writes."""
        with self._io:
            try:
                self._sock.settimeout(0)
                return self._sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None
            except (OSError, ValueError) as exc:
                raise SessionLost(f"read failed ({type(exc).__name__})") from exc
            finally:
                try:
                    self._sock.settimeout(self.timeout)
                except OSError:
                    pass

    def _next_buffered(self):
        if len(self._buffer) < 4:
            return None
        length = struct.unpack(">L", self._buffer[:4])[0]
        if not 16 <= length <= MAX_PDU_OCTETS:
            raise SessionLost(f"a PDU announced {length} octets (allowed: 16 to {MAX_PDU_OCTETS})")
        if len(self._buffer) < length:
            return None
        raw = bytes(self._buffer[:length])
        del self._buffer[:length]
        command_id, _, sequence = struct.unpack(">LLL", raw[4:16])
        vendor: dict[int, bytes] = {}
        if command_id == DELIVER_SM:
            raw, vendor = split_vendor_tlvs(raw)
        try:
            pdu = smpp.parse_pdu(raw, client=self, allow_unknown_opt_params=True)
        except Exception as exc:  # smpplib raises whatever its field readers meet: a PDU is untrusted input
            raise BadPdu(f"unreadable PDU 0x{command_id:08X} ({type(exc).__name__})", command_id,
                         sequence) from None
        if pdu is None:
            raise BadPdu(f"unknown command 0x{command_id:08X}", command_id, sequence)
        if vendor:
            pdu.vendor_tlvs = vendor
        return pdu

    def nack(self, bad: BadPdu) -> None:
        """Answer a request that could not be read with `generic_nack` (responses are not answered)."""
        if not bad.is_response:
            known = bad.command_id in command_codes.commands.values()
            self.answer(bad.sequence, "generic_nack", ESME_RINVCMDLEN if known else ESME_RINVCMDID)

    def close(self) -> None:
        """Close now; a thread blocked on this link sees `SessionLost`."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def bind(hosts: Sequence[tuple[str, int]], *, mode: str, system_id: str, password: str, system_type: str,
         timeout: float, tls: ssl.SSLContext | None) -> Link:
    """Connect and bind as `mode` to the first of `hosts` that accepts; raise the `ProviderError` that says
    why none did. A bind refused for the account (`AccountError`, e.g. `LoginRefused`) is raised at once,
    the later hosts untried: the backup host is for a host that cannot be reached, and every refused login
    counts toward smsc.ru blocking our address. `ValueError` (`check_credentials`) for a system id or
    password that would not go whole."""
    check_credentials(system_id, password)
    errors: list[ProviderError] = []
    for host, port in hosts:
        try:
            link = Link.open(host, port, timeout, tls)
        except ssl.SSLError as exc:
            errors.append(TransientError(f"TLS with smsc.ru SMPP at {host}:{port} failed ({exc.reason})",
                                         reached=False))
            continue
        except (OSError, ValueError):
            errors.append(TransientError(f"cannot connect to smsc.ru SMPP at {host}:{port}", reached=False))
            continue
        try:
            request = link.make(f"bind_{mode}", system_id=system_id, password=password,
                                system_type=system_type, interface_version=0x34)
            link.send(request)
            resp = link.read(timeout)
            if resp is None or resp.sequence != request.sequence or not resp.is_response():
                raise SessionLost("no bind answer")
        except (SessionLost, BadPdu) as exc:
            link.close()
            errors.append(TransientError(f"smsc.ru SMPP at {host}:{port} did not bind us ({exc})", reached=False))
            continue
        if resp.status != consts.SMPP_ESME_ROK:
            link.close()
            refused = status_error(resp.status)
            if isinstance(refused, AccountError):
                log.warning("smsc SMPP bind at %s:%d refused: %s", host, port, refused)
                raise refused
            errors.append(refused)
            continue
        log.info("smsc SMPP session bound as %s at %s", mode, link.peer)
        return link
    raise errors[-1]


class ReceiptSink(Protocol):
    """Where a transceiver session hands the `deliver_sm` it receives (see the module docstring)."""

    def deliver(self, fields: dict[str, Any]) -> int: ...

    def tick(self) -> None: ...


class _Waiter:
    __slots__ = ("done", "pdu", "lost")

    def __init__(self):
        self.done = threading.Event()
        self.pdu = None
        self.lost: str | None = None


class _NotSent(Exception):
    """The request never left whole."""


class _NoAnswer(Exception):
    """The request left; the session was lost or the deadline passed before its answer."""


class _Session:
    """A bound link, its reader thread and the requests awaiting answers."""

    def __init__(self, link: Link, sink: ReceiptSink | None):
        self.link, self.sink = link, sink
        self.alive = True
        self.last_rx = time.monotonic()
        self._lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._deliveries: queue.Queue | None = queue.Queue() if sink is not None else None
        threading.Thread(target=self._read_loop, name="smsc-reader", daemon=True).start()
        if sink is not None:
            threading.Thread(target=self._deliver_loop, name="smsc-deliveries", daemon=True).start()

    def request(self, pdu, deadline: float):
        """Send `pdu` and return its answer. `_NotSent` if it never left whole, `_NoAnswer` if it left and
        no answer came (session lost, or `deadline` passed)."""
        waiter = _Waiter()
        with self._lock:
            if not self.alive:
                raise _NotSent("the session was lost")
            self._pending[pdu.sequence] = waiter
        try:
            self.link.send(pdu)
        except SessionLost as exc:
            with self._lock:
                self._pending.pop(pdu.sequence, None)
            self.kill(str(exc))
            raise _NotSent(str(exc)) from None
        if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                self._pending.pop(pdu.sequence, None)
            raise _NoAnswer("no answer in time")
        if waiter.lost is not None:
            raise _NoAnswer(waiter.lost)
        return waiter.pdu

    def kill(self, reason: str) -> None:
        """Close the session; every request awaiting an answer learns it will get none."""
        with self._lock:
            if not self.alive:
                return
            self.alive = False
            waiting, self._pending = self._pending, {}
        log.info("smsc SMPP session at %s lost (%s); %d answers outstanding", self.link.peer, reason,
                 len(waiting))
        for waiter in waiting.values():
            waiter.lost = f"the connection to smsc.ru was lost ({reason})"
            waiter.done.set()
        self.link.close()
        if self._deliveries is not None:
            self._deliveries.put(None)

    def _read_loop(self) -> None:
        while self.alive:
            try:
                pdu = self.link.read(1.0)
            except BadPdu as bad:
                log.warning("smsc SMPP: %s", bad)
                if bad.is_response:
                    self._fail_one(bad.sequence, "smsc.ru's answer could not be read")
                else:
                    self._safely(self.link.nack, bad)
                continue
            except SessionLost as exc:
                self.kill(str(exc))
                return
            if pdu is None:
                continue
            self.last_rx = time.monotonic()
            if pdu.is_response():  # generic_nack too
                with self._lock:
                    waiter = self._pending.pop(pdu.sequence, None)
                if waiter is not None:
                    waiter.pdu = pdu
                    waiter.done.set()
            elif pdu.command == "enquire_link":
                self._safely(self.link.answer, pdu.sequence, "enquire_link_resp")
            elif pdu.command == "unbind":
                self._safely(self.link.answer, pdu.sequence, "unbind_resp")
                self.kill("smsc.ru unbound the session")
            elif pdu.command == "deliver_sm":
                if self._deliveries is not None:
                    self._deliveries.put((pdu.sequence, vars(pdu)))
                else:  # a transmitter is not meant to get these: let smsc.ru give it to the receiver
                    self._safely(self.link.answer, pdu.sequence, "deliver_sm_resp", ESME_RX_T_APPN)
            else:
                self._safely(self.link.answer, pdu.sequence, "generic_nack", ESME_RINVCMDID)

    def _fail_one(self, sequence: int, reason: str) -> None:
        with self._lock:
            waiter = self._pending.pop(sequence, None)
        if waiter is not None:
            waiter.lost = reason
            waiter.done.set()

    def _safely(self, write, *args) -> None:
        try:
            write(*args)
        except SessionLost as exc:
            self.kill(str(exc))

    def _deliver_loop(self) -> None:
        while True:
            try:
                item = self._deliveries.get(timeout=0.5)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    sequence, fields = item
                    status = self.sink.deliver(fields)
                    self._safely(self.link.answer, sequence, "deliver_sm_resp", status)
                self.sink.tick()
            except Exception:  # one report gone wrong must not stop the others
                log.exception("smsc deliver_sm on the transceiver session could not be handled")


class SmscClient:
    """smsc.ru over SMPP; see the module docstring. Thread-safe; one bound session per object."""

    name = "smsc"

    def __init__(self, *, host: str | Sequence[str], port: int = PLAIN_PORT, system_id: str, password: str,
                 system_type: str = "", source_addr: str | None = None, timeout: float = 15.0,
                 max_parts: int = 6, enquire_link_s: float = 30.0, rebind_min_s: float = 0.5,
                 rebind_max_s: float = 60.0, window: int = DEFAULT_WINDOW, tls: bool = False,
                 ca_file: str | None = None, bind: str = "transmitter", receipts: ReceiptSink | None = None,
                 channels: frozenset[str] = frozenset(), login_gate: Callable[[], None] | None = None):
        if bind not in ("transmitter", "transceiver"):
            raise ValueError(f"bind must be transmitter or transceiver, not {bind!r}")
        check_credentials(system_id, password)
        self.hosts = parse_hosts(host, port)
        self._system_id, self._password, self._system_type = system_id, password, system_type or ""
        self._source = _address_fields(source_addr)
        self.timeout = timeout
        self.max_parts = max_parts
        self.channels = frozenset(channels)
        """Names of the channels (`smsc_text.channel_name`) a text may ask for by its prefix."""
        self.enquire_link_s = enquire_link_s
        self.window = window
        self._tls = tls_context(ca_file) if tls else None
        self._mode = bind
        self._receipts = receipts if bind == "transceiver" else None
        self._login_gate = login_gate
        self._rebind_min_s, self._rebind_max_s = rebind_min_s, rebind_max_s
        self._slots = threading.BoundedSemaphore(window)
        self._bind_lock = threading.Lock()
        self._session: _Session | None = None
        self._bind_failures = 0
        self._bind_retry_at = 0.0
        self._bind_error: ProviderError | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._pace_lock = threading.Lock()
        self._gap_s, self._throttled_at, self._next_submit_at = 0.0, 0.0, 0.0
        self.throttles = 0
        """How many submits smsc.ru answered ESME_RTHROTTLED (each slowed the session's pace)."""
        self.binds = 0
        """How many sessions this client has bound (the tests watch reconnects through it)."""

    @property
    def pace_gap_s(self) -> float:
        """The least time now left between two submits of this client: 0 until smsc.ru throttles it."""
        with self._pace_lock:
            return self._gap_now(time.monotonic())

    def _gap_now(self, now: float) -> float:
        gap = self._gap_s * 0.5 ** ((now - self._throttled_at) / PACE_HALF_LIFE_S)
        return gap if gap >= PACE_START_S / 8 else 0.0

    def _slow_down(self) -> None:
        with self._pace_lock:
            now = time.monotonic()
            self._gap_s = min(PACE_MAX_S, max(PACE_START_S, 2 * self._gap_now(now)))
            self._throttled_at = now
            self.throttles += 1
        log.info("smsc asked us to slow down (ESME_RTHROTTLED): %.2f s between submits for a while", self._gap_s)

    def _await_turn(self, deadline: float) -> None:
        """Wait for this submit's turn at the session's pace; `TransientError` (nothing sent) when it would
        come after `deadline`."""
        with self._pace_lock:
            now = time.monotonic()
            turn = max(now, self._next_submit_at)
            if turn > deadline:
                raise TransientError("smsc.ru asked us to slow down, and this message's turn did not come in "
                                     "time; it was not sent", reached=False)
            self._next_submit_at = turn + self._gap_now(now)
        if turn > now:
            time.sleep(turn - now)

    @property
    def iso(self) -> bool:
        return self._system_type.upper() == "ISO"

    @property
    def peer(self) -> str | None:
        """`host:port` of the bound session, if any."""
        session = self._session
        return session.link.peer if session is not None and session.alive else None

    # --- the Provider protocol ------------------------------------------------------------------
    def check(self, message: OutgoingMessage) -> int:
        return self._layout(message).billed_parts

    def send(self, message: OutgoingMessage) -> Accepted:
        plan = self._layout(message)
        short_messages = plan.short_messages(ref=message.reference)
        ids: list[str] = []
        for octets in short_messages:
            try:
                ids.append(self._submit_part(message.recipient, plan, octets, first=not ids))
            except ProviderError as exc:
                if not ids:
                    raise
                raise PartlySent(
                    f"{len(ids)} of {len(short_messages)} parts were sent, then: {exc}; the message may "
                    "reach the phone incomplete, and sending it again would repeat the first parts"
                ) from exc
        return Accepted(provider_message_id=",".join(ids), parts=plan.billed_parts, reports_by_id=True)

    def close(self) -> None:
        """Stop the keep-alive, unbind and close."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=self.timeout)
            self._keeper = None
        with self._bind_lock:
            session, self._session = self._session, None
        if session is not None and session.alive:
            try:
                session.request(session.link.make("unbind"), time.monotonic() + min(self.timeout, 2.0))
            except (_NotSent, _NoAnswer):
                pass
            session.kill("closed")

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
    def _submit_part(self, recipient: str, plan: smsc_text.Layout, octets: bytes, first: bool) -> str:
        """Submit one part. A later part that smsc.ru throttles is submitted again at the slower pace until
        `timeout` has passed (giving up would leave the message half sent); the first one raises, and the
        workflow retries the message later."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._submit(recipient, plan, octets)
            except ThrottledError:
                if first or time.monotonic() + self.pace_gap_s >= deadline:
                    raise

    def _submit(self, recipient: str, plan: smsc_text.Layout, octets: bytes) -> str:
        """Submit one part; return smsc.ru's message id."""
        deadline = time.monotonic() + self.timeout
        session = self._live_session()
        self._await_turn(deadline)
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransientError(f"all {self.window} submits of the SMPP window stayed unanswered for "
                                 f"{self.timeout:g} s; this one was not sent", reached=False)
        try:
            payload = {"short_message": octets} if len(octets) <= smsc_text.MAX_SHORT_MESSAGE \
                else {"message_payload": octets}
            pdu = session.link.make(
                "submit_sm", **self._source,
                dest_addr_ton=consts.SMPP_TON_INTL, dest_addr_npi=consts.SMPP_NPI_ISDN,
                destination_addr=recipient, esm_class=ESM_UDHI if plan.concatenated else 0,
                registered_delivery=1, data_coding=plan.data_coding, **payload,
            )
            try:
                resp = session.request(pdu, deadline)
            except _NotSent as exc:
                raise TransientError(f"the connection to smsc.ru broke before the message left ({exc})",
                                     reached=False) from None
            except _NoAnswer as exc:
                raise UnknownOutcome(f"smsc.ru did not answer the message ({exc}); it may have arrived") \
                    from None
        finally:
            self._slots.release()
        if resp.status != consts.SMPP_ESME_ROK:
            if resp.status in _BIND_STATUSES:
                session.kill(f"SMPP status 0x{resp.status:02X}")
            if resp.status == consts.SMPP_ESME_RTHROTTLED:
                self._slow_down()
            raise status_error(resp.status)
        return (getattr(resp, "message_id", None) or b"").decode("ascii", "replace")

    def _live_session(self) -> _Session:
        """The bound session, binding one if there is none. Threads wait while one of them binds."""
        session = self._session
        if session is not None and session.alive:
            return session
        with self._bind_lock:
            if self._session is not None and self._session.alive:
                return self._session
            self._session = None
            if self._bind_error is not None and time.monotonic() < self._bind_retry_at:
                raise type(self._bind_error)(str(self._bind_error))
            if self._login_gate is not None:
                self._login_gate()  # raises when the fleet holds this login refused: no bind, no backoff
            try:
                link = bind(self.hosts, mode=self._mode, system_id=self._system_id, password=self._password,
                            system_type=self._system_type, timeout=self.timeout, tls=self._tls)
            except ProviderError as exc:
                self._bind_failures += 1
                delay = min(self._rebind_max_s, self._rebind_min_s * 2 ** (self._bind_failures - 1))
                self._bind_retry_at, self._bind_error = time.monotonic() + delay, exc
                log.warning("smsc SMPP bind failed (%s); next try in %.1f s", exc, delay)
                raise
            self._bind_failures, self._bind_error = 0, None
            self._session = _Session(link, self._receipts)
            self.binds += 1
            if self._keeper is None and self.enquire_link_s > 0:
                self._stop.clear()
                self._keeper = threading.Thread(target=self._keep_alive, name="smsc-enquire-link", daemon=True)
                self._keeper.start()
            return self._session

    def _keep_alive(self) -> None:
        """Background thread: an enquire_link whenever nothing came from smsc.ru for `enquire_link_s`; a
        session whose peer does not answer it is closed (its submits in flight get `UnknownOutcome`)."""
        while not self._stop.wait(max(0.05, self.enquire_link_s / 4)):
            session = self._session
            if session is None or not session.alive or \
                    time.monotonic() - session.last_rx < self.enquire_link_s:
                continue
            try:
                session.request(session.link.make("enquire_link"), time.monotonic() + self.timeout)
            except _NotSent:
                pass
            except _NoAnswer as exc:
                session.kill(f"no answer to enquire_link: {exc}")


# --- receipts and replies ---------------------------------------------------------------------------
TLV_COST, TLV_FLAGS, TLV_PARTS = 0x2000, 0x2001, 0x2002
"""smsc.ru's own TLVs in a receipt: the message's cost as text (`n.nnnn`), flags, the number of parts."""
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
    1: "no such number",
    6: "the subscriber is offline (phone off or out of coverage)",
    11: "the service is not connected (the number cannot receive SMS, e.g. in roaming)",
    12: "an error in the subscriber's phone or SIM card",
    13: "the subscriber is blocked (by the operator, for non-payment, or at their own request)",
    21: "the subscriber's phone does not support the service",
    200: "virtual sending: smsc.ru's test mode sent nothing",
    219: "the subscriber replaced the SIM card (named senders are blocked for 24 hours)",
    220: "the operator's queue for the subscriber overflowed",
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
        return f"{words}: {SMSC_ERRORS[code]} (smsc.ru error {code})"
    return f"{words} (smsc.ru error {code})" if code else words


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
    vendor = fields.get("vendor_tlvs") or {}
    if TLV_FLAGS in vendor:
        extra["flags"] = bytes(vendor[TLV_FLAGS]).hex()
    return DeliveryReport(outcome=outcome, provider_message_id=message_id, reason=_reason(stat, err, words),
                          extra=extra, cost=_cost(vendor.get(TLV_COST)), parts=_count(vendor.get(TLV_PARTS)))


_COST = re.compile(r"\d{1,6}(\.\d{1,4})?")


def _cost(value: bytes | None) -> Decimal | None:
    """TLV 0x2000: the cost as text (`n.nnnn`); None when absent or not such a number."""
    text = bytes(value or b"").rstrip(b"\0").decode("ascii", "replace").strip()
    return Decimal(text) if _COST.fullmatch(text) else None


def _count(value: bytes | None) -> int | None:
    """TLV 0x2002: the number of parts, as digits or as a 1, 2 or 4 octet integer (smsc.ru does not say
    which); None when absent or not a plausible count."""
    data = bytes(value or b"").rstrip(b"\0")
    if data.isdigit():
        count = int(data)
    elif len(bytes(value or b"")) in (1, 2, 4):
        count = int.from_bytes(bytes(value), "big")
    else:
        return None
    return count if 1 <= count <= 255 else None


def message_id_forms(message_id: str) -> list[str]:
    """The ids a receipt's message id may stand for, the id as written first. smsc.ru does not say whether
    its receipts write a message id as its `submit_sm_resp` did or in the other base, as some SMSCs do
    (decimal in the answer, hexadecimal in the receipt, or the reverse), so a hexadecimal-looking id is also
    read as hexadecimal and written in decimal, a decimal one is also written in hexadecimal, and leading
    zeros are dropped. Ids of one account are numbers of about the same size, so the forms of one id are
    hardly ever another id of ours."""
    given = message_id.strip()
    forms = [given, given.lstrip("0") or "0"]
    if re.fullmatch(r"[0-9A-Fa-f]{1,16}", given):
        forms.append(str(int(given, 16)))
    if given.isdigit() and len(given) <= 20:
        number = int(given)
        forms += [format(number, "x"), format(number, "X")]
    return list(dict.fromkeys(forms))
