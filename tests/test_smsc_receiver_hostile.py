"""The SMPP receiver against a peer that sends nonsense, over a real socket: every malformed PDU we can think
of, then a good receipt. The receiver must answer what it can answer, close the session on what cannot be
framed (a PDU announcing a length SMPP does not allow is not read into memory), bind again only after a
growing pause, and still apply the good receipt at the end."""
from __future__ import annotations

import socket
import struct
import threading
import time

from smpplib import smpp
from smpplib.client import SimpleSequenceGenerator

from providers.smsc import MAX_PDU_OCTETS
from settings import load_settings
from workflow.smpp_receiver import run_receiver
from tests.conftest import wait_until

DELIVER_SM, GENERIC_NACK = 0x00000005, 0x80000000
GOOD_RECEIPT = b"id:4711 sub:001 dlvrd:001 submit date:2401010000 done date:2401010000 stat:DELIVRD err:000 text:"
_numbers = SimpleSequenceGenerator()


def pdu_bytes(command: str, **fields) -> bytes:
    return smpp.make_pdu(command, client=_numbers, **fields).generate()


def raw(command_id: int, body: bytes = b"", sequence: int = 1, length: int | None = None) -> bytes:
    return struct.pack(">LLLL", 16 + len(body) if length is None else length, command_id, 0, sequence) + body


def deliver(sequence: int, **fields) -> bytes:
    fields = {"esm_class": 0x04, "short_message": GOOD_RECEIPT, "source_addr": "79001234567", **fields}
    data = bytearray(pdu_bytes("deliver_sm", **fields))
    data[12:16] = struct.pack(">L", sequence)
    return bytes(data)


def with_body(pdu: bytes, body: bytes) -> bytes:
    """`pdu`'s header (length fixed up) before another body."""
    return struct.pack(">L", 16 + len(body)) + pdu[4:16] + body


def tlv(tag: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack(">HH", tag, len(value) if length is None else length) + value


GOOD_BODY = deliver(1)[16:]
# (what is sent, whether it is a request the receiver must answer)
SURVIVABLE = [
    (raw(0x00000999, sequence=101), True),                                         # unknown command
    (raw(DELIVER_SM, sequence=102), True),                                         # deliver_sm, no body at all
    (raw(DELIVER_SM, GOOD_BODY[:20], sequence=103), True),                         # body cut short
    (raw(DELIVER_SM, b"\xff" * 64, sequence=104), True),                           # strings never terminated
    (with_body(deliver(105), GOOD_BODY + tlv(0x0427, b"\x02", length=300)), True),  # TLV longer than the PDU
    (with_body(deliver(106), GOOD_BODY + tlv(0x0427, b"\x00\x00\x00\x09")), True),  # message_state of 4 octets
    (with_body(deliver(107), GOOD_BODY + tlv(0x0423, b"\x03")), True),             # network_error_code of 1 octet
    (with_body(deliver(108), GOOD_BODY + tlv(0x001E, b"")), True),                 # empty receipted_message_id
    (with_body(deliver(109), GOOD_BODY + tlv(0x0424, b"\xff" * 9000)), True),      # message_payload of junk
    (deliver(110, short_message=b"stat:DELIVRD err:000"), True),                   # a receipt without an id
    (deliver(111, short_message=b"id:\xff\xfe\x00 stat:\x80\x81 err:zz"), True),   # ids and stats of junk
    (deliver(112, esm_class=0x40, short_message=b"\xff\x00\x03"), True),           # a reply whose UDH overruns it
    (deliver(113, esm_class=0x40, data_coding=8, short_message=b"\x05\x00\x03\x07\x02\x09\x04"), True),
    (deliver(114, esm_class=0x00, data_coding=8, short_message=b"\xd8\x00\x04"), True),  # a lone surrogate
    (raw(0x80000004, b"12345\x00", sequence=115), False),                          # a submit_sm_resp nobody asked for
    (raw(GENERIC_NACK, sequence=116), False),                                      # a generic_nack, likewise
    (pdu_bytes("bind_transmitter", system_id="x", password="y")[:12] + struct.pack(">L", 117)
     + pdu_bytes("bind_transmitter", system_id="x", password="y")[16:], True),     # a bind, to a receiver
]
FATAL = [
    struct.pack(">LLLL", 8, DELIVER_SM, 0, 201),                                   # shorter than a header
    struct.pack(">LLLL", 0xFFFFFFFF, DELIVER_SM, 0, 202) + b"\0" * 64,             # 4 GiB announced
    struct.pack(">LLLL", MAX_PDU_OCTETS + 1, DELIVER_SM, 0, 203) + b"\0" * 64,     # one octet too many
]


class HostileSmsc:
    """Accepts the receiver's binds, one connection at a time, and sends it each survivable PDU (reading
    the answers), then one fatal PDU per connection, then, on the last connection, a good receipt."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.binds: list[float] = []
        self.answers: dict[int, int] = {}  # sequence -> command_id of the receiver's answer
        self.closed_by_receiver: list[float] = []
        self.good_receipt_status: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _read(self, conn: socket.socket):
        head = self._exact(conn, 16)
        length, command_id, status, sequence = struct.unpack(">LLLL", head)
        self._exact(conn, length - 16)
        return command_id, status, sequence

    @staticmethod
    def _exact(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _answer_of(self, conn: socket.socket, sequence: int) -> None:
        while True:
            command_id, _, seq = self._read(conn)
            if command_id == 0x00000015:  # the receiver's enquire_link
                conn.sendall(raw(0x80000015, sequence=seq))
                continue
            if seq == sequence:
                self.answers[sequence] = command_id
                return

    def _serve(self) -> None:
        fatal = list(FATAL)
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                _, _, sequence = self._read(conn)  # bind_receiver
                conn.sendall(raw(0x80000001, b"hostile\x00", sequence=sequence))
                self.binds.append(time.monotonic())
                if len(self.binds) == 1:
                    for data, answered in SURVIVABLE:
                        conn.sendall(data)
                        if answered:
                            self._answer_of(conn, struct.unpack(">L", data[12:16])[0])
                if fatal:
                    conn.sendall(fatal.pop(0))
                    try:
                        while conn.recv(65536):
                            pass
                    except OSError:
                        pass
                    self.closed_by_receiver.append(time.monotonic())
                    continue
                conn.sendall(deliver(300, short_message=GOOD_RECEIPT.replace(b"4711", b"9999")))
                self._answer_of(conn, 300)
                while not self.stop.is_set():  # stay bound until the test ends
                    try:
                        if not conn.recv(65536):
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=15)
        self.listener.close()


def test_the_receiver_survives_malformed_pdus_and_still_applies_a_good_receipt():
    applied = []
    stop = threading.Event()
    with HostileSmsc() as smsc:
        settings = load_settings(smsc_host="127.0.0.1", smsc_port=smsc.port, smsc_system_id="smsc",
                                 smsc_password="secret", http_timeout_s=5)
        receiver = threading.Thread(
            target=run_receiver, args=(settings, stop, lambda provider, report: applied.append(report) or "applied"),
            kwargs={"reconnect_min_s": 0.2, "enquire_link_s": 30.0, "logins": None}, daemon=True)
        receiver.start()
        try:
            wait_until(lambda: any(r.provider_message_id == "9999" for r in applied), 30,
                       what="the good receipt after the malformed PDUs")
        finally:
            stop.set()
            receiver.join(timeout=10)
        assert not receiver.is_alive()

    assert [(r.outcome, r.reason) for r in applied if r.provider_message_id == "9999"] == [("delivered", "")]
    # Every request it was sent was answered, the ones it could not read with generic_nack.
    expected = {struct.unpack(">L", data[12:16])[0] for data, answered in SURVIVABLE if answered}
    assert set(smsc.answers) == expected | {300}
    assert smsc.answers[101] == smsc.answers[117] == GENERIC_NACK
    assert smsc.answers[300] == 0x80000005
    # Each PDU that cannot be framed closed the session; the binds that followed came after a growing pause.
    assert len(smsc.closed_by_receiver) == len(FATAL) and len(smsc.binds) == len(FATAL) + 1
    pauses = [bind - closed for closed, bind in zip(smsc.closed_by_receiver, smsc.binds[1:])]
    assert all(pause >= 0.9 * 0.2 * 2 ** k for k, pause in enumerate(pauses)), pauses
