"""A stand-in for smsc.ru's SMPP 3.4 server, for the demo, the tests and `smsctl simulate smsc`.

It speaks SMPP over TCP on 127.0.0.1: `bind_transmitter` / `bind_receiver` / `bind_transceiver` with a
credential check, `enquire_link`, `submit_sm` answered with a message id, `unbind`. Like the real server
it refuses a second identical request (same login, sender, recipient, data_coding and octets) within
`identical_window_s` (with `identical_status`, ESME_RTHROTTLED by default), and drops a session that
sent nothing for `idle_timeout_s` (two minutes at smsc.ru). After `receipt_delay_s` it sends a delivery
receipt in the text form (`id:… sub:001 dlvrd:001 submit date:… done date:… stat:DELIVRD err:000 text:…`,
and the TLVs too when `receipt_tlvs`; with `receipt_cost` (text such as `1.9500`) also smsc.ru's own TLVs
0x2000 that cost, 0x2001 flags 0 and 0x2002 the message's number of parts as one octet) for every accepted
part to a bound receiver or transceiver. It holds receipts while none is bound, and sends again those a
receiver answered with an error status or left unanswered when it went away. Numbers ending in `undeliverable_suffix` get `stat:UNDELIV err:001` (the
code is `receipt_error`), and so does the part numbered `undeliverable_part` of every concatenated message.
Receipts write the message id as `submit_sm_resp` did (decimal), or in hexadecimal with `receipt_ids="hex"`.
`send_reply(from_number, text)` delivers a recipient's reply (an MO message). `fail_next(status, count)`
makes the next submits fail; `latency_s` delays every `submit_sm_resp` without holding up the submits
behind it (an SMSC answering a window of submits, each after `latency_s`); `max_in_flight` is the most
submits one session had awaiting their answer at once. `TlsFront` puts a TLS endpoint in front of it.

Everything is recorded in `journal` (dicts with a `kind`: `bind`, `submit`, `deliver`, `deliver_resp`,
`unbind`, `drop`); `events(kind)` filters it. PDUs are read and written with smpplib's PDU classes
(vendor TLVs, which smpplib cannot write, are appended to its bytes).
"""
from __future__ import annotations

import heapq
import itertools
import random
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from typing import Any

from smpplib import consts, exceptions, smpp
from smpplib.client import SimpleSequenceGenerator
from smpplib.gsm import gsm_encode

from simulators.base import Journal, run_until_interrupted

DEFAULT_PORT = 2775
_BIND_MODES = {"bind_transmitter": "tx", "bind_receiver": "rx", "bind_transceiver": "trx"}
ESME_RINVCMDID = 0x03


class _Scheduler:
    """One thread running callables at their due time (receipts), stoppable at once."""

    def __init__(self):
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="smsc-sim-scheduler", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, func) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), func))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                func = heapq.heappop(self._heap)[2]
            func()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)


class _Session(socketserver.BaseRequestHandler):
    """One SMPP connection."""

    server: "SmscSimulator"

    def setup(self) -> None:
        self.in_flight = 0
        self.mode: str | None = None
        self.system_id = ""
        self.write_lock = threading.Lock()
        self.unacked: dict[int, dict] = {}
        self.request.settimeout(self.server.idle_timeout_s)
        self.server._opened(self)

    def handle(self) -> None:
        while True:
            try:
                pdu = self._read()
            except (socket.timeout, TimeoutError):
                self.server.record(kind="drop", reason="idle", system_id=self.system_id)
                return
            except (OSError, ConnectionError, struct.error):
                return
            if pdu is None:
                return
            if not self._dispatch(pdu):
                return

    def finish(self) -> None:
        self.server._closed(self)

    # --- wire -----------------------------------------------------------------------------------
    def _recv_exact(self, size: int) -> bytes:
        chunks = b""
        while len(chunks) < size:
            chunk = self.request.recv(size - len(chunks))
            if not chunk:
                raise ConnectionError("peer closed")
            chunks += chunk
        return chunks

    def _read(self):
        head = self._recv_exact(4)
        length = struct.unpack(">L", head)[0]
        raw = head + self._recv_exact(length - 4)
        try:
            return smpp.parse_pdu(raw, client=self.server.sequence, allow_unknown_opt_params=True)
        except exceptions.UnknownCommandError:
            nack = smpp.make_pdu("generic_nack", client=self.server.sequence, status=ESME_RINVCMDID)
            nack.sequence = struct.unpack(">L", raw[12:16])[0]
            self.write(nack)
            return self._read()

    def write(self, pdu) -> None:
        with self.write_lock:
            self.request.sendall(pdu.generate())

    def _answer(self, request, command: str, status: int = consts.SMPP_ESME_ROK, **fields) -> None:
        resp = smpp.make_pdu(command, client=self.server.sequence, status=status, **fields)
        resp.sequence = request.sequence
        self.write(resp)

    # --- commands -------------------------------------------------------------------------------
    def _dispatch(self, pdu) -> bool:
        """Act on one PDU; False ends the session."""
        command = pdu.command
        if command in _BIND_MODES:
            return self._bind(pdu)
        if command == "enquire_link":
            self._answer(pdu, "enquire_link_resp")
        elif command == "unbind":
            self.server.record(kind="unbind", mode=self.mode, system_id=self.system_id)
            self._answer(pdu, "unbind_resp")
            return False
        elif self.mode is None:
            self._answer(pdu, "generic_nack", status=consts.SMPP_ESME_RINVBNDSTS)
        elif command == "submit_sm":
            status, message_id = self.server._submit(self, pdu)
            if self.server.latency_s > 0 and self.server._scheduler:
                self.server._in_flight(self, +1)
                self.server._scheduler.call_later(
                    self.server.latency_s, lambda: self._answer_later(pdu, status, message_id))
            else:
                self._answer(pdu, "submit_sm_resp", status=status, message_id=message_id or "")
        elif command == "deliver_sm_resp":
            fields = self.unacked.pop(pdu.sequence, None)
            self.server.record(kind="deliver_resp", status=pdu.status, sequence=pdu.sequence)
            if fields and pdu.status != consts.SMPP_ESME_ROK:
                self.server._redeliver(fields)
        elif not pdu.is_response():
            self._answer(pdu, "generic_nack", status=ESME_RINVCMDID)
        return True

    def _answer_later(self, pdu, status: int, message_id: str | None) -> None:
        self.server._in_flight(self, -1)
        try:
            self._answer(pdu, "submit_sm_resp", status=status, message_id=message_id or "")
        except OSError:  # the session went away meanwhile: its client never gets this answer
            pass

    def _bind(self, pdu) -> bool:
        mode = _BIND_MODES[pdu.command]
        system_id = (pdu.system_id or b"").decode("latin-1")
        password = (pdu.password or b"").decode("latin-1")
        if self.mode is not None:
            status = consts.SMPP_ESME_RALYBND
        elif system_id != self.server.system_id:
            status = consts.SMPP_ESME_RINVSYSID
        elif password != self.server.password:
            status = consts.SMPP_ESME_RINVPASWD
        else:
            status = consts.SMPP_ESME_ROK
        self.server.record(kind="bind", mode=mode, system_id=system_id, status=status,
                           system_type=(pdu.system_type or b"").decode("latin-1"))
        self._answer(pdu, pdu.command + "_resp", status=status, system_id="smsc")
        if status != consts.SMPP_ESME_ROK:
            return status == consts.SMPP_ESME_RALYBND
        self.mode, self.system_id = mode, system_id
        if mode in ("rx", "trx"):
            self.server._flush_pending()
        return True

    def deliver(self, fields: dict) -> None:
        """Send a `deliver_sm` of `fields`; `vendor_tlvs` ({tag: octets}, which smpplib cannot write) are
        appended to it."""
        vendor = fields.get("vendor_tlvs") or {}
        pdu = smpp.make_pdu("deliver_sm", client=self.server.sequence,
                            **{key: value for key, value in fields.items() if key != "vendor_tlvs"})
        data = pdu.generate() + b"".join(struct.pack(">HH", tag, len(value)) + value
                                         for tag, value in vendor.items())
        self.unacked[pdu.sequence] = fields
        try:
            with self.write_lock:
                self.request.sendall(struct.pack(">L", len(data)) + data[4:])
        except OSError:
            self.unacked.pop(pdu.sequence, None)
            raise


class SmscSimulator(Journal, socketserver.ThreadingTCPServer):
    """The smsc.ru stand-in; see the module docstring. `start()` serves in a thread, `stop()` closes
    every connection (a client sees the peer go away)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", system_id: str = "smsc",
                 password: str = "secret", identical_window_s: float = 60.0,
                 identical_status: int = consts.SMPP_ESME_RTHROTTLED, receipt_delay_s: float = 0.5,
                 receipts: bool = True, receipt_tlvs: bool = False, undeliverable_suffix: str = "13",
                 idle_timeout_s: float | None = 120.0, latency_s: float = 0.0,
                 undeliverable_part: int | None = None, receipt_ids: str = "dec", receipt_error: int = 1,
                 receipt_cost: str | None = None):
        socketserver.ThreadingTCPServer.__init__(self, (host, port), _Session)
        self.system_id, self.password = system_id, password
        self.identical_window_s = identical_window_s
        self.identical_status = identical_status
        self.receipt_delay_s = receipt_delay_s
        self.receipts, self.receipt_tlvs = receipts, receipt_tlvs
        self.undeliverable_suffix = undeliverable_suffix
        self.idle_timeout_s = idle_timeout_s
        self.latency_s = latency_s
        self.undeliverable_part = undeliverable_part
        self.receipt_ids = receipt_ids
        self.receipt_error, self.receipt_cost = receipt_error, receipt_cost
        self.max_in_flight = 0
        self.sequence = SimpleSequenceGenerator()
        Journal.__init__(self)
        self._sessions: set[_Session] = set()
        self._pending: list[dict] = []
        self._recent: dict[tuple, float] = {}
        self._failures: list[int] = []
        self._ids = itertools.count(random.randrange(10**8, 9 * 10**8))
        self._scheduler: _Scheduler | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    # --- control --------------------------------------------------------------------------------
    def start(self) -> "SmscSimulator":
        self._scheduler = _Scheduler()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="smsc-simulator",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.drop_sessions()
        if self._scheduler:
            self._scheduler.stop()
        if self._thread:
            self._thread.join(timeout=5)

    def drop_sessions(self) -> None:
        """Close every open connection, as a server restart or a network failure would."""
        with self.lock:
            sessions = list(self._sessions)
        for session in sessions:
            try:
                session.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next `count` submits with `status`."""
        with self.lock:
            self._failures.extend([status] * count)


    def sessions(self, mode: str | None = None) -> int:
        """How many bound sessions are open (of `mode` `tx`, `rx` or `trx`, or any)."""
        with self.lock:
            return sum(1 for s in self._sessions if s.mode and (mode is None or s.mode == mode))

    def send_reply(self, from_number: str, text: str | list[str], to: str | None = None,
                   order: list[int] | None = None, reference: int = 7) -> None:
        """Deliver an MO message from `from_number`; `to` defaults to the sender of the latest submit
        to that number. A list of texts is one reply split into that many SMS (user data header, 8-bit
        `reference`), delivered in `order` (indexes into the list; default as listed, a subset leaves parts
        out)."""
        if to is None:
            sent = [e for e in self.events("submit") if e["destination_addr"] == from_number]
            to = sent[-1]["source_addr"] if sent else ""
        parts = [text] if isinstance(text, str) else text
        for index in order if order is not None else range(len(parts)):
            try:
                data, coding = gsm_encode(parts[index]), consts.SMPP_ENCODING_DEFAULT
            except UnicodeError:
                data, coding = parts[index].encode("utf-16-be"), consts.SMPP_ENCODING_ISO10646
            split = len(parts) > 1
            if split:
                data = bytes((5, 0x00, 3, reference, len(parts), index + 1)) + data
            self._deliver({"source_addr_ton": 1, "source_addr_npi": 1, "source_addr": from_number,
                           "dest_addr_ton": 0, "dest_addr_npi": 0, "destination_addr": to,
                           "esm_class": 0x40 if split else 0, "data_coding": coding, "short_message": data})

    # --- sessions and submits -------------------------------------------------------------------
    def _opened(self, session: _Session) -> None:
        with self.lock:
            self._sessions.add(session)

    def _closed(self, session: _Session) -> None:
        with self.lock:
            self._sessions.discard(session)
            self._pending.extend(session.unacked.values())
        try:
            session.request.close()
        except OSError:
            pass

    def _in_flight(self, session: _Session, change: int) -> None:
        with self.lock:
            session.in_flight += change
            self.max_in_flight = max(self.max_in_flight, session.in_flight)

    def _submit(self, session: _Session, pdu) -> tuple[int, str | None]:
        data = pdu.message_payload or pdu.short_message or b""
        udh = data[: 1 + data[0]] if pdu.esm_class & 0x40 and data else b""
        source = (pdu.source_addr or b"").decode("latin-1")
        destination = (pdu.destination_addr or b"").decode("latin-1")
        key = (session.system_id, source, destination, pdu.data_coding, bytes(data))
        now = time.monotonic()
        with self.lock:
            status = self._failures.pop(0) if self._failures else consts.SMPP_ESME_ROK
            identical = status == consts.SMPP_ESME_ROK and \
                now - self._recent.get(key, -1e18) < self.identical_window_s
            if identical:
                status = self.identical_status
            if status == consts.SMPP_ESME_ROK:
                self._recent[key] = now
            message_id = str(next(self._ids)) if status == consts.SMPP_ESME_ROK else None
        self.record(kind="submit", status=status, identical=identical,
                    message_id=message_id, system_id=session.system_id, source_addr=source,
                    destination_addr=destination, data_coding=pdu.data_coding, esm_class=pdu.esm_class,
                    udh=udh, short_message=bytes(data), text=bytes(data[len(udh):]),
                    registered_delivery=pdu.registered_delivery, payload=bool(pdu.message_payload))
        if message_id and self.receipts and pdu.registered_delivery and self._scheduler:
            part, parts = (udh[-1], udh[-2]) if len(udh) >= 6 else (None, 1)
            receipt = self._receipt(message_id, source, destination, pdu.data_coding, data[len(udh):],
                                    failed=part is not None and part == self.undeliverable_part, parts=parts)
            self._redeliver(receipt)
        return status, message_id

    def _receipt(self, message_id: str, source: str, destination: str, coding: int, text: bytes,
                 failed: bool = False, parts: int = 1) -> dict:
        failed = failed or bool(self.undeliverable_suffix) and destination.endswith(self.undeliverable_suffix)
        stat, err, state = ("UNDELIV", f"{self.receipt_error:03d}", 5) if failed else ("DELIVRD", "000", 2)
        if self.receipt_ids == "hex":
            message_id = format(int(message_id), "X")
        stamp = time.strftime("%y%m%d%H%M")
        excerpt = text[:20].decode("latin-1") if coding in (0, 1, 3) else ""
        body = (f"id:{message_id} sub:001 dlvrd:{'000' if failed else '001'} submit date:{stamp} "
                f"done date:{stamp} stat:{stat} err:{err} text:{excerpt}")
        fields = {"source_addr_ton": 1, "source_addr_npi": 1, "source_addr": destination,
                  "dest_addr_ton": 0, "dest_addr_npi": 0, "destination_addr": source, "esm_class": 0x04,
                  "data_coding": 0, "short_message": body.encode("latin-1")}
        if self.receipt_tlvs:
            fields.update(receipted_message_id=message_id, message_state=state,
                          network_error_code=bytes((3,)) + int(err).to_bytes(2, "big"))
        if self.receipt_cost is not None:
            fields["vendor_tlvs"] = {0x2000: self.receipt_cost.encode("ascii") + b"\0", 0x2001: bytes((0,)),
                                     0x2002: bytes((parts,))}
        return fields

    def _deliver(self, fields: dict) -> None:
        with self.lock:
            receivers = [s for s in self._sessions if s.mode in ("rx", "trx")]
            if not receivers:
                self._pending.append(fields)
                return
        session = random.choice(receivers)
        try:
            session.deliver(fields)
        except OSError:
            with self.lock:
                self._pending.append(fields)
            return
        self.record(kind="deliver", esm_class=fields["esm_class"], short_message=fields["short_message"])

    def _redeliver(self, fields: dict) -> None:
        if self._scheduler:
            self._scheduler.call_later(self.receipt_delay_s, lambda: self._deliver(fields))

    def _flush_pending(self) -> None:
        with self.lock:
            pending, self._pending = self._pending, []
        for fields in pending:
            self._deliver(fields)


class TlsFront:
    """A TLS endpoint on 127.0.0.1 in front of a plain SMPP server on `backend_port` (smsc.ru serves SMPP
    over TLS on port 3443): each TLS connection is relayed to a plain one. A client that does not speak
    TLS is refused: its handshake fails and the connection is closed (`refused` counts those).
    `certfile` and `keyfile` are PEM files."""

    def __init__(self, backend_port: int, certfile: str, keyfile: str, port: int = 0, host: str = "127.0.0.1"):
        self.backend_port = backend_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(certfile, keyfile)
        self._listener = socket.create_server((host, port))
        self.port = self._listener.getsockname()[1]
        self.refused = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "TlsFront":
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name="smsc-tls-front", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if select.select([self._listener], [], [], 0.1)[0]:
                conn, _ = self._listener.accept()
                self._spawn(self._relay, conn)

    def _relay(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            tls = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            raw.close()
            return
        with tls, socket.create_connection(("127.0.0.1", self.backend_port), timeout=5) as backend:
            # One thread reads and writes the TLS side: OpenSSL does not allow both at once.
            while not self._stop.is_set():
                readable = [tls] if tls.pending() else \
                    select.select([tls, backend], [], [], 0.1)[0]
                try:
                    if tls in readable:
                        tls.settimeout(0)
                        try:
                            data = tls.recv(65536)
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            data = None
                        tls.settimeout(5)
                        if data == b"":
                            return
                        if data:
                            backend.sendall(data)
                    if backend in readable:
                        data = backend.recv(65536)
                        if not data:
                            return
                        tls.sendall(data)
                except OSError:
                    return


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options) -> None:
    """Serve an smsc.ru SMPP stand-in until interrupted (Ctrl-C); `options` as for `SmscSimulator`."""
    simulator = SmscSimulator(port, host=host, **options)
    run_until_interrupted(simulator, f"smsc.ru SMPP simulator at {host}:{simulator.port} (system_id {simulator.system_id})")
