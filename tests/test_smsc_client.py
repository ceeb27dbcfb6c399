"""The smsc.ru SMPP client against the SMSC simulator over real sockets on 127.0.0.1."""
import time

import pytest

from providers import smsc_text
from providers.base import (
    AccountError,
    LoginHeld,
    LoginRefused,
    OutgoingMessage,
    PartlySent,
    PermanentError,
    ThrottledError,
    TransientError,
    UnknownOutcome,
)
from providers import smsc
from providers.smsc import SmscClient
from settings import ConfigError, load_settings
from simulators.smsc import SmscSimulator
from tests.conftest import free_port, wait_until

NUMBER = "79001234567"


@pytest.fixture
def sim():
    simulator = SmscSimulator(receipts=False).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def make_client():
    clients = []

    def make(simulator, **options):
        options = {"system_id": "smsc", "password": "secret", "timeout": 3.0, "rebind_min_s": 0.05,
                   **options}
        options = {"host": "127.0.0.1", "port": simulator.port, **options}
        client = SmscClient(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def msg(text: str, reference: int = 1, recipient: str = NUMBER) -> OutgoingMessage:
    return OutgoingMessage(reference=reference, recipient=recipient, text=text)


def test_gsm_message_is_one_submit_with_receipt_requested(sim, make_client):
    accepted = make_client(sim, source_addr="ACME").send(msg("Your order is ready @ 5pm"))
    (submit,) = sim.events("submit")
    assert accepted.provider_message_id == submit["message_id"] and accepted.parts == 1
    assert (submit["data_coding"], submit["esm_class"], submit["udh"]) == (0, 0, b"")
    assert submit["registered_delivery"] == 1 and submit["destination_addr"] == NUMBER
    assert submit["source_addr"] == "ACME"
    assert smsc_text.decode(submit["short_message"], 0) == "Your order is ready @ 5pm"


def test_long_cyrillic_message_goes_as_udh_parts(sim, make_client):
    text = ("Здравствуйте! Ваш заказ готов к выдаче. " * 5)[:198]  # 3 UCS-2 parts of 66
    accepted = make_client(sim).send(msg(text, reference=0x1234))
    submits = sim.events("submit")
    assert accepted.parts == 3
    assert accepted.provider_message_id == ",".join(s["message_id"] for s in submits)
    assert [s["udh"] for s in submits] == [bytes((6, 8, 4, 0x12, 0x34, 3, seq)) for seq in (1, 2, 3)]
    assert {(s["data_coding"], s["esm_class"]) for s in submits} == {(8, 0x40)}
    assert "".join(smsc_text.decode(s["text"], 8) for s in submits) == text


def test_long_gsm_message_with_comment(sim, make_client):
    text = "x" * 200 + "\n~~~\nrow 42"
    accepted = make_client(sim).send(msg(text))
    submits = sim.events("submit")
    assert accepted.parts == 2 and len(submits) == 2
    parts = [smsc_text.decode(s["text"], 0) for s in submits]
    assert parts == ["x" * 152, "x" * 48 + "\n~~~\nrow 42"]


def test_oversize_part_travels_in_message_payload(sim, make_client):
    text = "y" * 160 + "\n~~~\n" + "a long comment for the history " * 4
    make_client(sim).send(msg(text))
    (submit,) = sim.events("submit")
    assert submit["payload"] and smsc_text.decode(submit["short_message"], 0) == text


def test_one_bind_serves_many_sends(sim, make_client):
    client = make_client(sim)
    for n in range(5):
        client.send(msg(f"message {n}", reference=n))
    assert len(sim.events("bind")) == 1 and client.binds == 1
    assert sim.events("bind")[0]["mode"] == "tx"


def test_bad_password_is_an_account_error_and_binds_are_spaced(sim, make_client):
    client = make_client(sim, password="wrong", rebind_min_s=30.0)
    with pytest.raises(AccountError, match="SMS_SMSC_PASSWORD"):
        client.send(msg("hi"))
    with pytest.raises(AccountError):
        client.send(msg("hi again"))
    assert [b["status"] for b in sim.events("bind")] == [0x0E]
    assert sim.events("submit") == []


def test_identical_request_within_a_minute_is_throttled(sim, make_client):
    client = make_client(sim)
    client.send(msg("same text"))
    with pytest.raises(ThrottledError) as caught:
        client.send(msg("same text"))
    assert caught.value.retry_after == 60.0
    assert [s["identical"] for s in sim.events("submit")] == [False, True]
    client.send(msg("same text", recipient="79001234568"))  # another recipient is another request


@pytest.mark.parametrize(("status", "error"), [
    (0x0B, PermanentError), (0x08, TransientError), (0x14, ThrottledError), (0x58, ThrottledError),
    (0x0A, AccountError), (0x45, TransientError), (0x400, TransientError),
])
def test_submit_statuses_are_mapped(sim, make_client, status, error):
    sim.fail_next(status)
    with pytest.raises(error, match=f"0x{status:02X}"):
        make_client(sim).send(msg("hi"))


def test_a_later_part_failing_is_an_unknown_outcome_that_says_how_far_it_went(sim, make_client):
    client = make_client(sim)
    client.send(msg("warm-up"))
    sim.fail_next(0, 1)
    sim.fail_next(0x08, 1)
    with pytest.raises(PartlySent, match="1 of 2 parts were sent"):
        client.send(msg("z" * 200))


@pytest.mark.timing
def test_a_throttled_submit_slows_the_sessions_pace_which_recovers(sim, make_client, monkeypatch):
    client = make_client(sim)
    client.send(msg("first"))
    assert client.pace_gap_s == 0.0
    sim.fail_next(0x58)
    with pytest.raises(ThrottledError):
        client.send(msg("second"))
    gap = client.pace_gap_s
    assert smsc.PACE_START_S * 0.9 <= gap <= smsc.PACE_START_S
    for n in range(4):
        client.send(msg(f"paced {n}"))
    times = [e["time"] for e in sim.events("submit")[-4:]]
    # Over the whole run, not gap by gap: a submit that the scheduler delays on its way shortens the gap after
    # it as seen at the server, and lengthens the one before.
    assert times[-1] - times[0] >= 3 * gap * 0.9
    sim.fail_next(0x58)
    with pytest.raises(ThrottledError):
        client.send(msg("third"))
    assert client.pace_gap_s > 1.5 * gap and client.throttles == 2
    monkeypatch.setattr(smsc, "PACE_HALF_LIFE_S", 0.05)
    wait_until(lambda: client.pace_gap_s == 0.0, timeout_s=3, interval_s=0.05)


def test_a_throttled_later_part_is_submitted_again_and_the_message_goes_whole(sim, make_client):
    client = make_client(sim)
    client.send(msg("warm-up"))
    sim.fail_next(0, 1)
    sim.fail_next(0x58, 1)
    accepted = client.send(msg("z" * 200))
    statuses = [e["status"] for e in sim.events("submit")[1:]]
    assert statuses == [0, 0x58, 0] and accepted.parts == 2
    assert len(accepted.provider_message_id.split(",")) == 2


@pytest.mark.parametrize(("options", "words"), [
    ({"password": "123456789"}, "password is 9 characters long; SMPP 3.4 carries at most 8"),
    ({"system_id": "s" * 16}, "system id is 16 characters long; SMPP 3.4 carries at most 15"),
    ({"password": "пароль"}, "password must be Latin letters"),
])
def test_credentials_that_smpp_would_cut_are_refused_before_any_bind(sim, make_client, options, words):
    with pytest.raises(ValueError, match=words):
        make_client(sim, **options)
    with pytest.raises(ValueError, match=words):
        smsc.bind([("127.0.0.1", sim.port)], mode="receiver", system_id=options.get("system_id", "smsc"),
                  password=options.get("password", "secret"), system_type="", timeout=3.0, tls=None)
    assert sim.events("bind") == []


@pytest.mark.parametrize(("variable", "value", "limit"), [
    ("smsc_password", "123456789", 8), ("smsc_system_id", "s" * 16, 15),
])
def test_start_up_names_the_credential_too_long_for_smpp(variable, value, limit):
    with pytest.raises(ConfigError, match=f"SMS_{variable.upper()}: .*at most {limit}") as caught:
        load_settings(**{variable: value})
    assert value not in str(caught.value)
    assert load_settings(**{variable: value[:limit]})


def test_peer_restart_mid_batch(make_client):
    first = SmscSimulator(receipts=False).start()
    port = first.port
    client = make_client(first)
    try:
        for n in range(3):
            client.send(msg(f"before {n}", reference=n))
    finally:
        first.stop()
    with pytest.raises(TransientError):  # the server is down: refused, then no new bind for a while
        client.send(msg("while down"))
    second = SmscSimulator(port, receipts=False).start()
    try:
        time.sleep(0.2)  # past the client's rebind backoff
        for n in range(3):
            client.send(msg(f"after {n}", reference=n))
        assert len(second.events("submit")) == 3 and client.binds == 2
    finally:
        client.close()
        second.stop()


def test_peer_restart_between_sends_is_invisible(make_client):
    first = SmscSimulator(receipts=False).start()
    client = make_client(first)
    client.send(msg("one"))
    first.stop()
    second = SmscSimulator(first.port, receipts=False).start()
    try:
        client.send(msg("two"))  # the closed session is noticed before the submit is written
        assert [s["status"] for s in second.events("submit")] == [0]
    finally:
        client.close()
        second.stop()


def test_keep_alive_outlives_the_idle_drop(make_client):
    simulator = SmscSimulator(receipts=False, idle_timeout_s=0.6).start()
    try:
        client = make_client(simulator, enquire_link_s=0.2)
        client.send(msg("first"))
        time.sleep(1.5)
        client.send(msg("second"))
        assert client.binds == 1 and simulator.events("drop") == []
    finally:
        simulator.stop()


def test_session_dropped_for_idleness_is_bound_again(make_client):
    simulator = SmscSimulator(receipts=False, idle_timeout_s=0.3).start()
    try:
        client = make_client(simulator, enquire_link_s=30.0)
        client.send(msg("first"))
        time.sleep(0.8)
        client.send(msg("second"))
        assert client.binds == 2 and len(simulator.events("drop")) == 1
    finally:
        simulator.stop()


def test_close_unbinds(sim, make_client):
    client = make_client(sim)
    client.send(msg("hi"))
    assert sim.sessions("tx") == 1
    client.close()
    deadline = time.monotonic() + 2
    while sim.sessions() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.sessions() == 0 and [e["mode"] for e in sim.events("unbind")] == ["tx"]


def test_threads_share_one_session_with_a_window_of_submits_in_flight(make_client):
    """16 threads of one process, a window of 4, an SMSC answering each submit after 100 ms: one bind,
    4 submits awaiting their answers at once (never more), and every thread gets its own message's id."""
    from concurrent.futures import ThreadPoolExecutor

    simulator = SmscSimulator(receipts=False, latency_s=0.1).start()
    try:
        client = make_client(simulator, window=4)
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda n: client.send(msg(f"parallel {n}", reference=n)), range(32)))
        submits = {s["message_id"]: s["text"] for s in simulator.events("submit")}
        assert [submits[r.provider_message_id] for r in results] == [f"parallel {n}".encode() for n in range(32)]
        assert client.binds == 1 and simulator.max_in_flight == 4
    finally:
        simulator.stop()


def test_one_at_a_time_with_a_window_of_one(make_client):
    from concurrent.futures import ThreadPoolExecutor

    simulator = SmscSimulator(receipts=False, latency_s=0.05).start()
    try:
        client = make_client(simulator, window=1)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: client.send(msg(f"one by one {n}", reference=n)), range(8)))
        assert len(simulator.events("submit")) == 8 and simulator.max_in_flight == 1
    finally:
        simulator.stop()


def test_a_session_lost_with_submits_in_flight_gives_each_an_unknown_outcome(make_client):
    from concurrent.futures import ThreadPoolExecutor

    simulator = SmscSimulator(receipts=False, latency_s=2.0).start()
    try:
        client = make_client(simulator, timeout=5.0)

        def send(n):
            try:
                return client.send(msg(f"in flight {n}", reference=n))
            except UnknownOutcome as exc:
                return exc

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(send, n) for n in range(5)]
            wait_until(lambda: len(simulator.events("submit")) == 5, 3)
            simulator.drop_sessions()
            outcomes = [f.result(timeout=10) for f in futures]
        assert all(isinstance(o, UnknownOutcome) and "lost" in str(o) for o in outcomes), outcomes
    finally:
        simulator.stop()


def test_a_submit_with_no_answer_by_its_deadline_is_an_unknown_outcome(make_client):
    simulator = SmscSimulator(receipts=False, latency_s=1.0).start()
    try:
        client = make_client(simulator, timeout=0.3)
        with pytest.raises(UnknownOutcome, match="may have arrived"):
            client.send(msg("slow"))
        assert len(simulator.events("submit")) == 1
    finally:
        simulator.stop()


def test_primary_host_down_the_backup_takes_the_session(make_client):
    backup = SmscSimulator(receipts=False).start()
    try:
        down = free_port()
        client = make_client(backup, host=f"127.0.0.1:{down},127.0.0.1:{backup.port}")
        client.send(msg("via the backup"))
        assert client.peer == f"127.0.0.1:{backup.port}" and len(backup.events("submit")) == 1
    finally:
        backup.stop()


def test_backup_host_that_refuses_the_login_says_so(make_client):
    backup = SmscSimulator(receipts=False, password="other").start()
    try:
        client = make_client(backup, host=f"127.0.0.1:{free_port()},127.0.0.1:{backup.port}")
        with pytest.raises(AccountError, match="SMS_SMSC_PASSWORD"):
            client.send(msg("nobody takes it"))
    finally:
        backup.stop()


def test_a_refused_login_is_not_tried_on_the_backup_host(make_client):
    """The backup host is for a host that cannot be reached: smsc.ru counts refused logins per address,
    whichever host met them."""
    main, backup = SmscSimulator(receipts=False, password="other").start(), SmscSimulator(receipts=False).start()
    try:
        client = make_client(main, host=f"127.0.0.1:{main.port},127.0.0.1:{backup.port}")
        with pytest.raises(LoginRefused, match="SMS_SMSC_PASSWORD"):
            client.send(msg("nobody takes it"))
        assert len(main.events("bind")) == 1 and backup.events("bind") == []
    finally:
        main.stop()
        backup.stop()


def test_a_login_gate_that_refuses_stops_the_bind(make_client):
    simulator = SmscSimulator(receipts=False).start()
    try:
        def held():
            raise LoginHeld("the fleet holds this login refused")

        client = make_client(simulator, login_gate=held)
        with pytest.raises(LoginHeld):
            client.send(msg("not now"))
        assert simulator.events("bind") == []
    finally:
        simulator.stop()


def test_a_pdu_announcing_a_huge_length_ends_the_session_not_the_memory():
    """A peer that answers a submit with a header announcing 4 GiB: nothing of it is read, the submit gets
    an unknown outcome, and the next send binds a new session."""
    import socket
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def hostile():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                head = conn.recv(16)  # bind_transmitter, small enough to come whole
                conn.recv(struct.unpack(">L", head[:4])[0] - 16)
                conn.sendall(struct.pack(">LLLL", 17, 0x80000009, 0, struct.unpack(">L", head[12:16])[0]) + b"\0")
                head = conn.recv(16)  # submit_sm
                conn.sendall(struct.pack(">LLLL", 0xFFFFFFFF, 0x80000004, 0, struct.unpack(">L", head[12:16])[0]))
                conn.recv(65536)  # until the client closes

    server = threading.Thread(target=hostile, daemon=True)
    server.start()
    client = SmscClient(host="127.0.0.1", port=listener.getsockname()[1], system_id="smsc", password="secret",
                        timeout=3.0)
    try:
        for _ in range(2):
            with pytest.raises(UnknownOutcome, match="4294967295 octets"):
                client.send(msg("hi"))
        assert client.binds == 2
    finally:
        client.close()
        server.join(timeout=10)
        listener.close()
