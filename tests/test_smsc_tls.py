"""smsc.ru over TLS: the same send and receipt as in plain text, through a TLS endpoint in front of the
simulator with a self-signed certificate made here (`openssl`), the workers and the receiver verifying it;
a plain-text client, and a client that does not trust the certificate, are refused there."""
from __future__ import annotations

import subprocess
import threading

import pytest
from sqlalchemy import text

from providers.base import OutgoingMessage, TransientError
from providers.smsc import SmscClient
from settings import load_settings
from simulators.smsc import SmscSimulator, TlsFront
import workflow
from workflow.runtime import Runtime
from workflow.reports import apply_smpp_receipt
from workflow.smpp_receiver import run_receiver
from tests.conftest import insert_rows, wait_until


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=smsc-simulator", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture
def front(certificate):
    simulator = SmscSimulator(receipt_delay_s=0.05).start()
    endpoint = TlsFront(simulator.port, *certificate).start()
    yield simulator, endpoint
    endpoint.stop()
    simulator.stop()


def test_a_send_and_its_receipt_go_through_tls(front, certificate, mariadb_url, db):
    simulator, endpoint = front
    rt = Runtime(load_settings(database_url=mariadb_url, default_provider="smsc", routes="",
                               redis_url="redis://127.0.0.1:6379/0", smsc_host="127.0.0.1",
                               smsc_port=endpoint.port, smsc_tls=True, smsc_ca_file=certificate[0],
                               smsc_system_id="smsc", smsc_password="secret", smsc_identical_s=0))
    stop = threading.Event()
    receiver = threading.Thread(target=run_receiver, daemon=True, args=(
        rt.settings, stop, lambda provider, report: apply_smpp_receipt(rt.engine, provider, report)))
    receiver.start()
    try:
        (row_id,) = insert_rows(rt.engine, [("79001234567", "Ваш код: 4711. Never share it.")])
        workflow.dispatch_due(rt, lambda queued, provider: None, budget_s=5)
        assert workflow.send_row(rt, row_id) == "accepted"

        def row_state():
            with rt.engine.connect() as conn:
                return conn.scalar(text("SELECT state FROM sms_dispatch WHERE batchcontact_id = :id"),
                                   {"id": row_id})

        wait_until(lambda: row_state() == "delivered", 15, what="the receipt over TLS")
    finally:
        stop.set()
        receiver.join(timeout=5)
        rt.client("smsc").close()
    assert sorted((e["mode"], e["status"]) for e in simulator.events("bind")) == [("rx", 0), ("tx", 0)]
    assert len(simulator.events("submit")) == 1 and endpoint.refused == 0


def test_a_plain_text_client_is_refused_at_the_tls_endpoint(front):
    simulator, endpoint = front
    client = SmscClient(host="127.0.0.1", port=endpoint.port, system_id="smsc", password="secret", timeout=3)
    try:
        with pytest.raises(TransientError, match="did not bind us"):
            client.send(OutgoingMessage(1, "79001234567", "in clear"))
    finally:
        client.close()
    wait_until(lambda: endpoint.refused == 1, 5, what="the endpoint to count the refused handshake")
    assert simulator.events("bind") == []


def test_a_certificate_nobody_vouches_for_is_refused(front):
    simulator, endpoint = front
    client = SmscClient(host="127.0.0.1", port=endpoint.port, system_id="smsc", password="secret", timeout=3,
                        tls=True)
    try:
        with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
            client.send(OutgoingMessage(1, "79001234567", "to a stranger"))
    finally:
        client.close()
    assert simulator.events("bind") == []


def test_threads_share_one_tls_session_with_a_window_of_submits(certificate):
    from concurrent.futures import ThreadPoolExecutor

    simulator = SmscSimulator(receipts=False, latency_s=0.02).start()
    endpoint = TlsFront(simulator.port, *certificate).start()
    client = SmscClient(host="127.0.0.1", port=endpoint.port, system_id="smsc", password="secret", timeout=10,
                        tls=True, ca_file=certificate[0])
    try:
        with ThreadPoolExecutor(16) as pool:
            accepted = list(pool.map(lambda n: client.send(OutgoingMessage(n, f"7900{n:07d}", f"TLS {n}")),
                                     range(300)))
        assert len({a.provider_message_id for a in accepted}) == 300
        assert len(simulator.events("submit")) == 300 and client.binds == 1 and simulator.max_in_flight > 1
    finally:
        client.close()
        endpoint.stop()
        simulator.stop()


def test_tls_takes_port_3443_unless_told_otherwise(certificate):
    assert load_settings(smsc_tls=True).smsc_port == 3443
    assert load_settings(smsc_tls=True, smsc_port=3700).smsc_port == 3700
    assert load_settings().smsc_port == 3700
    assert load_settings(smsc_ca_file=certificate[0]).smsc_ca_file == certificate[0]
