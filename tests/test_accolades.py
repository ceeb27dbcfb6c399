"""The Accolades client against the local simulator (and a canned server for answers the simulator never
gives), over real sockets on 127.0.0.1: every documented answer mapped to the right outcome, the report
callback as the seed describes it, and no number or password in any error an operator sees."""
from __future__ import annotations

import time

import pytest
import requests

from providers.accolades import AccoladesClient, parse_report
from providers.base import (
    Accepted,
    AccountError,
    LoginRefused,
    OutgoingMessage,
    PermanentError,
    ThrottledError,
    TransientError,
)
from simulators.accolades import AccoladesSimulator
from tests.conftest import free_port
from tests.httpstub import StubServer

ACCOUNT, PASSWORD = "7001", "pa&ss=word"
NUMBER = "40722123456"


@pytest.fixture
def sim():
    simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, report_delay_s=0.05).start()
    yield simulator
    simulator.stop()


def client_for(url: str, **options) -> AccoladesClient:
    options.setdefault("timeout", 2.0)
    return AccoladesClient(url=url, account=options.pop("account", ACCOUNT),
                           password=options.pop("password", PASSWORD), **options)


def message(text: str = "Your appointment is at 10:00", recipient: str = NUMBER, reference: int = 42,
            callback_url: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(reference=reference, recipient=recipient, text=text, callback_url=callback_url)


def assert_operator_safe(error: Exception) -> None:
    shown = str(error)
    assert NUMBER not in shown and PASSWORD not in shown and "722123" not in shown
    assert error.__cause__ is None


def test_send_posts_the_seed_form_and_is_accepted_without_an_id(sim):
    client = client_for(sim.url)
    result = client.send(message(callback_url="https://hooks.example/reports/accolades/tok"))
    assert result == Accepted(provider_message_id=None, parts=1)
    [sent] = sim.events("send")
    assert sent["account"] == ACCOUNT
    assert (sent["phone"], sent["message"], sent["id"]) == (NUMBER, "Your appointment is at 10:00", "42")
    assert sent["callback"] == "https://hooks.example/reports/accolades/tok"
    client.close()


def test_without_callback_no_sendresultto_is_sent_and_no_report_follows(sim):
    client_for(sim.url).send(message())
    [sent] = sim.events("send")
    assert sent["callback"] == ""
    time.sleep(0.2)
    assert sim.events("report") == []


def test_plus_prefix_option_sends_a_leading_plus():
    with StubServer(b'{"type": "ok"}') as stub:
        client_for(stub.url, plus_prefix=True).send(message())
        [(method, path, body)] = stub.requests
    assert (method, path) == ("POST", f"/{ACCOUNT}/sms/send")
    assert b"phoneNumber=%2B40722123456" in body


@pytest.mark.parametrize("text, parts", [
    ("a" * 160, 1), ("a" * 161, 2), ("[" * 80, 1), ("[" * 81, 2),   # GSM-7, extension characters double
    ("ж" * 70, 1), ("ж" * 71, 2), ("a" * 153 * 6, 6),               # UCS-2; the default limit of 6 parts
    ("§" * 160, 1), ("`" * 71, 2),                                   # § is GSM-7, the backtick is not
])
def test_check_counts_parts(text, parts):
    assert client_for("http://127.0.0.1:9").check(message(text)) == parts


@pytest.mark.parametrize("text, recipient, words", [
    ("", NUMBER, "empty"),
    ("   ", NUMBER, "empty"),
    ("a" * (153 * 6 + 1), NUMBER, "too long: 7 SMS parts, at most 6"),
    ("ж" * 20_000, NUMBER, "too long: 299 SMS parts, at most 6"),  # fits asterCC's TEXT column
    ("hello", "+40722123456", "digits"),
    ("hello", "0722", "digits"),
])
def test_invalid_messages_fail_before_anything_is_sent(sim, text, recipient, words):
    client = client_for(sim.url)
    with pytest.raises(PermanentError, match=words):
        client.send(message(text, recipient=recipient))
    assert sim.journal == []


def test_max_parts_is_configurable(sim):
    with pytest.raises(PermanentError, match="at most 2"):
        client_for(sim.url, max_parts=2).check(message("ж" * 200))


def test_wrong_password_is_an_account_error(sim):
    with pytest.raises(AccountError, match="wrong account, API off or wrong password") as caught:
        client_for(sim.url, password="wrong").send(message())
    assert_operator_safe(caught.value)
    assert sim.events("send") == []


def test_wrong_account_number_is_an_account_error(sim):
    with pytest.raises(AccountError):
        client_for(sim.url, account="9999").send(message())


def test_ip_blacklist_403_6_is_an_account_error_that_names_it():
    simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, blacklist_after=3).start()
    try:
        bad = client_for(simulator.url, password="wrong")
        for _ in range(3):
            with pytest.raises(LoginRefused, match="code 401"):
                bad.send(message())
        # Now even the right password is refused: the whole account must slow down.
        with pytest.raises(LoginRefused, match="blacklisted") as caught:
            client_for(simulator.url).send(message())
        assert "403.6" in str(caught.value)
        assert simulator.events("send") == []
    finally:
        simulator.stop()


def test_other_403_is_an_account_error(sim):
    sim.force(403, "403.1", "API access disabled")
    with pytest.raises(AccountError, match="forbids"):
        client_for(sim.url).send(message())


def test_404_wrong_url_is_an_account_error_not_a_failed_message(sim):
    with pytest.raises(AccountError, match="SMS_ACCOLADES_URL"):
        client_for(sim.url + "/wrong").send(message())


def test_400_is_permanent_for_the_message_and_hides_numbers(sim):
    sim.force(400, None, f"Invalid phone number {NUMBER}")
    with pytest.raises(PermanentError, match="Invalid phone number …") as caught:
        client_for(sim.url).send(message())
    assert_operator_safe(caught.value)


def test_413_too_large_is_permanent():
    simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, max_length=20).start()
    try:
        with pytest.raises(PermanentError, match="code 413"):
            client_for(simulator.url).send(message("x" * 21))
    finally:
        simulator.stop()


@pytest.mark.parametrize("status", [500, 502])
def test_5xx_is_transient(sim, status):
    sim.force(status, None, "Internal error")
    with pytest.raises(TransientError, match=f"HTTP {status}"):
        client_for(sim.url).send(message())


def test_injected_503_is_transient():
    simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, fail_rate=1.0).start()
    try:
        with pytest.raises(TransientError):
            client_for(simulator.url).send(message())
    finally:
        simulator.stop()


def test_connection_refused_is_transient_and_names_no_secret():
    port = free_port()
    with pytest.raises(TransientError, match="could not reach Accolades") as caught:
        client_for(f"http://127.0.0.1:{port}").send(message())
    assert_operator_safe(caught.value)


def test_timeout_is_transient():
    simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, latency_s=1.0).start()
    try:
        with pytest.raises(TransientError, match="did not answer within"):
            client_for(simulator.url, timeout=0.2).send(message())
    finally:
        simulator.stop()


@pytest.mark.parametrize("body", [b"<html>OK</html>", b"", b'["ok"]', b'{"type": "maybe"}'])
def test_unreadable_200_answer_is_transient(body):
    with StubServer(body) as stub, pytest.raises(TransientError):
        client_for(stub.url).send(message())


def test_error_package_with_http_200_follows_its_code():
    with StubServer(b'{"type": "Error", "message": "bad", "code": 400}') as stub, \
            pytest.raises(PermanentError, match="code 400"):
        client_for(stub.url).send(message())


def test_429_is_throttled_with_the_hinted_delay():
    with StubServer(b'{"type": "Error", "message": "slow down", "code": 429}', status=429,
                    headers={"Retry-After": "17"}) as stub:
        with pytest.raises(ThrottledError) as caught:
            client_for(stub.url).send(message())
    assert caught.value.retry_after == 17.0


def test_redirect_is_not_followed_and_is_an_account_error():
    with StubServer(b"", status=302, headers={"Location": "http://127.0.0.1:9/"}) as stub:
        with pytest.raises(AccountError):
            client_for(stub.url).send(message())
        assert len(stub.requests) == 1


def _collect_reports(sim: AccoladesSimulator, count: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(sim.events("report")) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return sim.events("report")


def test_simulator_calls_back_with_the_seed_fields():
    with StubServer(b"ok") as receiver:
        simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, report_delay_s=0.05).start()
        try:
            client = client_for(simulator.url)
            client.send(message(reference=7, callback_url=receiver.url + "/cb"))
            client.send(message(reference=8, recipient="40722000013", callback_url=receiver.url + "/cb"))
            reports = _collect_reports(simulator, 2)
        finally:
            simulator.stop()
        bodies = sorted(body for _, _, body in receiver.requests)
    assert {(r["id"], r["report_status"], r["status"]) for r in reports} == {("7", "sent", 200),
                                                                              ("8", "error", 200)}
    assert bodies == [
        b"apiName=sms&type=deliveryReport&status=error&id=8"
        b"&errorMessage=The+destination+number+is+not+reachable",
        b"apiName=sms&type=deliveryReport&status=sent&id=7",
    ]


def test_simulator_retries_a_callback_that_failed():
    dead = f"http://127.0.0.1:{free_port()}/cb"
    simulator = AccoladesSimulator(account=ACCOUNT, password=PASSWORD, report_delay_s=0.01).start()
    try:
        client_for(simulator.url).send(message(callback_url=dead))
        reports = _collect_reports(simulator, 2, timeout=5.0)
    finally:
        simulator.stop()
    assert [(r["attempt"], r["status"]) for r in reports[:2]] == [(1, 0), (2, 0)]


# --- the report parser -----------------------------------------------------------------------------

def test_sent_report_is_delivered():
    report = parse_report({"apiName": "sms", "type": "deliveryReport", "status": "sent", "id": "42"})
    assert (report.outcome, report.reference, report.reason) == ("delivered", 42, "")


def test_error_report_is_undelivered_with_the_reason_and_no_number():
    report = parse_report({"apiName": "sms", "type": "deliveryReport", "status": "error", "id": "42",
                           "errorMessage": f"Number +{NUMBER} unreachable"})
    assert report.outcome == "undelivered" and report.reference == 42
    assert report.reason == "Accolades could not send the message: Number … unreachable"


@pytest.mark.parametrize("fields", [
    {},
    {"apiName": "sms", "type": "deliveryReport", "status": "sent"},                       # no id
    {"apiName": "sms", "type": "deliveryReport", "status": "sent", "id": "abc"},          # not our id
    {"apiName": "sms", "type": "deliveryReport", "status": "sent", "id": "４２"},          # not ASCII digits
    {"apiName": "sms", "type": "deliveryReport", "status": "queued", "id": "42"},         # unknown status
    {"apiName": "call", "type": "deliveryReport", "status": "sent", "id": "42"},          # another API
    {"apiName": "sms", "type": "incoming", "status": "sent", "id": "42"},                 # another package
])
def test_malformed_reports_are_refused(fields):
    with pytest.raises(ValueError):
        parse_report(fields)


def test_the_session_passed_in_is_used_and_left_open(sim):
    session = requests.Session()
    client = client_for(sim.url, session=session)
    client.send(message())
    client.close()
    # The owner's session still works after the client is closed.
    assert session.get(sim.url + "/_sim/journal", timeout=2).json()[0]["kind"] == "send"
    session.close()
