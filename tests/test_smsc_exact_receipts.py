"""smsc.ru receipts land on the right row, on real MariaDB, through the real workflow, the SMPP client and
the receiver's default report function: ids written in decimal or hexadecimal, a long message delivered only
when every part is, one undelivered part failing it, two long messages to one phone that do not mix, and
receipts taken on the workers' own session with SMS_SMSC_BIND=transceiver."""
from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager

import pytest
from sqlalchemy import text

from providers import smsc_text
from providers.base import DeliveryReport
from providers.smsc import SmscClient
from settings import load_settings
from simulators.smsc import SmscSimulator
import workflow
from workflow.runtime import Runtime
from workflow.reports import apply_smpp_receipt
from workflow.smpp_receiver import ReceiptHandler, run_receiver
from tests.conftest import free_port, insert_rows, wait_until

DELIVERABLE, UNDELIVERABLE = "79001234567", "79001230013"
LONG = "Ваш заказ {tag} собран и передан курьеру; он позвонит за час до приезда. Спасибо! " * 2  # 3 parts


@pytest.fixture
def sim():
    simulators = []

    def make(**options):
        simulators.append(SmscSimulator(receipt_delay_s=0.05, **options).start())
        return simulators[-1]

    yield make
    for simulator in simulators:
        simulator.stop()


@pytest.fixture
def runtime(mariadb_url, db):
    made = []

    def make(simulator, **settings):
        rt = Runtime(load_settings(**{
            "database_url": mariadb_url, "default_provider": "smsc", "routes": "",
            "redis_url": "redis://127.0.0.1:6379/0", "smsc_host": "127.0.0.1", "smsc_port": simulator.port,
            "smsc_system_id": "smsc", "smsc_password": "secret", "smsc_identical_s": 0, **settings}))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.client("smsc").close()


def send_rows(rt, rows) -> list[int]:
    ids = insert_rows(rt.engine, rows)
    workflow.dispatch_due(rt, lambda queued, provider: None, budget_s=5)
    assert [workflow.send_row(rt, row_id) for row_id in ids] == ["accepted"] * len(ids)
    return ids


def state(rt, row_id: int) -> tuple[str, str, str]:
    with rt.engine.connect() as conn:
        return conn.execute(text(
            "SELECT d.state, b.status, b.error_msg FROM sms_dispatch d JOIN cc10_batchcontacts b"
            " ON b.id = d.batchcontact_id WHERE b.id = :id"), {"id": row_id}).one()


def part_ids(rt, row_id: int) -> list[str]:
    with rt.engine.connect() as conn:
        return conn.scalar(text("SELECT provider_message_id FROM sms_dispatch WHERE batchcontact_id = :id"),
                           {"id": row_id}).split(",")


@contextmanager
def receiver(rt, results: list | None = None):
    """The SMPP receiver in a thread, applying reports as it does by default (to the test's database)."""
    stop = threading.Event()

    def apply(provider, report):
        result = apply_smpp_receipt(rt.engine, provider, report)
        if results is not None:
            results.append(result)
        return result

    thread = threading.Thread(target=run_receiver, args=(rt.settings, stop, apply),
                              kwargs={"reconnect_min_s": 0.05, "unknown_retry_s": (0.2, 0.5)}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.mark.parametrize("receipt_ids", ["dec", "hex"])
def test_receipt_ids_in_decimal_or_hexadecimal_find_their_row(sim, runtime, receipt_ids):
    simulator = sim(receipt_ids=receipt_ids)
    rt = runtime(simulator)
    delivered, failed = send_rows(rt, [(DELIVERABLE, "Your order is ready"), (UNDELIVERABLE, "Order 2")])
    with receiver(rt):
        wait_until(lambda: state(rt, delivered)[0] == "delivered" and state(rt, failed)[0] == "failed", 10,
                   what="both receipts applied")
    deliver_texts = [e["short_message"] for e in simulator.events("deliver")]
    written = {s["message_id"] for s in simulator.events("submit")}
    in_receipts = {t.split(b" ")[0][3:].decode() for t in deliver_texts}
    assert (in_receipts == written) == (receipt_ids == "dec")  # the hex case really writes other ids
    assert state(rt, delivered) == ("delivered", "success", "")
    assert state(rt, failed)[1] == "failed" and "no such number (smsc.ru error 1)" in state(rt, failed)[2]


def test_a_long_message_with_one_undelivered_part_is_failed_with_that_parts_reason(sim, runtime):
    simulator = sim(undeliverable_part=2)
    rt = runtime(simulator)
    (row_id,) = send_rows(rt, [(DELIVERABLE, LONG.format(tag="A"))])
    assert len(part_ids(rt, row_id)) == 3
    results = []
    with receiver(rt, results):
        wait_until(lambda: len(results) == 3, 10, what="three receipts")
    assert [e["short_message"].split(b"stat:")[1][:7] for e in simulator.events("deliver")] == \
        [b"DELIVRD", b"UNDELIV", b"DELIVRD"]
    status = state(rt, row_id)
    assert status[:2] == ("failed", "failed") and "no such number (smsc.ru error 1)" in status[2]


def test_a_long_message_is_delivered_only_when_every_part_is_whatever_the_order(sim, runtime):
    rt = runtime(sim(receipts=False))
    first, second = send_rows(rt, [(DELIVERABLE, LONG.format(tag="B")), (UNDELIVERABLE, LONG.format(tag="C"))])

    def receipt(message_id: str, delivered: bool) -> DeliveryReport:
        return DeliveryReport(outcome="delivered" if delivered else "undelivered", provider_message_id=message_id,
                              reason="" if delivered else "not delivered: the network could not deliver it")

    one, two, three = part_ids(rt, first)
    assert [apply_smpp_receipt(rt.engine, "smsc", receipt(i, True)) for i in (three, one)] == ["awaiting"] * 2
    assert state(rt, first)[0] == "accepted"
    assert apply_smpp_receipt(rt.engine, "smsc", receipt(two, True)) == "applied"
    assert state(rt, first) == ("delivered", "success", "")
    assert apply_smpp_receipt(rt.engine, "smsc", receipt(two, True)) == "unknown"  # a repeated receipt finds nothing

    # The undelivered part's receipt decides, before or after the delivered ones.
    one, two, three = part_ids(rt, second)
    assert apply_smpp_receipt(rt.engine, "smsc", receipt(one, True)) == "awaiting"
    assert apply_smpp_receipt(rt.engine, "smsc", receipt(three, False)) == "applied"
    assert state(rt, second)[:2] == ("failed", "failed")
    apply_smpp_receipt(rt.engine, "smsc", receipt(two, True))  # the last part delivered changes nothing
    assert state(rt, second)[:2] == ("failed", "failed")


def test_two_long_messages_to_one_phone_sent_at_once_do_not_mix(sim, runtime):
    """Row ids 256 apart: an 8-bit reference (`row_id & 0xFF`) would give both messages the same one."""
    simulator = sim(receipts=False, latency_s=0.1)
    rt = runtime(simulator)
    with rt.engine.begin() as conn:
        conn.execute(text("ALTER TABLE cc10_batchcontacts AUTO_INCREMENT = 1000"))
    texts = [LONG.format(tag="D"), LONG.format(tag="E")]
    ids = insert_rows(rt.engine, [(DELIVERABLE, texts[0])])
    with rt.engine.begin() as conn:
        conn.execute(text("ALTER TABLE cc10_batchcontacts AUTO_INCREMENT = :n"), {"n": ids[0] + 256})
    ids += insert_rows(rt.engine, [(DELIVERABLE, texts[1])])
    assert ids[1] - ids[0] == 256
    workflow.dispatch_due(rt, lambda queued, provider: None, budget_s=5)
    outcomes = [None, None]

    def send(k):
        outcomes[k] = workflow.send_row(rt, ids[k])

    threads = [threading.Thread(target=send, args=(k,)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == ["accepted", "accepted"]

    # What the phone does: parts grouped by (sender, reference), ordered by their number, joined.
    submits = simulator.events("submit")
    assert len({s["udh"][3:5] for s in submits}) == 2 and all(s["udh"][:3] == b"\x06\x08\x04" for s in submits)
    messages = defaultdict(dict)
    for s in submits:
        messages[s["udh"][3:5]][s["udh"][6]] = s["text"]
    joined = sorted(smsc_text.decode(b"".join(parts[n] for n in sorted(parts)), 8) for parts in messages.values())
    assert joined == sorted(texts)
    sent_order = [s["udh"][3:5] for s in submits]
    assert sent_order != sorted(sent_order), "the two messages' parts were not interleaved; the test proves less"


def test_receipts_on_the_workers_transceiver_session_reach_the_rows(sim, runtime):
    simulator = sim()
    rt = runtime(simulator, smsc_bind="transceiver")
    handler = ReceiptHandler(lambda provider, report: apply_smpp_receipt(rt.engine, provider, report),
                             unknown_retry_s=(0.2, 0.5))
    rt._clients["smsc"] = SmscClient(host="127.0.0.1", port=simulator.port, system_id="smsc",
                                     password="secret", bind="transceiver", receipts=handler)
    delivered, failed = send_rows(rt, [(DELIVERABLE, LONG.format(tag="F")), (UNDELIVERABLE, "Order 3")])
    wait_until(lambda: state(rt, delivered)[0] == "delivered" and state(rt, failed)[0] == "failed", 10,
               what="receipts applied from the transceiver session")
    assert [e["mode"] for e in simulator.events("bind")] == ["trx"]
    assert [e["status"] for e in simulator.events("deliver_resp")] == [0] * 4


def test_the_receiver_binds_to_the_backup_when_the_primary_is_down(sim, runtime):
    simulator = sim()
    rt = runtime(simulator)
    (row_id,) = send_rows(rt, [(DELIVERABLE, "via the backup")])
    with receiver(runtime(simulator, smsc_host=f"127.0.0.1:{free_port()},127.0.0.1:{simulator.port}")):
        wait_until(lambda: state(rt, row_id)[0] == "delivered", 10, what="the receipt via the backup")
    assert [e["mode"] for e in simulator.events("bind")] == ["tx", "rx"]
