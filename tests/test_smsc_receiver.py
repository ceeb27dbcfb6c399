"""The SMPP receiver against the SMSC simulator: receipts and replies reach the report function, every
deliver_sm is answered, the receiver binds again after the server restarts."""
import threading
import time

import pytest

from providers.base import OutgoingMessage
from providers.smsc import SmscClient
from settings import load_settings
from simulators.smsc import SmscSimulator
from workflow.smpp_receiver import run_receiver


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


class Receiver:
    """run_receiver in a thread, recording what it applies; `answer` decides the result or raises."""

    def __init__(self, port: int, answer=lambda report: "applied", unknown_retry_s=(0.2, 0.4),
                 split_reply_wait_s: float = 30.0):
        self.reports = []
        self.answer = answer
        self.stop = threading.Event()
        settings = load_settings(smsc_host="127.0.0.1", smsc_port=port, smsc_system_id="smsc",
                                 smsc_password="secret")
        self.thread = threading.Thread(
            target=run_receiver, args=(settings, self.stop, self.apply),
            kwargs={"enquire_link_s": 0.3, "reconnect_min_s": 0.05, "unknown_retry_s": unknown_retry_s,
                    "split_reply_wait_s": split_reply_wait_s, "logins": None},
            daemon=True)

    def apply(self, provider, report):
        assert provider == "smsc"
        result = self.answer(report)
        self.reports.append(report)
        return result

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def sim():
    simulator = SmscSimulator(receipt_delay_s=0.05, idle_timeout_s=1.0).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def client(sim):
    c = SmscClient(host="127.0.0.1", port=sim.port, system_id="smsc", password="secret", timeout=3.0)
    yield c
    c.close()


def test_receipts_and_a_reply_reach_apply(sim, client):
    with Receiver(sim.port) as receiver:
        ok = client.send(OutgoingMessage(1, "79001234567", "Your order is ready"))
        bad = client.send(OutgoingMessage(2, "79001230013", "Your order is ready"))
        wait_for(lambda: len(receiver.reports) == 2)
        sim.send_reply("79001234567", "Спасибо, заберу завтра")
        wait_for(lambda: len(receiver.reports) == 3)
        wait_for(lambda: len(sim.events("deliver_resp")) == 3)
    by_id = {r.provider_message_id: r for r in receiver.reports[:2]}
    assert by_id[ok.provider_message_id].outcome == "delivered"
    assert by_id[bad.provider_message_id].outcome == "undelivered"
    assert "no such number (smsc.ru error 1)" in by_id[bad.provider_message_id].reason
    reply = receiver.reports[2]
    assert (reply.reply_text, reply.recipient) == ("Спасибо, заберу завтра", "79001234567")
    assert [e["status"] for e in sim.events("deliver_resp")] == [0, 0, 0]
    assert "rx" in {b["mode"] for b in sim.events("bind")}


def test_a_reply_split_into_several_sms_is_applied_whole_whatever_their_order(sim, client):
    parts = ["Добрый день, ", "заберу заказ ", "в пятницу после шести"]
    with Receiver(sim.port) as receiver:
        client.send(OutgoingMessage(1, "79001234567", "Your order is ready"))
        wait_for(lambda: len(receiver.reports) == 1)
        sim.send_reply("79001234567", parts, order=[2, 0, 1])
        wait_for(lambda: len(sim.events("deliver_resp")) == 4)
        time.sleep(0.2)  # nothing more is applied
    replies = [r for r in receiver.reports if r.reply_text is not None]
    assert [(r.reply_text, r.recipient) for r in replies] == [("".join(parts), "79001234567")]
    assert [e["status"] for e in sim.events("deliver_resp")] == [0, 0, 0, 0]


def test_a_split_reply_whose_part_never_comes_is_applied_as_far_as_it_came(sim, client):
    with Receiver(sim.port, split_reply_wait_s=0.3) as receiver:
        sim.send_reply("79001234567", ["Call me ", "LOST", "tomorrow"], order=[0, 2])
        wait_for(lambda: len(receiver.reports) == 1)
        time.sleep(0.5)
    assert [r.reply_text for r in receiver.reports] == ["Call me […]tomorrow"]


def test_receipts_wait_for_a_receiver_and_unknown_ids_are_acknowledged(sim, client):
    client.send(OutgoingMessage(1, "79001234567", "sent before the receiver started"))
    time.sleep(0.2)
    with Receiver(sim.port, answer=lambda report: "unknown") as receiver:
        wait_for(lambda: len(sim.events("deliver_resp")) == 1)
    assert receiver.reports[0].outcome == "delivered"
    assert sim.events("deliver_resp")[0]["status"] == 0


def test_a_receipt_that_overtakes_its_message_id_is_applied_once_the_id_is_known(sim, client):
    answers = iter(["unknown", "unknown", "applied"])
    with Receiver(sim.port, answer=lambda report: next(answers)) as receiver:
        client.send(OutgoingMessage(1, "79001230013", "rejected at once"))
        wait_for(lambda: len(receiver.reports) == 3)
    assert [r.provider_message_id for r in receiver.reports] == [receiver.reports[0].provider_message_id] * 3
    assert [e["status"] for e in sim.events("deliver_resp")] == [0], "acknowledged once, at once"


def test_a_receipt_for_an_id_never_sent_is_given_up_after_its_retries(sim, client):
    with Receiver(sim.port, answer=lambda report: "unknown") as receiver:
        client.send(OutgoingMessage(1, "79001234567", "not ours"))
        wait_for(lambda: len(receiver.reports) == 3)
        time.sleep(0.6)
    assert len(receiver.reports) == 3


def test_a_failed_apply_asks_for_redelivery(sim, client):
    failures = iter([True, False])

    def answer(report):
        if next(failures):
            raise RuntimeError("database down")
        return "applied"

    with Receiver(sim.port, answer=answer) as receiver:
        client.send(OutgoingMessage(1, "79001234567", "hello"))
        wait_for(lambda: len(receiver.reports) == 1)  # delivered again after the temporary error
    assert [e["status"] for e in sim.events("deliver_resp")] == [0x64, 0]


def test_receiver_survives_idle_drop_and_server_restart(sim, client):
    with Receiver(sim.port) as receiver:
        wait_for(lambda: sim.sessions("rx") == 1)
        time.sleep(1.5)  # longer than the simulator's idle drop: the keep-alive holds the session
        assert sim.events("drop") == []
        port = sim.port
        sim.stop()
        second = SmscSimulator(port, receipt_delay_s=0.05).start()
        try:
            wait_for(lambda: second.sessions("rx") == 1)
            c2 = SmscClient(host="127.0.0.1", port=port, system_id="smsc", password="secret")
            try:
                c2.send(OutgoingMessage(3, "79001234567", "after restart"))
            finally:
                c2.close()
            wait_for(lambda: len(receiver.reports) == 1)
        finally:
            receiver.stop.set()
            receiver.thread.join(timeout=5)
            second.stop()


def test_smsctl_smpp_receiver_unbinds_on_sigterm(sim, sqlite_db):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    smsctl = Path(sys.executable).with_name("smsctl")
    env = {**os.environ, "SMS_DATABASE_URL": str(sqlite_db.url),
           "SMS_SMSC_HOST": "127.0.0.1", "SMS_SMSC_PORT": str(sim.port),
           "SMS_SMSC_SYSTEM_ID": "smsc", "SMS_SMSC_PASSWORD": "secret"}
    process = subprocess.Popen([str(smsctl), "smpp-receiver"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: sim.sessions("rx") == 1, timeout=15)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        process.stderr.close()
    assert [e["mode"] for e in sim.events("unbind")] == ["rx"]
