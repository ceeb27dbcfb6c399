"""`smsctl webhooks` as a deployment runs it (a real process, MariaDB behind it): it keeps answering while
clients dribble their headers, a genuine report carrying markup is stored as plain text, and it warns
about a plain-http public URL."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from db.models import DispatchState
from settings import load_settings
from workflow.callbacks import callback_url
from tests.conftest import ROOT, app_env, free_port, wait_until
from tests.test_webhooks import accolades_report, insert_accepted, state

pytestmark = [pytest.mark.integration, pytest.mark.timing]

SECRET = "server-test-webhook-secret-0123456789abcdef"
PUBLIC_URL = "http://sms.example.com"
DRIBBLERS = 20


@pytest.fixture(scope="module")
def server(mariadb_url, tmp_path_factory):
    """`smsctl webhooks` on a free port; yields (base URL, the path of its log)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("webhooks") / "webhooks.log"
    env = app_env(mariadb_url, "filesystem://", SMS_WEBHOOK_SECRET=SECRET, SMS_PUBLIC_URL=PUBLIC_URL)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "smsctl.cli", "webhooks", "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url) or process.poll() is not None, 30, what="smsctl webhooks to answer")
        assert process.poll() is None, log_path.read_text()
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_healthz_answers_within_2_s_while_20_clients_dribble_their_headers(server, mariadb_url, db):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    head = b"POST /reports/accolades/x HTTP/1.1\r\nHost: sms.example.com\r\nContent-Type: text/plain\r\n"
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(DRIBBLERS)]
    stop, sent = threading.Event(), [0]

    def dribble():  # a byte a second on every connection
        while not stop.is_set() and sent[0] < len(head):
            for sock in sockets:
                sock.sendall(head[sent[0]:sent[0] + 1])
            sent[0] += 1
            stop.wait(1.0)

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    settings = load_settings(database_url=mariadb_url, webhook_secret=SECRET, public_url=url)
    try:
        answers = []
        started = time.monotonic()
        while time.monotonic() - started < 10:
            before = time.monotonic()
            answers.append((requests.get(f"{url}/healthz", timeout=2).status_code, time.monotonic() - before))
            time.sleep(0.25)
        row = insert_accepted(db, "accolades")
        report = requests.post(callback_url(settings, "accolades", row, 0, attempt=1), data=accolades_report(row),
                               timeout=2)
        still_dribbling = sum(_open(sock) for sock in sockets)
    finally:
        stop.set()
        dribbler.join(timeout=5)
        for sock in sockets:
            sock.close()
    assert sent[0] >= 8, "the clients did not dribble"
    assert still_dribbling == DRIBBLERS, "the test must hold 20 slow connections open while it asks"
    assert {status for status, _ in answers} == {200} and max(took for _, took in answers) < 2
    assert report.status_code == 200 and state(db, row)[2] == DispatchState.DELIVERED


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds `sock` open (it has neither answered nor closed it)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_a_genuine_report_carrying_markup_is_stored_as_plain_text(server, mariadb_url, db):
    url, _ = server
    settings = load_settings(database_url=mariadb_url, webhook_secret=SECRET, public_url=url)
    row = insert_accepted(db, "accolades")
    answer = requests.post(callback_url(settings, "accolades", row, 0, attempt=1), timeout=5, data=accolades_report(
        row, "error", errorMessage='<a href="https://evil.example">Number</a> <script>x()</script>\x1b[31mbarred'))
    assert answer.status_code == 200
    status, error_msg, dispatch_state, _ = state(db, row)
    assert (status, dispatch_state) == ("failed", DispatchState.FAILED)
    assert error_msg == "Accolades could not send the message: Number x() [31mbarred"


def test_a_plain_http_public_url_is_warned_about_at_start(server):
    _, log_path = server
    assert "SMS_PUBLIC_URL is plain http://" in log_path.read_text()


@pytest.mark.parametrize("secret", ["short-secret", "change-me-to-64-random-characters-eg-openssl-rand-hex-32",
                                    f"{SECRET},weak", " , "],
                         ids=["short", "the example", "one weak key of two", "no key"])
def test_a_weak_webhook_secret_stops_the_start(mariadb_url, secret):
    env = app_env(mariadb_url, "filesystem://", SMS_WEBHOOK_SECRET=secret)
    result = subprocess.run([sys.executable, "-m", "smsctl.cli", "webhooks", "--port", str(free_port())],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "SMS_WEBHOOK_SECRET" in result.stderr and secret not in result.stderr
