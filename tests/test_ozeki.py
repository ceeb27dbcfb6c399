"""The Ozeki client against the local simulator (and a canned server for answers the simulator never
gives), over real sockets on 127.0.0.1: the seed's not-well-formed answer read, hostile XML refused, every
documented code mapped, the delivery-report notification read in both plausible forms, and no number or
password in any error an operator sees."""
from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from providers.base import AccountError, LoginRefused, OutgoingMessage, PermanentError, TransientError
from providers.ozeki import OzekiClient, parse_answer, parse_report
from simulators.ozeki import OzekiSimulator
from tests.conftest import free_port
from tests.httpstub import StubServer

USERNAME, PASSWORD = "HTTP_User_1", "qwe&123=?"
NUMBER = "40722123456"

# The seed's response, verbatim: the closing tag does not match the opening one.
SEED_ANSWER = (b'<?xml version="1.0"?> <OzApi_CommandResult_SendSms '
               b'xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"> <Code>200</Code> <Message>Command '
               b'successfully executed</Message> <SmsId>7d678b16-0e81-4a05-805b-851e4794495e</SmsId> '
               b'</OzApi_CommandResult_SencdSms>')


@pytest.fixture
def sim():
    simulator = OzekiSimulator(username=USERNAME, password=PASSWORD, report_delay_s=0.05,
                               forbidden_prefixes=("999",), unroutable_prefixes=("888",)).start()
    yield simulator
    simulator.stop()


def client_for(url: str, **options) -> OzekiClient:
    options.setdefault("timeout", 2.0)
    return OzekiClient(url=url, username=options.pop("username", USERNAME),
                       password=options.pop("password", PASSWORD), **options)


def message(text: str = "Hello world", recipient: str = NUMBER, reference: int = 42,
            callback_url: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(reference=reference, recipient=recipient, text=text, callback_url=callback_url)


def assert_operator_safe(error: Exception) -> None:
    shown = str(error)
    assert NUMBER not in shown and PASSWORD not in shown and "qwe" not in shown
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_seed_answer_is_read_despite_its_mismatched_closing_tag():
    root = parse_answer(SEED_ANSWER)
    assert {child.tag: child.text for child in root} == {
        "Code": "200", "Message": "Command successfully executed",
        "SmsId": "7d678b16-0e81-4a05-805b-851e4794495e"}


def test_seed_answer_over_http_gives_the_smsid_and_the_seed_query():
    with StubServer(SEED_ANSWER, headers={"Content-Type": "text/xml"}) as stub:
        result = client_for(stub.url + "/api", sender="+0615546669").send(
            message(callback_url="http://yourapp.example/smsdelivered.php?x=1"))
        [(method, path, _)] = stub.requests
    assert result.provider_message_id == "7d678b16-0e81-4a05-805b-851e4794495e"
    assert method == "GET"
    parts = urlsplit(path)
    assert parts.path == "/api"
    assert {k: v[0] for k, v in parse_qs(parts.query).items()} == {
        "command": "SendSms", "Username": USERNAME, "Password": PASSWORD, "Sender": "+0615546669",
        "Recipient": "+" + NUMBER, "Message": "Hello world",
        "DeliveryReportURL": "http://yourapp.example/smsdelivered.php?x=1",
        "DelivaryReportURL": "http://yourapp.example/smsdelivered.php?x=1"}


@pytest.mark.parametrize("body", [
    # entity expansion ("billion laughs" shape) and external entities must never be expanded
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
    b"<OzApi_CommandResult_SendSms><Code>200</Code><SmsId>&b;</SmsId></OzApi_CommandResult_SendSms>",
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<OzApi_CommandResult_SendSms><Code>200</Code><SmsId>&x;</SmsId></OzApi_CommandResult_SendSms>",
    b"<html><body>Ozeki</body></html>",
    b"not xml at all",
    b"",
    b"<OzApi_CommandResult_SendSms><Code>200</Code>" + b"<Pad>x</Pad>" * 10_000
    + b"</OzApi_CommandResult_SendSms>",                                     # over 64 KB
    b"<OzApi_CommandResult_SendSms><Message>no code</Message></OzApi_CommandResult_SendSms>",
])
def test_hostile_or_unreadable_answers_are_transient_and_nothing_is_expanded(body):
    with StubServer(body) as stub, pytest.raises(TransientError) as caught:
        client_for(stub.url + "/api").send(message())
    assert_operator_safe(caught.value)


def test_send_through_simulator_is_accepted_with_its_smsid(sim):
    result = client_for(sim.api_url).send(message("Привет", callback_url="http://hooks.example/r/t"))
    [sent] = sim.events("send")
    assert result.provider_message_id == sent["sms_id"] and result.parts == 1
    assert (sent["recipient"], sent["message"]) == (NUMBER, "Привет")
    assert sent["callback"] == "http://hooks.example/r/t"


def test_plus_prefix_can_be_turned_off():
    with StubServer(SEED_ANSWER) as stub:
        client_for(stub.url + "/api", plus_prefix=False).send(message())
        [(_, path, _)] = stub.requests
    assert parse_qs(urlsplit(path).query)["Recipient"] == [NUMBER]
    assert "DeliveryReportURL" not in parse_qs(urlsplit(path).query)


@pytest.mark.parametrize("code, error, words", [
    (300, PermanentError, "could not parse"),
    (301, AccountError, "does not implement SendSms"),
    (302, PermanentError, "rejected a parameter"),
    (303, PermanentError, "inappropriate"),
    (304, AccountError, "requires authentication"),
    (305, LoginRefused, "username or password"),
    (306, AccountError, "forbids this user"),
    (307, PermanentError, "forbids sending to this address"),
    (401, AccountError, "API extension is unavailable"),
    (501, PermanentError, "no route"),
    (701, AccountError, "configuration error"),
    (702, AccountError, "configuration error"),
    (703, AccountError, "configuration error"),
    (999, TransientError, "unknown code 999"),
])
def test_every_documented_code_is_mapped(sim, code, error, words):
    sim.force(code)
    with pytest.raises(error, match=words) as caught:
        client_for(sim.api_url).send(message())
    assert type(caught.value) is error
    assert_operator_safe(caught.value)
    assert sim.events("send") == []


def test_wrong_password_is_305_and_an_account_error(sim):
    with pytest.raises(AccountError, match="code 305") as caught:
        client_for(sim.api_url, password="wrong").send(message())
    assert_operator_safe(caught.value)


def test_forbidden_address_307_and_unroutable_501_are_permanent(sim):
    with pytest.raises(PermanentError, match="code 307"):
        client_for(sim.api_url).send(message(recipient="999123456"))
    with pytest.raises(PermanentError, match="code 501"):
        client_for(sim.api_url).send(message(recipient="888123456"))


def test_invalid_messages_fail_before_anything_is_sent(sim):
    client = client_for(sim.api_url)
    for bad in (message(""), message("a" * (153 * 6 + 1)), message(recipient="12ab")):
        with pytest.raises(PermanentError):
            client.send(bad)
    assert sim.journal == []
    assert client.check(message("€" * 80)) == 1 and client.check(message("€" * 81)) == 2


def test_wrong_api_path_is_an_account_error(sim):
    with pytest.raises(AccountError, match="SMS_OZEKI_URL"):
        client_for(sim.url + "/wrong").send(message())


def test_http_5xx_is_transient():
    simulator = OzekiSimulator(username=USERNAME, password=PASSWORD, fail_rate=1.0).start()
    try:
        with pytest.raises(TransientError, match="HTTP 503"):
            client_for(simulator.api_url).send(message())
    finally:
        simulator.stop()


def test_connection_refused_is_transient_without_the_url_or_password():
    port = free_port()
    with pytest.raises(TransientError, match="could not reach Ozeki") as caught:
        client_for(f"http://127.0.0.1:{port}/api").send(message())
    assert_operator_safe(caught.value)


def test_timeout_is_transient():
    simulator = OzekiSimulator(username=USERNAME, password=PASSWORD, latency_s=1.0).start()
    try:
        with pytest.raises(TransientError, match="did not answer within"):
            client_for(simulator.api_url, timeout=0.2).send(message())
    finally:
        simulator.stop()


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_simulator_sends_the_delivery_report_notification(method):
    with StubServer(b"") as receiver:
        simulator = OzekiSimulator(username=USERNAME, password=PASSWORD, report_delay_s=0.05,
                                   report_method=method).start()
        try:
            client = client_for(simulator.api_url)
            ok = client.send(message(callback_url=receiver.url + "/cb?k=v"))
            bad = client.send(message(recipient="40722000013", callback_url=receiver.url + "/cb?k=v"))
            deadline = time.monotonic() + 5
            while len(receiver.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            simulator.stop()
    reports = {}
    for got_method, path, body in receiver.requests:
        assert got_method == method
        fields = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        fields.update({k: v[0] for k, v in parse_qs(body.decode()).items()})
        assert fields.pop("k") == "v"
        report = parse_report(fields)
        reports[report.provider_message_id] = report
    assert reports[ok.provider_message_id].outcome == "delivered"
    assert reports[bad.provider_message_id].outcome == "undelivered"
    assert reports[bad.provider_message_id].reason == "Ozeki reported the message undelivered (Undelivered)"


# --- the report parser -----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, outcome", [
    ({"NotificationName": "SMSDeliveryReport", "SmsId": "a1", "Delivered": "True"}, "delivered"),
    ({"NotificationName": "SMSDeliveryReport", "SmsId": "a1", "Delivered": "false"}, "undelivered"),
    ({"SmsId": "a1", "DeliveryStatus": "Delivered"}, "delivered"),
    ({"SmsId": "a1", "Status": "DELIVRD"}, "delivered"),
    ({"SmsId": "a1", "State": "Expired"}, "undelivered"),
    ({"SmsId": "a1", "Status": "Enroute"}, "accepted"),
    ({"SmsId": "a1", "DeliveryStatus": "Sent"}, "accepted"),
])
def test_report_outcomes(fields, outcome):
    report = parse_report(fields)
    assert (report.outcome, report.provider_message_id, report.reference) == (outcome, "a1", None)


def test_undelivered_reason_never_echoes_free_text():
    report = parse_report({"SmsId": "a1", "Delivered": "False", "DeliveryStatus": f"failed to {NUMBER}"})
    assert report.reason == "Ozeki reported the message undelivered"


@pytest.mark.parametrize("fields", [
    {},
    {"Delivered": "True"},                                                   # no SmsId
    {"SmsId": "a1"},                                                         # no outcome
    {"SmsId": "a1", "Delivered": "perhaps"},
    {"SmsId": "a1", "Status": "whatever"},
    {"NotificationName": "IncomingSMS", "SmsId": "a1", "Delivered": "True"},
    {"SmsId": "x" * 101, "Delivered": "True"},
])
def test_malformed_reports_are_refused(fields):
    with pytest.raises(ValueError):
        parse_report(fields)


def test_debug_logging_never_shows_the_password_or_the_number(sim, caplog):
    """An operator who turns on debug logs (`smsctl -v`, `celery -l debug`) must not leak the password,
    which Ozeki takes in the query string, nor the recipient's number."""
    with caplog.at_level(logging.DEBUG):
        client_for(sim.api_url).send(message())
    assert "qwe" not in caplog.text and NUMBER not in caplog.text


def test_an_answer_with_malformed_headers_does_not_log_the_request_url(caplog):
    """urllib3 warns about headers it cannot parse with the request's URL, which carries Ozeki's password
    and the recipient's number; the answer itself is still read."""
    with StubServer(SEED_ANSWER, headers={"a line that is no header\r\nX-Stub": "1"}) as stub, \
            caplog.at_level(logging.DEBUG):
        client_for(stub.url).send(message())
    assert stub.requests, "the request never reached the stub"
    assert "qwe" not in caplog.text and NUMBER not in caplog.text
