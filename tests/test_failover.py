"""Failover between providers (`SMS_FAILOVER`), through real workers, beat, simulators and `smsctl metrics`.

What a call centre relies on: while its provider is unreachable, the messages still go out through the
other account it has, each once; when the provider is back, new messages go to it again; and a message
whose request may already have reached the first provider is never sent through a second one.
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from db import store
from settings import ConfigError, load_settings
from simulators.accolades import AccoladesSimulator
from simulators.mobilgroup import MobilgroupSimulator
import workflow
from providers import registry
from workflow.runtime import Runtime
from tests.conftest import (REDIS_PREFIX, ROOT, app_env, free_port, insert_rows, rows_by_id, started,
                            wait_until)

pytestmark = pytest.mark.integration

FAST = dict(SMS_DISPATCH_INTERVAL_S=1, SMS_RETRY_BASE_S=0.2, SMS_RETRY_MAX_S=1, SMS_MOBILGROUP_RATE=200,
            SMS_ACCOLADES_RATE=200, SMS_MOBILGROUP_IDENTICAL_S=1, SMS_ACCOLADES_IDENTICAL_S=1)


def number(i: int) -> str:
    return f"+7 (916) {100 + i // 10_000:03d}-{(i // 100) % 100:02d}-{50 + i % 40:02d}"


def provider_env(db_url, broker, mobilgroup_url: str, accolades: AccoladesSimulator, **extra):
    return app_env(db_url, broker, SMS_MOBILGROUP_URL=mobilgroup_url, SMS_MOBILGROUP_USER_ID="1",
                   SMS_MOBILGROUP_USER="demo", SMS_MOBILGROUP_PASSWORD="demo", SMS_ACCOLADES_URL=accolades.url,
                   SMS_ACCOLADES_ACCOUNT=accolades.account, SMS_ACCOLADES_PASSWORD=accolades.password,
                   **{**FAST, **extra})


class Metrics:
    """`smsctl metrics` in a process of its own, scraped over HTTP."""

    def __init__(self, env, log_path):
        self.port = free_port()
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "smsctl.cli", "metrics", "--port", str(self.port)],
                                     env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._answers, 30, what="smsctl metrics to answer")

    def _answers(self):
        try:
            return self.scrape() is not None
        except OSError:
            return False

    def scrape(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as answer:
            body = answer.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    def value(self, name: str, **labels) -> float | None:
        return self.scrape().get((name, tuple(sorted(labels.items()))))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def metrics_process(tmp_path):
    started_ = []

    def start(env):
        started_.append(Metrics(env, tmp_path / f"metrics-{len(started_)}.log"))
        return started_[-1]

    yield start
    for m in started_:
        m.stop()


def success_count(db, provider: str) -> int:
    with db.connect() as conn:
        return conn.scalar(text("SELECT COUNT(*) FROM cc10_batchcontacts b JOIN sms_dispatch d"
                                " ON d.batchcontact_id = b.id WHERE d.provider = :p AND b.status = 'success'"),
                           {"p": provider})


def test_an_unreachable_provider_s_rows_go_through_the_fallback_and_new_rows_return_to_it(
        db, mariadb_url, redis_url, celery, metrics_process):
    port = free_port()  # nothing listens here until the Mobilgroup simulator starts on it
    accolades = AccoladesSimulator()
    with started(accolades):
        env = provider_env(mariadb_url, redis_url, f"http://127.0.0.1:{port}/extxml.php", accolades,
                           SMS_DEFAULT_PROVIDER="mobilgroup", SMS_FAILOVER="mobilgroup:accolades",
                           SMS_FAILOVER_AFTER_S=3, SMS_ACCOUNT_RETRY_S=600, SMS_UNREACHABLE_RETRY_S=5)
        ids = insert_rows(db, [(number(i), f"Your order {i} is ready.") for i in range(100)])
        began = time.monotonic()
        worker = celery("worker", env, "-c", "4")
        celery("beat", env)
        metrics = metrics_process(env)

        def all_success():
            rows = rows_by_id(db)
            return all(rows[i]["status"] == "success" for i in ids) and rows

        rows = wait_until(all_success, 90, what="every row to be sent through Accolades")
        took = time.monotonic() - began
        assert {rows[i]["provider"] for i in ids} == {"accolades"}
        sends = Counter(int(e["id"]) for e in accolades.events("send"))
        assert set(sends) == set(ids) and max(sends.values()) == 1, "a message was sent twice"
        with db.connect() as conn:
            routed = set(conn.scalars(text("SELECT DISTINCT routed_provider FROM sms_dispatch")))
        assert routed == {"mobilgroup"}
        assert metrics.value("sms_provider_available", provider="mobilgroup") == 0
        assert metrics.value("sms_provider_available", provider="accolades") == 1
        assert metrics.value("sms_messages", provider="accolades", status="success") == success_count(db, "accolades")
        print(f"100 rows sent through Accolades {took:.0f} s after the workers started")

        mobilgroup = MobilgroupSimulator(port=port)
        with started(mobilgroup):
            back_at = time.monotonic()
            trickle = []

            def mobilgroup_took_one():
                trickle.extend(insert_rows(db, [(number(200 + len(trickle)), "Reminder")]))
                return [e for e in mobilgroup.events("send") if e["outcome"] == "accepted"]

            # Probed every SMS_UNREACHABLE_RETRY_S (5 s), not every SMS_ACCOUNT_RETRY_S (600 s).
            wait_until(mobilgroup_took_one, 30, interval_s=2, what="a probe to reach Mobilgroup again")
            wait_until(lambda: metrics.value("sms_provider_available", provider="mobilgroup") == 1, 10,
                       what="Mobilgroup to show available")
            later = insert_rows(db, [(number(300 + i), f"Code {i}") for i in range(20)])

            def later_done():
                rows = rows_by_id(db)
                return all(rows[i]["status"] == "success" for i in later) and rows

            rows = wait_until(later_done, 60 - (time.monotonic() - back_at), what="new rows to go to Mobilgroup")
            print(f"new rows back at Mobilgroup {time.monotonic() - back_at:.0f} s after it listened again")
        assert {rows[i]["provider"] for i in later} == {"mobilgroup"}
        assert {int(e["id"]) for e in mobilgroup.events("send")} >= set(later)
        assert not {int(e["id"]) for e in accolades.events("send")} & set(later)
        assert metrics.value("sms_messages", provider="accolades", status="success") == success_count(db, "accolades")
        assert metrics.value("sms_messages", provider="mobilgroup", status="success") == \
            success_count(db, "mobilgroup")
    log = worker.log()
    assert "ALERT: mobilgroup unavailable: every send failed for 3 s" in log
    assert "one probe tests it every 5 s (SMS_UNREACHABLE_RETRY_S)" in log
    assert "ALERT: mobilgroup unavailable (unreachable: " in log and "its waiting rows go through accolades" in log
    assert "ALERT: mobilgroup works again (the probe went through)" in log


def test_a_row_whose_request_timed_out_at_a_provider_that_cannot_tell_is_not_sent_through_the_fallback(
        db, mariadb_url, redis_url, celery):
    accolades = AccoladesSimulator(latency_s=3)  # answers after the client gave up: it has the message
    mobilgroup = MobilgroupSimulator()
    with started(accolades), started(mobilgroup):
        env = provider_env(mariadb_url, redis_url, mobilgroup.api_url, accolades, SMS_DEFAULT_PROVIDER="accolades",
                           SMS_FAILOVER="accolades:mobilgroup", SMS_DEFAULT_REGION="RO", SMS_HTTP_TIMEOUT_S=1,
                           SMS_FAILOVER_AFTER_S=2, SMS_ACCOUNT_RETRY_S=600, SMS_ACCOLADES_ON_UNKNOWN="resend")
        [doubt] = insert_rows(db, [("+40 721 555 111", "Your code is 1234")])
        celery("worker", env, "-c", "4")
        celery("beat", env)

        def circuit_open():
            with db.connect() as conn:
                return conn.scalar(text("SELECT state FROM sms_breaker WHERE provider = 'accolades'")) == "open"

        wait_until(circuit_open, 60, what="Accolades to count as unavailable")
        fresh = insert_rows(db, [(f"+40 721 555 2{i:02d}", f"Code {i}") for i in range(10)])

        def fresh_done():
            rows = rows_by_id(db)
            return all(rows[i]["status"] == "success" for i in fresh) and rows

        rows = wait_until(fresh_done, 60, what="new rows to go through Mobilgroup")
        time.sleep(3)  # a few more ticks, in which the row in doubt must stay where it is
        rows = rows_by_id(db)

    assert {rows[i]["provider"] for i in fresh} == {"mobilgroup"}
    assert rows[doubt]["provider"] == "accolades" and rows[doubt]["state"] == "waiting"
    assert rows[doubt]["status"] == "pending"
    assert int(doubt) not in {int(e["id"]) for e in mobilgroup.events("send")}
    assert any(e["phone"] == "40721555111" for e in accolades.events("send")), \
        "the slow Accolades should have taken the first request (that is why it must not go elsewhere)"


def test_a_row_in_doubt_moves_once_mobilgroup_confirms_it_never_got_it_and_is_sent_once_it_confirms_it_has_it(
        db, mariadb_url, redis_url):
    mobilgroup = MobilgroupSimulator()
    accolades = AccoladesSimulator()
    with started(mobilgroup), started(accolades):
        settings = load_settings(
            database_url=mariadb_url, redis_url=redis_url, redis_prefix=REDIS_PREFIX, default_provider="mobilgroup",
            failover="mobilgroup:accolades", mobilgroup_url=mobilgroup.api_url, mobilgroup_user_id="1",
            mobilgroup_user="demo", mobilgroup_password="demo", accolades_url=accolades.url,
            accolades_account=accolades.account, accolades_password=accolades.password)
        # Two dispatching processes, each with its own memory: what one learnt must hold for the other.
        first, second = Runtime(settings), Runtime(settings)
        never, arrived, others = insert_rows(db, [(number(1), "One"), (number(2), "Two"), (number(3), "Three")])
        workflow.dispatch_due(first, lambda ids, provider: None)
        # All three sends' answers were lost; the second had reached Mobilgroup; the third's id is held by
        # another sender on the account, for another number (so ours, had it arrived, was refused).
        def hold(row, phone):
            reference = str(registry.entry("mobilgroup").reference(settings, row, 0))
            mobilgroup.requests[reference] = {"phones": [phone], "accepted": time.time(), "due": None}
            return reference
        arrived_ref = hold(arrived, "79161000052")
        hold(others, "79990000000")
        with db.begin() as conn:
            conn.execute(text("UPDATE sms_dispatch SET state = 'waiting', wait_reason = 'unknown', unknowns = 1,"
                              " updated_at = UTC_TIMESTAMP() - INTERVAL 2 MINUTE"))  # answers long given up on
        store.trip_breaker(db, "mobilgroup", 600, "unreachable: test")
        moved = workflow.fail_over(first, "mobilgroup", store.breaker_states(db))
        moved += workflow.fail_over(second, "mobilgroup", store.breaker_states(db))
        rows = rows_by_id(db)
        asked = Counter(e["id"] for e in mobilgroup.events("status"))

    assert moved == 2
    assert rows[never]["provider"] == rows[others]["provider"] == "accolades"
    assert rows[arrived]["provider"] == "mobilgroup", "a row Mobilgroup has must never go elsewhere"
    assert (rows[arrived]["state"], rows[arrived]["status"]) == ("accepted", "success"), \
        "Mobilgroup has the message: it was sent, and waits for nothing"
    assert asked[arrived_ref] == 1, "one answer serves every process: Mobilgroup is asked about a row once"
    assert not mobilgroup.events("send")


def test_failover_routes_are_checked_at_start_up_and_their_fallbacks_need_credentials():
    with pytest.raises(ConfigError, match="SMS_FAILOVER: .*'mobilgroup:nowhere' must look like PROVIDER:FALLBACK"):
        load_settings(failover="mobilgroup:nowhere")
    with pytest.raises(ConfigError, match="SMS_FAILOVER: .*mobilgroup has two failover routes"):
        load_settings(failover="mobilgroup:accolades,mobilgroup:ozeki")
    settings = load_settings(default_provider="mobilgroup", failover="mobilgroup:accolades,accolades:ozeki",
                             mobilgroup_user_id="1", mobilgroup_user="u", mobilgroup_password="p")
    assert settings.failover_table == {"mobilgroup": ["accolades"], "accolades": ["ozeki"]}
    assert settings.providers_in_use == {"mobilgroup", "accolades", "ozeki"}
    with pytest.raises(ConfigError, match="SMS_ACCOLADES_ACCOUNT"):
        settings.require_sending()
