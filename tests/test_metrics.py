"""The operator's figures (`smsctl metrics`, `smsctl status`) against what the database holds.

Rows are written as the workflow leaves them, in every state, with known times; the Prometheus text the
collector renders and the status screen must tell the same numbers a query of asterCC's table tells.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from sqlalchemy import text

from db import store
from settings import load_settings
from smsctl import metrics, overview, status
from workflow.throttle import make_throttle
from tests.conftest import REDIS_PREFIX, ROOT, app_env, wait_until

pytestmark = pytest.mark.integration

STATUS = {"waiting": "pending", "queued": "pending", "sending": "pending", "accepted": "success",
          "delivered": "success", "unconfirmed": "success", "failed": "failed", "error": "error"}


def add(db, row_id, provider, state, *, reason=None, due_ago=60, accepted_ago=None, updated_ago=0):
    """One asterCC row and its dispatch record, as the workflow leaves a row in `state`; times are seconds
    before the database's now."""
    with db.begin() as conn:
        conn.execute(text("INSERT INTO cc10_batchcontacts (id, batchcontact_archive_id, target, status, creby)"
                          " VALUES (:id, 0, '79160000000', :status, 'agent')"),
                     {"id": row_id, "status": STATUS[state] if provider else "failed"})
        conn.execute(text(
            "INSERT INTO sms_dispatch (batchcontact_id, claim_token, provider, state, wait_reason, attempts, parts,"
            " polls, resends, unknowns, failures, due_at, claimed_at, accepted_at, created_at, updated_at) VALUES"
            " (:id, 't', :provider, :state, :reason, 1, 1, 0, 0, 0, 0, NOW() - INTERVAL :due SECOND,"
            " NOW() - INTERVAL :due SECOND, IF(:acc IS NULL, NULL, NOW() - INTERVAL :acc SECOND),"
            " NOW() - INTERVAL :due SECOND, NOW() - INTERVAL :upd SECOND)"),
            {"id": row_id, "provider": provider, "state": state, "reason": reason, "due": due_ago,
             "acc": accepted_ago, "upd": updated_ago})


@pytest.fixture
def settings(mariadb_url, redis_url):
    return load_settings(database_url=mariadb_url, redis_url=redis_url, redis_prefix=REDIS_PREFIX,
                         default_provider="mobilgroup", routes="40=accolades", failover="mobilgroup:accolades",
                         mobilgroup_url="http://127.0.0.1:9/extxml.php", mobilgroup_user_id="1",
                         mobilgroup_user="demo", mobilgroup_password="demo", mobilgroup_rate=5,
                         accolades_url="http://127.0.0.1:9", accolades_account="1000", accolades_password="demo")


@pytest.fixture
def rows(db):
    n = iter(range(1, 1000))
    for _ in range(7):
        add(db, next(n), "accolades", "delivered", due_ago=600, accepted_ago=590, updated_ago=500)   # 10 s, 90 s
    for _ in range(3):
        add(db, next(n), "accolades", "accepted", due_ago=30, accepted_ago=28)                       # 2 s
    add(db, next(n), "accolades", "failed", due_ago=400, accepted_ago=100, updated_ago=40)           # 300 s, 60 s
    add(db, next(n), "accolades", "error", updated_ago=10)
    add(db, next(n), "accolades", "unconfirmed", due_ago=90_000, accepted_ago=89_000, updated_ago=5000)
    for reason, count in (("room", 4), ("retry", 2), ("unknown", 1)):
        for _ in range(count):
            add(db, next(n), "mobilgroup", "waiting", reason=reason, due_ago=120)
    add(db, next(n), "mobilgroup", "waiting", reason="paused", due_ago=900)
    add(db, next(n), "mobilgroup", "queued")
    add(db, next(n), "mobilgroup", "sending")
    add(db, next(n), None, "failed")   # an invalid number, refused before routing
    add(db, next(n), "mobilgroup", "delivered", due_ago=200 * 86_400, accepted_ago=200 * 86_400)  # past retention
    return db


def scrape(settings, db, throttle=None) -> dict:
    body = generate_latest(metrics.registry(settings, db, throttle)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_message_counts_equal_astercc_s_statuses_by_provider(settings, rows):
    seen = scrape(settings, rows)
    with rows.connect() as conn:
        expected = {(p or "none", status): n for p, status, n in conn.execute(text(
            "SELECT d.provider, b.status, COUNT(*) FROM cc10_batchcontacts b JOIN sms_dispatch d"
            " ON d.batchcontact_id = b.id WHERE d.due_at >= NOW() - INTERVAL 90 DAY GROUP BY d.provider, b.status"))}
    got = {(dict(labels)["provider"], dict(labels)["status"]): v
           for (name, labels), v in seen.items() if name == "sms_messages"}
    assert got == expected
    assert got[("accolades", "success")] == 11


def test_waiting_rows_availability_and_last_hour(settings, rows):
    seen = scrape(settings, rows)

    def value(name, **labels):
        return seen.get((name, tuple(sorted(labels.items()))))

    assert {dict(labels)["reason"]: v for (name, labels), v in seen.items()
            if name == "sms_waiting" and dict(labels)["provider"] == "mobilgroup"} == \
        {"room": 4, "retry": 2, "unknown": 1, "paused": 1, "queued": 1, "sending": 1}
    assert 899 <= value("sms_oldest_waiting_seconds", provider="mobilgroup") <= 905
    assert value("sms_provider_available", provider="mobilgroup") == 1
    assert value("sms_last_hour", provider="accolades", outcome="sent") == 11
    assert value("sms_last_hour", provider="accolades", outcome="failed") == 1
    assert value("sms_last_hour", provider="accolades", outcome="error") == 1
    assert value("sms_rate_limit", provider="mobilgroup") == 5

    store.trip_breaker(rows, "mobilgroup", 300, "unreachable: test")
    seen = scrape(settings, rows)
    assert seen[("sms_provider_available", (("provider", "mobilgroup"),))] == 0
    # Rows that were waiting for room wait for the circuit now: an operator must not look for in-flight room.
    assert {dict(labels)["reason"]: v for (name, labels), v in seen.items()
            if name == "sms_waiting" and dict(labels)["provider"] == "mobilgroup"} == \
        {"retry": 2, "unknown": 1, "paused": 5, "queued": 1, "sending": 1}
    assert store.waiting_summary(rows)["mobilgroup"] == {"retry": 2, "unknown": 1, "paused": 5, "queued": 1,
                                                         "sending": 1}


def test_delay_histograms_and_the_dispatch_tick(settings, rows):
    seen = scrape(settings, rows)

    def bucket(name, le):
        return seen[(name + "_bucket", (("le", le), ("provider", "accolades")))]

    # Sent in the last hour: 7 after 10 s, 3 after 2 s, 1 after 300 s.
    assert (bucket("sms_due_to_sent_seconds", "1"), bucket("sms_due_to_sent_seconds", "5"),
            bucket("sms_due_to_sent_seconds", "15"), bucket("sms_due_to_sent_seconds", "300"),
            bucket("sms_due_to_sent_seconds", "+Inf")) == (0, 3, 10, 11, 11)
    assert abs(seen[("sms_due_to_sent_seconds_gsum", (("provider", "accolades"),))] - (70 + 6 + 300)) <= 11
    # Reports of the last hour: 7 after 90 s, 1 (failed) after 60 s.
    assert (bucket("sms_report_delay_seconds", "60"), bucket("sms_report_delay_seconds", "300")) == (1, 8)
    assert ("sms_dispatch_last_success_timestamp_seconds", ()) not in seen

    store.stamp(rows, "dispatch_last_success")
    stamped = scrape(settings, rows)[("sms_dispatch_last_success_timestamp_seconds", ())]
    with rows.connect() as conn:
        offset = conn.scalar(text("SELECT UNIX_TIMESTAMP(NOW())"))
    assert abs(stamped - offset) <= 3


def test_the_throttled_count_comes_from_the_rate_limiter(settings, rows):
    throttle = make_throttle(settings)
    account = "mobilgroup:1"
    for _ in range(4):
        throttle.acquire(account, 1, max_wait_s=0)
    assert throttle.throttled_count(account) >= 3
    seen = scrape(settings, rows, throttle)
    assert seen[("sms_throttled_total", (("provider", "mobilgroup"),))] == throttle.throttled_count(account)


def test_status_shows_the_same_numbers_as_plain_lines_and_as_a_table(settings, rows, mariadb_url, redis_url):
    store.trip_breaker(rows, "mobilgroup", 300, "unreachable: connection refused")
    env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_ROUTES="40=accolades",
                  SMS_FAILOVER="mobilgroup:accolades", SMS_MOBILGROUP_URL="http://127.0.0.1:9/extxml.php",
                  SMS_MOBILGROUP_USER_ID="1", SMS_MOBILGROUP_USER="demo", SMS_MOBILGROUP_PASSWORD="demo",
                  SMS_MOBILGROUP_RATE=5, SMS_ACCOLADES_URL="http://127.0.0.1:9", SMS_ACCOLADES_ACCOUNT="1000",
                  SMS_ACCOLADES_PASSWORD="demo")
    shown = subprocess.run([sys.executable, "-m", "smsctl.cli", "status"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    lines = {line.split(":", 1)[0]: line for line in shown.splitlines()}
    assert lines["accolades"].startswith("accolades: available; last hour sent 11, failed 1, error 1; waiting: none")
    assert lines["mobilgroup"].startswith(
        "mobilgroup: unavailable: unreachable: connection refused (probe in ")
    # The circuit is open: the rows that waited for room wait for it (paused 1 + 4).
    assert "rows go to accolades; last hour sent 0, failed 0, error 0; waiting: queued 1, sending 1, " \
           "retry 2, unknown 1, paused 5; oldest waiting 15 min; rate 0.0 of 5/s (0%)" in lines["mobilgroup"]
    assert "\x1b[" not in shown, "no terminal codes when the output is not a terminal"

    console = Console(record=True, width=260)
    console.print(status.screen(overview.read(settings, rows)))
    screen = console.export_text()
    assert "unavailable: unreachable: connection refused" in screen
    assert "queued 1, sending 1, retry 2, unknown 1, paused 5" in screen
    assert "15 min" in screen


def test_status_watch_redraws_until_stopped(settings, rows, mariadb_url, redis_url, tmp_path):
    env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_USER_ID="1",
                  SMS_MOBILGROUP_USER="demo", SMS_MOBILGROUP_PASSWORD="demo")
    out = tmp_path / "status.txt"
    with open(out, "w") as sink:
        watch = subprocess.Popen([sys.executable, "-m", "smsctl.cli", "status", "--watch", "--interval", "0.3"],
                                 env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: out.read_text().count("read at") >= 2, 30, what="two screens")
            add(rows, 5000, "mobilgroup", "waiting", reason="retry")
            wait_until(lambda: "retry 3" in out.read_text(), 30, what="a screen with the new row")
        finally:
            watch.terminate()
            watch.wait(timeout=10)


def test_the_metrics_server_answers_beside_idle_connections_and_closes_them_at_its_deadline(settings, rows):
    """`smsctl metrics` serves through waitress with a deadline: 20 connections that send nothing hold no
    thread (scrapes are answered meanwhile) and are closed once the deadline has passed."""
    import socket
    import threading
    import time
    import urllib.request

    server = metrics.make_server(settings, "127.0.0.1", 0, deadline_s=3)
    stop = threading.Event()
    serving = threading.Thread(target=server.run_until, args=(stop,), daemon=True)
    serving.start()
    idle = [socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) for _ in range(20)]
    try:
        took = []
        for _ in range(3):
            began = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.effective_port}/metrics", timeout=10) as answer:
                body, kind = answer.read().decode(), answer.headers["Content-Type"]
            took.append(time.monotonic() - began)
        closed = []
        for sock in idle:  # the server closes each: recv then reads the end of the stream
            sock.settimeout(15)
            closed.append(sock.recv(1) == b"")
    finally:
        stop.set()
        serving.join(timeout=10)
        for sock in idle:
            sock.close()
    assert kind.startswith("text/plain") and "version=0.0.4" in kind
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    assert samples[("sms_messages", (("provider", "accolades"), ("status", "success")))] == 11
    assert max(took) < 5
    assert all(closed), "an idle connection outlived the deadline"
