"""smsc.ru end to end on real MariaDB: asterCC rows sent by the real workflow through the SMPP client to
the simulator, and the receiver applying the receipts and a reply with the real `apply_report`."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime
from decimal import Decimal

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select

from db.models import BatchContact, BatchContactArchive, Dispatch
from settings import load_settings
from simulators.smsc import SmscSimulator
from smsctl import metrics, overview
from smsctl import status as status_screen
import workflow
from workflow.runtime import Runtime
from workflow.reports import apply_smpp_receipt
from workflow.smpp_receiver import run_receiver


@pytest.fixture
def sim():
    simulator = SmscSimulator(receipt_delay_s=0.05).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def rt(mariadb_url, db, sim):
    settings = load_settings(database_url=mariadb_url, default_provider="smsc", routes="",
                             redis_url="redis://127.0.0.1:6379/0", smsc_host="127.0.0.1",
                             smsc_port=sim.port, smsc_system_id="smsc", smsc_password="secret")
    runtime = Runtime(settings)
    yield runtime
    runtime.client("smsc").close()


def insert_new(engine, target: str, content: str) -> int:
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content=content))
        return conn.execute(insert(BatchContact).values(
            batchcontact_archive_id=archive.inserted_primary_key[0], target=target, status="new",
            schedulertime=now, created=now, creby="test", error_msg="", responsenote="",
        )).inserted_primary_key[0]


def row(engine, row_id: int):
    with engine.connect() as conn:
        return conn.execute(select(BatchContact.status, BatchContact.error_msg, BatchContact.responsenote)
                            .where(BatchContact.id == row_id)).one()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_receipts_and_a_reply_land_in_astercc(rt, sim):
    engine, tag = rt.engine, uuid.uuid4().hex[:8]
    # 104 characters of Cyrillic: two UCS-2 parts, so two receipts
    delivered = insert_new(engine, "79001234567", f"Ваш заказ {tag} готов. " * 4)
    failed = insert_new(engine, "79001230013", f"Order {tag} is ready")
    queued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: queued.extend(ids), budget_s=5)
    assert sorted(queued) == sorted([delivered, failed])
    assert [workflow.send_row(rt, row_id) for row_id in (delivered, failed)] == ["accepted", "accepted"]
    assert len(sim.events("submit")) == 3

    stop = threading.Event()
    results: list[str] = []

    def apply(provider, report):
        results.append(apply_smpp_receipt(rt.engine, provider, report))
        return results[-1]

    receiver = threading.Thread(target=run_receiver, args=(rt.settings, stop, apply),
                                kwargs={"reconnect_min_s": 0.05}, daemon=True)
    receiver.start()
    try:
        wait_for(lambda: row(engine, failed).status == "failed" and len(results) == 3)
        sim.send_reply("79001234567", "Спасибо, заберу завтра")
        wait_for(lambda: row(engine, delivered).responsenote != "")
    finally:
        stop.set()
        receiver.join(timeout=5)
    assert not receiver.is_alive()
    assert row(engine, delivered) == ("success", "", "Спасибо, заберу завтра")
    status, error_msg, _ = row(engine, failed)
    assert status == "failed" and "no such number (smsc.ru error 1)" in error_msg
    # one receipt per part of the long message: the first awaits the other, the second moves the row
    assert sorted(results) == ["applied", "applied", "applied", "awaiting"]


def test_cost_parts_and_error_words_of_receipts_reach_the_table_and_the_metrics(mariadb_url, db):
    """smsc.ru's own receipt TLVs (cost 0x2000, parts 0x2002) and its error 13 through the real receiver."""
    sim = SmscSimulator(receipt_delay_s=0.05, receipt_cost="1.9500", receipt_error=13).start()
    settings = load_settings(database_url=mariadb_url, default_provider="smsc", routes="",
                             redis_url="redis://127.0.0.1:6379/0", smsc_host="127.0.0.1", smsc_port=sim.port,
                             smsc_system_id="smsc", smsc_password="secret")
    rt = Runtime(settings)
    stop = threading.Event()
    receiver = threading.Thread(target=run_receiver, kwargs={"reconnect_min_s": 0.05}, daemon=True,
                                args=(settings, stop, lambda p, report: apply_smpp_receipt(rt.engine, p, report)))
    try:
        tag = uuid.uuid4().hex[:8]
        delivered = insert_new(rt.engine, "79001234567", f"Order {tag} is ready")
        blocked = insert_new(rt.engine, "79001230013", f"Order {tag} is late")
        workflow.dispatch_due(rt, lambda ids, provider: None, budget_s=5)
        assert [workflow.send_row(rt, row_id) for row_id in (delivered, blocked)] == ["accepted", "accepted"]
        receiver.start()
        wait_for(lambda: row(rt.engine, blocked).status == "failed" and spent(rt.engine, delivered)[0] is not None)
    finally:
        stop.set()
        receiver.join(timeout=5)
        rt.client("smsc").close()
        sim.stop()
    assert not receiver.is_alive()
    assert spent(rt.engine, delivered) == spent(rt.engine, blocked) == (Decimal("1.9500"), 1)
    status, error_msg, _ = row(rt.engine, blocked)
    assert status == "failed" and "blocked" in error_msg and error_msg.endswith("(smsc.ru error 13)")
    assert row(rt.engine, delivered).status == "success"

    body = generate_latest(metrics.registry(settings, rt.engine)).decode()
    seen = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}
    for window in ("1h", "1d"):
        assert seen[("sms_cost_total", (("provider", "smsc"), ("window", window)))] == pytest.approx(3.9)
        assert seen[("sms_parts_per_message", (("provider", "smsc"), ("window", window)))] == 1.0
    smsc_line = next(line for line in status_screen.plain(overview.read(settings, rt.engine)).splitlines()
                     if line.startswith("smsc:"))
    assert smsc_line.endswith("cost 1 h / 1 d 3.9000 / 3.9000; parts/msg 1.00")


def spent(engine, row_id: int):
    with engine.connect() as conn:
        return tuple(conn.execute(select(Dispatch.cost, Dispatch.parts_reported)
                                  .where(Dispatch.batchcontact_id == row_id)).one())


def test_a_throttled_submit_waits_counts_as_no_failure_and_slows_the_session(rt, sim):
    row_id = insert_new(rt.engine, "79001234567", f"Order {uuid.uuid4().hex[:8]} is ready")
    workflow.dispatch_due(rt, lambda ids, provider: None, budget_s=5)
    sim.fail_next(0x58)
    assert workflow.send_row(rt, row_id) == "throttled"
    with rt.engine.connect() as conn:
        waited = conn.execute(select(Dispatch.state, Dispatch.wait_reason, Dispatch.failures)
                              .where(Dispatch.batchcontact_id == row_id)).one()
    assert tuple(waited) == ("waiting", "throttled", 0)
    assert row(rt.engine, row_id).status == "pending" and rt.client("smsc").pace_gap_s > 0
