"""The Mobilgroup client against the local simulator and against canned answers written as the seed
prints them, over real sockets on 127.0.0.1."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from providers.base import (
    Accepted,
    AccountError,
    AlreadySentUnconfirmed,
    LoginRefused,
    OutgoingMessage,
    PermanentError,
    ThrottledError,
    TransientError,
)
from providers.mobilgroup import MobilgroupClient, NoSuchRequestError, parse_answer
from simulators.mobilgroup import MobilgroupSimulator
from tests.conftest import free_port

PASSWORD = "s3cr&t<pw>"

# The seed's sample answers, verbatim: loose end tags, trailing blanks, a line break inside <time>.
SEED_OK = (b'<?xml version="1.0" encoding="windows-1251"?>\n<response>\n<result>OK</result>\n'
           b'<error>0</error>\n<id>123456</ id>\n</response >\n')
SEED_STATUS = (b'<?xml version="1.0" encoding="windows-1251"?>  \n<response>  \n<result>OK</result>  \n'
               b'<error>0</error>  \n<status>0 </status>  \n<extended>  \n'
               b'<dest><phone>79039587454</phone><time>2007-03-12  \n23:24</time><status>1</status></dest>  \n'
               b'<dest><phone>79236411579</phone><time>2007-03-12  \n23:23</time><status>2</status></dest>  \n'
               b'</extended>  \n<id>123456</ id>  \n</response >\n')
SEED_BALANCE = (b'<?xml version="1.0" encoding="windows-1251"?>  \n<response>  \n<result>OK</result>  \n'
                b'<error>0</error>  \n<balance>1234</balance>  \n<id>123456</ id>  \n</response >\n')


def seed_error(code: int) -> bytes:
    return (b'<?xml version="1.0" encoding="windows-1251"?>\n<response>\n<result>ERROR</result>\n'
            b'<error>%d</error>\n<id>123456</ id>\n</response >\n' % code)


def seed_status(overall: str, dest: str | None) -> bytes:
    extended = (f"<extended>  \n<dest><phone>79039587454</phone><time>2007-03-12  \n23:24</time>"
                f"<status>{dest}</status></dest>  \n</extended>  \n") if dest is not None else ""
    return (f'<?xml version="1.0" encoding="windows-1251"?>  \n<response>  \n<result>OK</result>  \n'
            f"<error>0</error>  \n<status>{overall} </status>  \n{extended}<id>123456</ id>  \n"
            f"</response >\n").encode("windows-1251")


class CannedServer(ThreadingHTTPServer):
    """Answers every request with `status`, `headers`, `body`; keeps the request bodies it got."""

    daemon_threads = True

    def __init__(self, body: bytes = SEED_OK, status: int = 200, headers: dict | None = None):
        super().__init__(("127.0.0.1", 0), _CannedHandler)
        self.body, self.status, self.headers = body, status, headers or {}
        self.received: list[tuple[str, str, dict, bytes]] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/extxml.php"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _CannedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append((self.command, self.path, dict(self.headers), body))
        self.send_response(self.server.status)
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = _answer

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture
def sim():
    simulator = MobilgroupSimulator(password=PASSWORD).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def canned():
    servers = []

    def start(body: bytes = SEED_OK, status: int = 200, headers: dict | None = None) -> CannedServer:
        servers.append(CannedServer(body, status, headers))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def client_for(url: str, /, **options) -> MobilgroupClient:
    config = dict(url=url, user_id="1", user="demo", password=PASSWORD, timeout=5.0) | options
    return MobilgroupClient(**config)


@pytest.fixture
def client(sim):
    mobilgroup = client_for(sim.api_url, sender="Call-Ctr")
    yield mobilgroup
    mobilgroup.close()


def sms(reference: int = 101, text: str = "Your order is ready", recipient: str = "79039587454"):
    return OutgoingMessage(reference=reference, recipient=recipient, text=text)


# --- sending ---------------------------------------------------------------------------------------

def test_send_is_accepted_with_our_reference_as_the_provider_id(client, sim):
    assert client.send(sms(101)) == Accepted(provider_message_id="101")
    [event] = sim.events("send")
    assert event["outcome"] == "accepted"
    assert (event["id"], event["phone"], event["message"]) == ("101", "79039587454", "Your order is ready")
    assert (event["sender"], event["valid"], event["unicode"]) == ("Call-Ctr", "1", "0")


def test_request_is_windows_1251_xml_with_every_field(canned):
    server = canned()
    client = client_for(server.url, sender="Shop", valid_hours=24, unicode_tag="translit")
    client.send(sms(123456, "Привет & <до встречи>"))
    [(method, path, headers, body)] = server.received
    assert (method, path, headers["Content-Type"]) == ("POST", "/extxml.php", "application/xml")
    text = body.decode("windows-1251")
    assert text.startswith('<?xml version="1.0" encoding="windows-1251"?>')
    for line in ("<user_id>1</user_id>", "<user>demo</user>", "<pwd>s3cr&amp;t&lt;pw&gt;</pwd>",
                 "<command>send</command>", "<phone>79039587454</phone>", "<id>123456</id>", "<sender>Shop</sender>",
                 "<message>Привет &amp; &lt;до встречи&gt;</message>", "<translit>1</translit>",
                 "<valid>24</valid>"):
        assert line in text
    assert "rus_sms" not in text


def test_cyrillic_and_characters_outside_cp1251_arrive_intact(client, sim):
    text = "Ваш заказ готов ✓ 日本"
    client.send(sms(102, text))
    [event] = sim.events("send")
    assert event["message"] == text
    assert event["unicode"] == "1"


def test_resend_after_lost_answer_is_never_sent_twice_and_is_confirmed_by_a_request_of_its_own(client, sim):
    client.send(sms(103))
    with pytest.raises(AlreadySentUnconfirmed, match="already has this request"):
        client.send(sms(103))
    assert [e["kind"] for e in sim.events() if e["kind"] in ("send", "status")] == ["send", "send"], \
        "the confirmation is the caller's to ask, with a rate-limit slot of its own"
    client.confirm_already_sent(sms(103))
    assert [e["outcome"] for e in sim.events("send")] == ["accepted", "duplicate"]
    assert list(sim.requests) == ["103"]


def test_a_confirmation_whose_answer_is_lost_says_the_provider_cannot_tell(client, sim):
    client.send(sms(104))
    sim.should_lose = lambda: (sim.last_recorded() or {}).get("kind") == "status"  # every status answer lost
    with pytest.raises(TransientError):
        client.confirm_already_sent(sms(104))
    sim.should_lose = lambda: False
    client.confirm_already_sent(sms(104))
    assert [e["kind"] for e in sim.events() if e["kind"] in ("send", "status")] == ["send", "status", "status"]


def test_a_request_held_for_another_number_is_not_ours(client, sim):
    client.send(sms(105))
    with pytest.raises(PermanentError, match="for another number"):
        client.confirm_already_sent(sms(105, recipient="79990000000"))
    assert client.holds_request_for(105, sms(105).recipient) is True
    assert client.holds_request_for(106, sms(106).recipient) is None


def test_a_status_answer_naming_no_one_is_taken_as_ours_and_a_blank_number_is_not(canned):
    assert client_for(canned(seed_status("0", None)).url).holds_request_for(123456, "79039587454") is True
    blank = seed_status("0", "1").replace(b"<phone>79039587454</phone>", b"<phone> </phone>")
    assert client_for(canned(blank).url).holds_request_for(123456, "79039587454") is False


# --- text and number checks ------------------------------------------------------------------------

@pytest.mark.parametrize("flag, fits, too_long", [("0", 140, 141), ("1", 64, 65)])
def test_length_limit_per_unicode_flag(flag, fits, too_long):
    client = client_for("http://127.0.0.1:9/extxml.php", unicode=flag)
    assert client.check(sms(text="ж" * fits)) == 1
    with pytest.raises(PermanentError, match=f"too long: {too_long} characters"):
        client.check(sms(text="ж" * too_long))


def test_auto_sends_short_cyrillic_as_unicode_and_longer_transliterated(client, sim):
    client.send(sms(201, "ж" * 64))
    client.send(sms(202, "ж" * 65))
    client.send(sms(203, "a" * 140))
    assert [(e["id"], e["unicode"], e["outcome"]) for e in sim.events("send")] == [
        ("201", "1", "accepted"), ("202", "0", "accepted"), ("203", "0", "accepted")]
    with pytest.raises(PermanentError, match="too long"):
        client.check(sms(text="ж" * 141))


@pytest.mark.parametrize("message, words", [
    (sms(text=""), "empty"), (sms(text="  \n"), "empty"),
    (sms(recipient="+79039587454"), "digits"), (sms(recipient="7 903 958"), "digits"),
    (sms(text="bell \x07"), "control character"),
])
def test_messages_that_can_never_be_sent_fail_before_any_request(message, words, client, sim):
    with pytest.raises(PermanentError, match=words) as caught:
        client.send(message)
    assert "7903" not in str(caught.value)
    assert sim.events() == []


# --- error codes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("code, error", [
    (1, PermanentError), (2, AccountError), (3, LoginRefused), (4, LoginRefused), (5, AccountError),
    (6, AccountError), (8, PermanentError), (9, AccountError), (10, PermanentError),
    (11, PermanentError), (12, NoSuchRequestError), (13, TransientError),
])
def test_every_error_code_maps_to_what_the_workflow_must_do(code, error, canned):
    client = client_for(canned(seed_error(code)).url)
    with pytest.raises(error, match=f"error {code}") as caught:
        client.send(sms())
    assert type(caught.value) is error
    assert PASSWORD not in str(caught.value)


def test_error_7_outside_send_is_permanent(canned):
    with pytest.raises(PermanentError, match="already has a request"):
        client_for(canned(seed_error(7)).url).status(123456)


@pytest.mark.parametrize("options, error, words", [
    ({"user_id": "2"}, AccountError, "error 3: .*client id"),
    ({"password": "wrong"}, AccountError, "error 4: .*login or password"),
    ({"user": "other"}, AccountError, "error 4"),
])
def test_wrong_credentials_are_account_errors(options, error, words, sim):
    with pytest.raises(error, match=words) as caught:
        client_for(sim.api_url, **options).send(sms())
    assert "wrong" not in str(caught.value)


def test_blocked_account_and_empty_purse_are_account_errors():
    for options, words in (({"blocked": True}, "error 5: .*blocked"), ({"balance": 1.0, "price": 2.0},
                                                                        "error 9: .*money")):
        simulator = MobilgroupSimulator(password=PASSWORD, **options).start()
        try:
            with pytest.raises(AccountError, match=words):
                client_for(simulator.api_url).send(sms())
            assert simulator.requests == {}
        finally:
            simulator.stop()


# --- delivery status -------------------------------------------------------------------------------

def test_status_of_a_delivered_message(client, sim):
    client.send(sms(301))
    report = client.status(301)
    assert (report.outcome, report.reference, report.provider_message_id, report.reason) == (
        "delivered", 301, "301", "")
    assert report.extra["dest_status"] == "1"


def test_status_of_an_undeliverable_recipient(client, sim):
    client.send(sms(302, recipient="79990000013"))
    report = client.status(302)
    assert report.outcome == "undelivered"
    assert report.reason == "not delivered: unreachable, lifetime expired, or subscriber blocked"


def test_status_while_still_on_its_way():
    simulator = MobilgroupSimulator(password=PASSWORD, pending_s=60).start()
    try:
        client = client_for(simulator.api_url)
        client.send(sms(303))
        report = client.status(303)
        assert (report.outcome, report.extra["dest_status"], report.extra["status"]) == ("accepted", "8", "2")
    finally:
        simulator.stop()


def test_status_of_an_unknown_request_is_permanent(client):
    with pytest.raises(PermanentError, match="the provider has no request with this id"):
        client.status(404)


@pytest.mark.parametrize("overall, dest, outcome, reason", [
    ("4", "1", "delivered", ""),
    ("4", "2", "undelivered", "not delivered: unreachable, lifetime expired, or subscriber blocked"),
    ("4", "16", "undelivered", "provider error"),
    ("2", "0", "accepted", ""),
    ("2", "8", "accepted", ""),
    ("4", None, "accepted", ""),
    ("2", None, "accepted", ""),
])
def test_status_mapping(overall, dest, outcome, reason, canned):
    server = canned(seed_status(overall, dest))
    report = client_for(server.url).status(123456)
    assert (report.outcome, report.reason, report.reference) == (outcome, reason, 123456)
    body = server.received[0][3].decode("windows-1251")
    assert "<command>status</command>" in body and "<extended>1</extended>" in body and "<id>123456</id>" in body


def test_the_seeds_printed_status_answer_is_read(canned):
    report = client_for(canned(SEED_STATUS).url).status(123456)
    assert report.outcome == "delivered"
    assert report.extra == {"status": "0", "dest_status": "1", "time": "2007-03-12 23:24"}


def test_balance(canned, client, sim):
    assert client_for(canned(SEED_BALANCE).url).balance() == "1234"
    assert client.balance() == "1000"


# --- unreadable and hostile answers ----------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>
<response><result>OK</result><error>0</error><balance>&lol9;</balance></response>"""


def test_billion_laughs_is_refused_without_expansion(canned):
    started = time.monotonic()
    with pytest.raises(TransientError, match="DTD or entities; refused"):
        client_for(canned(BILLION_LAUGHS).url).balance()
    assert time.monotonic() - started < 2


def test_external_entity_is_refused_and_never_fetched(canned):
    bait = canned(b"<response><result>OK</result><error>0</error><balance>0</balance></response>")
    hostile = canned(f'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY ext SYSTEM "{bait.url}">]>\n'
                     f"<response><result>OK</result><error>0</error><balance>&ext;</balance></response>"
                     .encode())
    with pytest.raises(TransientError, match="refused"):
        client_for(hostile.url).balance()
    assert bait.received == []


@pytest.mark.parametrize("body", [
    b"<html><body>Bad Gateway</body></html>",
    b"",
    b"<response><result>OK</result",
    b"<response><result>ERROR</result></response>",
    b"<response><result>OK</result><error>x</error></response>",
    b"<response><result>OK</result><error>0</error><balance>" + b"9" * 70_000 + b"</balance></response>",
])
def test_unreadable_answers_are_transient(body, canned):
    with pytest.raises(TransientError, match="unreadable"):
        client_for(canned(body).url).send(sms())


def test_answer_for_another_request_id_is_transient(canned):
    with pytest.raises(TransientError, match="another request id"):
        client_for(canned(SEED_OK).url).send(sms(5))


def test_parse_answer_repairs_only_the_seeds_defects():
    answer = parse_answer(SEED_STATUS)
    assert answer.findtext("id") == "123456"
    assert [d.findtext("phone") for d in answer.iterfind("extended/dest")] == ["79039587454", "79236411579"]


# --- HTTP and network failures ---------------------------------------------------------------------

def test_http_503_is_transient():
    simulator = MobilgroupSimulator(password=PASSWORD, fail_rate=1.0).start()
    try:
        with pytest.raises(TransientError, match="HTTP 503"):
            client_for(simulator.api_url).send(sms())
        assert simulator.events("send") == []
    finally:
        simulator.stop()


def test_connection_refused_is_transient():
    port = free_port()
    with pytest.raises(TransientError, match="could not reach Mobilgroup"):
        client_for(f"http://127.0.0.1:{port}/extxml.php").send(sms())


def test_timeout_is_transient_and_bounded():
    simulator = MobilgroupSimulator(password=PASSWORD, latency_s=3.0).start()
    try:
        started = time.monotonic()
        with pytest.raises(TransientError, match="did not answer within 0.3 s"):
            client_for(simulator.api_url, timeout=0.3).send(sms())
        assert time.monotonic() - started < 2
    finally:
        simulator.stop()


@pytest.mark.parametrize("status, headers, error, words", [
    (302, {"Location": "https://sms.example/extxml.php"}, AccountError, "redirects .*https://sms.example"),
    (401, {}, AccountError, "refused access"),
    (403, {}, AccountError, "refused access"),
    (405, {}, AccountError, "SMS_MOBILGROUP_URL"),
    (429, {"Retry-After": "30"}, ThrottledError, "slow down"),
    (400, {}, TransientError, "HTTP 400"),
    (408, {}, TransientError, "HTTP 408"),
    (500, {}, TransientError, "HTTP 500"),
])
def test_http_statuses(status, headers, error, words, canned):
    server = canned(b"", status, headers)
    with pytest.raises(error, match=words) as caught:
        client_for(server.url).send(sms())
    assert type(caught.value) is error
    if status == 429:
        assert caught.value.retry_after == 30
    assert len(server.received) == 1


def test_wrong_path_is_an_account_error(sim):
    with pytest.raises(AccountError, match="HTTP 404"):
        client_for(sim.url + "/sms.php").send(sms())


# --- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"sender": "TooLongName"}, "sender"), ({"sender": "Магазин"}, "sender"), ({"sender": "a_b"}, "sender"),
    ({"valid_hours": 0}, "valid_hours"), ({"valid_hours": 49}, "valid_hours"),
    ({"unicode": "yes"}, "unicode"), ({"unicode_tag": "utf"}, "unicode_tag"),
    ({"user_id": "abc"}, "user_id"), ({"url": "ftp://x"}, "URL"), ({"password": ""}, "password"),
])
def test_bad_configuration_is_refused_at_construction(options, words):
    options = {"url": "http://127.0.0.1:9/extxml.php"} | options
    with pytest.raises(ValueError, match=words) as caught:
        client_for(options.pop("url"), **options)
    assert PASSWORD not in str(caught.value)


def test_password_stays_out_of_repr():
    client = client_for("http://127.0.0.1:9/extxml.php", sender="Shop 1", valid_hours=48)
    assert PASSWORD not in repr(client) and "pw" not in repr(client)


def test_a_session_passed_in_is_used_and_left_open(sim):
    with requests.Session() as session:
        client = client_for(sim.api_url, session=session)
        client.send(sms(401))
        client.close()
        with pytest.raises(AlreadySentUnconfirmed):
            client_for(sim.api_url, session=session).send(sms(401))
