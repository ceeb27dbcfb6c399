"""The Mobilgroup simulator as a stand-in users stage against: it takes the seed's own requests and answers
the way the seed prints answers, over real sockets."""
from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests

from simulators.mobilgroup import API_PATH, MobilgroupSimulator
from tests.conftest import free_port

HEAD = '<?xml version="1.0" encoding="windows-1251"?>\n<request>\n'
ACCOUNT = "<user_id>1</user_id>\n<user>valid@username</user>\n<pwd>invalid_password</pwd>\n"

# The seed's sample send request, verbatim (its `</ id>` included).
SEED_SEND = HEAD + ACCOUNT + """<command>send</command>
<phone>79039587454,79236411579</phone>
<sender>Mobilgrup</sender>
<message>test sms message</message>
<translit>1</translit>
<schedule>2007-03-12 23:22</schedule>
<valid>24</valid>
<id>123456</ id>
</request>"""

SEED_ERROR_4 = (b'<?xml version="1.0" encoding="windows-1251"?>\n<response>\n<result>ERROR</result>\n'
                b'<error>4</error>\n<id>123456</ id>\n</response >\n')


@pytest.fixture
def sim():
    simulator = MobilgroupSimulator(user="valid@username", password="invalid_password").start()
    yield simulator
    simulator.stop()


def post(sim, xml: str, path: str = API_PATH) -> requests.Response:
    return requests.post(sim.url + path, data=xml.encode("windows-1251", "xmlcharrefreplace"), timeout=5,
                         headers={"Content-Type": "application/xml"})


def command(name: str, **fields: str) -> str:
    return HEAD + ACCOUNT + f"<command>{name}</command>\n" + "".join(
        f"<{tag}>{value}</{tag}>\n" for tag, value in fields.items()) + "</request>"


def send(phone="79039587454", message="hello", id="1", **more) -> str:  # noqa: A002 - the seed's name
    return command("send", phone=phone, message=message, id=id, **more)


def error_of(response: requests.Response) -> int:
    text = response.content.decode("windows-1251")
    return int(text.split("<error>")[1].split("</error>")[0])


def test_the_seeds_sample_requests_work_and_answers_keep_the_seeds_layout(sim):
    sent = post(sim, SEED_SEND)
    assert sent.status_code == 200 and sent.headers["Content-Type"].startswith("application/xml")
    assert sent.content == SEED_ERROR_4.replace(b"ERROR", b"OK").replace(b"<error>4", b"<error>0")
    status = post(sim, command("status", extended="1", id="123456")).content.decode("windows-1251")
    assert status.startswith('<?xml version="1.0" encoding="windows-1251"?>\n<response>\n<result>OK</result>\n')
    assert "<status>4 </status>" in status and status.endswith("<id>123456</ id>\n</response >\n")
    assert re.search(r"<dest><phone>79039587454</phone><time>\d{4}-\d\d-\d\d  \n\d\d:\d\d</time>"
                     r"<status>1</status></dest>", status)
    assert "<phone>79236411579</phone>" in status
    [event] = sim.events("send")
    assert (event["id"], event["unicode"], event["sender"], event["valid"], event["outcome"]) == (
        "123456", "1", "Mobilgrup", "24", "accepted")


def test_wrong_password_is_answered_exactly_as_the_seed_prints_it(sim):
    assert post(sim, SEED_SEND.replace("invalid_password", "nope")).content == SEED_ERROR_4


@pytest.mark.parametrize("xml, code", [
    ("not xml at all", 1),
    ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "b">]><request>&a;</request>', 1),
    ("<answer/>", 1),
    (SEED_SEND.replace("<user_id>1<", "<user_id>2<"), 3),
    (SEED_SEND.replace("valid@username", "someone"), 4),
    (command("fly"), 6),
    (command("send", phone="79039587454", message="hi"), 2),
    (send(id="A-1"), 2),
    (send(valid="49"), 2),
    (send(message="   "), 2),
    (send(phone="+79039587454"), 8),
    (send(phone="7903 958"), 8),
    (send(message="ж" * 65, rus_sms="1"), 10),
    (send(message="ж" * 141), 10),
    (send(schedule="12.03.2007 23:22"), 11),
    (send(schedule="2007-13-40 25:61"), 11),
    (command("status", id="999"), 12),
])
def test_error_codes(xml, code, sim):
    answer = post(sim, xml)
    assert answer.status_code == 200
    assert error_of(answer) == code
    assert b"<result>ERROR</result>" in answer.content
    assert sim.requests == {}
    assert sim.events()[-1]["outcome"] == f"error {code}"


def test_length_limits_per_flag_under_either_tag(sim):
    for reference, tag, text in ((1, "rus_sms", "ж" * 64), (2, "translit", "ж" * 64), (3, "rus_sms", "ж" * 140)):
        flag = "0" if len(text) > 64 else "1"
        assert error_of(post(sim, send(id=str(reference), message=text, **{tag: flag}))) == 0
    assert [e["unicode"] for e in sim.events("send")] == ["1", "1", "0"]


def test_cyrillic_in_windows_1251_is_decoded(sim):
    post(sim, send(message="Привет, мир"))
    assert sim.events("send")[0]["message"] == "Привет, мир"


def test_a_repeated_id_is_error_7_and_not_delivered_twice(sim):
    assert error_of(post(sim, send(id="5"))) == 0
    assert error_of(post(sim, send(id="5", message="other"))) == 7
    assert [e["outcome"] for e in sim.events("send")] == ["accepted", "duplicate"]
    assert list(sim.requests) == ["5"]


def test_statuses_per_recipient():
    simulator = MobilgroupSimulator(user="valid@username", password="invalid_password",
                                    undeliverable_suffix="99").start()
    try:
        post(simulator, send(phone="79030000001,79030000099", id="8"))
        status = post(simulator, command("status", id="8", extended="1")).text
        assert "<status>1</status>" in status and "<status>2</status>" in status
        brief = post(simulator, command("status", id="8")).text
        assert "<status>4 </status>" in brief and "<dest>" not in brief
        assert simulator.events("status")[0]["statuses"] == [1, 2]
    finally:
        simulator.stop()


def test_pending_and_scheduled_messages_are_not_final_yet():
    simulator = MobilgroupSimulator(user="valid@username", password="invalid_password", pending_s=0.3).start()
    later = (datetime.now() + timedelta(hours=2)).strftime("%Y-%m-%d %H:%M")
    try:
        post(simulator, send(id="1"))
        post(simulator, send(id="2", schedule=later))
        assert simulator.events("send")[-1]["outcome"] == "accepted"
        first = post(simulator, command("status", id="1", extended="1")).text
        assert "<status>2 </status>" in first and "<status>8</status>" in first
        time.sleep(0.4)
        assert "<status>1</status>" in post(simulator, command("status", id="1", extended="1")).text
        assert "<status>0</status>" in post(simulator, command("status", id="2", extended="1")).text
    finally:
        simulator.stop()


def test_balance_is_charged_per_recipient_and_error_9_when_short():
    simulator = MobilgroupSimulator(user="valid@username", password="invalid_password", balance=3,
                                    price=1).start()
    try:
        assert error_of(post(simulator, send(phone="79030000001,79030000002", id="1"))) == 0
        assert "<balance>1</balance>" in post(simulator, command("balance")).text
        assert error_of(post(simulator, send(phone="79030000001,79030000002", id="2"))) == 9
        assert list(simulator.requests) == ["1"]
    finally:
        simulator.stop()


def test_paths_and_methods(sim):
    assert error_of(post(sim, command("balance"), path="/")) == 0
    assert error_of(post(sim, command("balance"), path="/sms/extxml.php")) == 0
    assert post(sim, command("balance"), path="/other.php").status_code == 404
    assert requests.get(sim.api_url, timeout=5).status_code == 405


def test_journal_over_http_and_503_faults():
    simulator = MobilgroupSimulator(user="valid@username", password="invalid_password", fail_rate=1.0).start()
    try:
        assert post(simulator, send()).status_code == 503
        journal = requests.get(simulator.url + "/_sim/journal", timeout=5).json()
        assert [(e["kind"], e["status"]) for e in journal] == [("fault", 503)]
    finally:
        simulator.stop()


def test_serve_runs_in_the_foreground_until_interrupted(unused_port):
    process = subprocess.Popen(
        [sys.executable, "-c", "from simulators.mobilgroup import serve; "
                               f"serve(port={unused_port}, user_id='7', user='u', password='p')"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([process.stdout], [], [], 10)[0], "the simulator printed no banner"
        assert f"127.0.0.1:{unused_port}{API_PATH}" in process.stdout.readline()
        balance = HEAD + "<user_id>7</user_id><user>u</user><pwd>p</pwd><command>balance</command></request>"
        answer = requests.post(f"http://127.0.0.1:{unused_port}{API_PATH}", data=balance.encode(), timeout=5)
        assert b"<result>OK</result>" in answer.content
    finally:
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=10)
        process.stdout.close()
    assert returncode == 0


@pytest.fixture
def unused_port() -> int:
    return free_port()
