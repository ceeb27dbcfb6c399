"""The delivery-report app on a real socket (waitress, as `smsctl webhooks` serves it), applying reports
with the real `apply_report` to asterCC's tables and ours in MariaDB: signed URLs, refusals that change
nothing (forged, altered, expired, retired keys, another row's, another provider's, malformed, unknown row,
methods the provider does not use, oversized requests: one table), text stored without markup, duplicates
and reordered reports that change nothing, and the simulators calling the app back until every message is
final."""
from __future__ import annotations

import base64
import socket
import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests
from itsdangerous import TimestampSigner, URLSafeSerializer, URLSafeTimedSerializer
from sqlalchemy import insert, select, update

from db.models import BatchContact, BatchContactArchive, Dispatch, DispatchState
from providers.accolades import AccoladesClient
from providers.base import OutgoingMessage
from providers.ozeki import OzekiClient
from settings import ConfigError, load_settings
from simulators.accolades import AccoladesSimulator
from simulators.ozeki import OzekiSimulator
from workflow.callbacks import BadToken, callback_url, verify_token
from tests.conftest import free_port, wait_until
from webhooks.app import CONNECTION_DEADLINE_S, create_app, make_server

SECRET = "test-webhook-secret-0123456789abcdef"
OLD_KEY = "the-key-before-the-last-rotation-0123456789"
RETIRED_KEY = "a-key-dropped-from-the-list-0123456789abcdef"
NUMBER = "40722555666"


# --- fixtures: the app on a real port, over conftest's test database --------------------------------

class Served:
    """The app served by waitress on 127.0.0.1, as `smsctl webhooks` serves it, from a thread."""

    def __init__(self, app, deadline_s: float = CONNECTION_DEADLINE_S):
        self.server = make_server(app, "127.0.0.1", 0, deadline_s=deadline_s)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self.server.run_until, args=(self._stopping,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def served(mariadb_url):
    """The app with two keys: ours signs, the one before the last rotation still verifies."""
    placeholder = load_settings(database_url=mariadb_url, webhook_secret=f"{SECRET},{OLD_KEY}")
    served = Served(create_app(placeholder))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def settings(mariadb_url, served):
    """The settings the senders use: the public URL is where the test app listens."""
    return load_settings(database_url=mariadb_url, webhook_secret=SECRET, public_url=served.url + "/")


def insert_accepted(engine, provider: str, recipient: str = NUMBER) -> int:
    """An asterCC row that a provider accepted (asterCC `success`), with its dispatch record."""
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content="Hello"))
        row = conn.execute(insert(BatchContact).values(
            batchcontact_archive_id=archive.inserted_primary_key[0], target=recipient, status="success",
            schedulertime=now, contacttime=now, created=now, creby="test", error_msg="", responsenote=""))
        row_id = row.inserted_primary_key[0]
        conn.execute(insert(Dispatch).values(
            batchcontact_id=row_id, claim_token=uuid.uuid4().hex, provider=provider, recipient=recipient,
            state=DispatchState.ACCEPTED, attempts=1, parts=1, accepted_at=now, created_at=now,
            updated_at=now))
    return row_id


def insert_unknown(engine) -> int:
    """An asterCC row with no dispatch record of ours."""
    with engine.begin() as conn:
        return conn.execute(insert(BatchContact).values(
            target=NUMBER, status="new", error_msg="", responsenote="")).inserted_primary_key[0]


def state(engine, row_id: int) -> tuple:
    """What a report may change: asterCC's status and error_msg, our dispatch state and last error."""
    with engine.connect() as conn:
        row = conn.execute(select(BatchContact.status, BatchContact.error_msg)
                           .where(BatchContact.id == row_id)).one()
        dispatch = conn.execute(select(Dispatch.state, Dispatch.last_error)
                                .where(Dispatch.batchcontact_id == row_id)).one_or_none()
    return (row.status, row.error_msg) + (tuple(dispatch) if dispatch else (None, None))


def url_for(settings, provider: str, row_id: int, resends: int = 0, attempt: int = 1) -> str:
    return callback_url(settings, provider, row_id, resends, attempt=attempt)


def accolades_report(row_id: int | str, status: str = "sent", **extra) -> dict:
    fields = {"apiName": "sms", "type": "deliveryReport", "status": status, "id": str(row_id)}
    fields.update(extra)
    return fields


# --- tokens ---------------------------------------------------------------------------------------

def test_callback_url_is_none_without_public_url_or_secret(mariadb_url):
    assert callback_url(load_settings(database_url=mariadb_url, webhook_secret=SECRET), "ozeki", 1, 0,
                        attempt=1) is None
    assert callback_url(load_settings(public_url="https://h.example"), "ozeki", 1, 0, attempt=1) is None


def test_token_round_trip_and_binding(settings):
    url = url_for(settings, "accolades", 123, resends=2)
    assert url.startswith(settings.public_url.rstrip("/") + "/reports/accolades/")
    token = url.rsplit("/", 1)[1]
    assert verify_token(settings, "accolades", token) == (123, 2, 1)
    with pytest.raises(BadToken):
        verify_token(settings, "ozeki", token)
    other_key = load_settings(webhook_secret="another-secret-entirely-0123456789")
    with pytest.raises(BadToken):
        verify_token(other_key, "accolades", token)


def test_the_app_will_not_start_without_a_secret(mariadb_url):
    with pytest.raises(ConfigError, match="SMS_WEBHOOK_SECRET"):
        create_app(load_settings(database_url=mariadb_url))


# --- applying reports -----------------------------------------------------------------------------

def test_accolades_sent_keeps_success_and_finishes_the_dispatch(settings, served, db):
    row = insert_accepted(db, "accolades")
    answer = requests.post(url_for(settings, "accolades", row), data=accolades_report(row), timeout=5)
    assert (answer.status_code, answer.text.strip()) == (200, "applied")
    assert state(db, row) == ("success", "", DispatchState.DELIVERED, None)


def test_accolades_error_sets_failed_with_the_reason(settings, served, db):
    row = insert_accepted(db, "accolades")
    answer = requests.post(url_for(settings, "accolades", row), timeout=5,
                           data=accolades_report(row, "error", errorMessage="Number not in service"))
    assert answer.status_code == 200
    status, error_msg, dispatch_state, _ = state(db, row)
    assert (status, dispatch_state) == ("failed", DispatchState.FAILED)
    assert error_msg == "Accolades could not send the message: Number not in service"


def test_ozeki_reports_by_post_and_by_get(settings, served, db):
    delivered, undelivered = insert_accepted(db, "ozeki"), insert_accepted(db, "ozeki")
    one = requests.post(url_for(settings, "ozeki", delivered), timeout=5, data={
        "NotificationName": "SMSDeliveryReport", "SmsId": "id-1", "Delivered": "True"})
    two = requests.get(url_for(settings, "ozeki", undelivered), timeout=5, params={
        "NotificationName": "SMSDeliveryReport", "SmsId": "id-2", "Delivered": "False",
        "DeliveryStatus": "Undelivered"})
    assert (one.status_code, two.status_code) == (200, 200)
    assert state(db, delivered)[0::2] == ("success", DispatchState.DELIVERED)
    assert state(db, undelivered) == ("failed", "Ozeki reported the message undelivered (Undelivered)",
                                          DispatchState.FAILED,
                                          "Ozeki reported the message undelivered (Undelivered)")


def test_accolades_reports_by_get_and_by_post_and_head_is_refused(settings, served, db):
    by_get, by_post, by_head = (insert_accepted(db, "accolades") for _ in range(3))
    got = requests.get(url_for(settings, "accolades", by_get), params=accolades_report(by_get, "error",
                       errorMessage="absent"), timeout=5)
    posted = requests.post(url_for(settings, "accolades", by_post), data=accolades_report(by_post), timeout=5)
    head = requests.head(url_for(settings, "accolades", by_head), params=accolades_report(by_head), timeout=5)
    assert (got.status_code, posted.status_code, head.status_code) == (200, 200, 405)
    assert head.headers["Allow"] == "GET, POST"
    assert state(db, by_get)[:3] == ("failed", "Accolades could not send the message: absent",
                                     DispatchState.FAILED)
    assert state(db, by_post) == ("success", "", DispatchState.DELIVERED, None)
    assert state(db, by_head) == ("success", "", DispatchState.ACCEPTED, None)


def with_sms_id(engine, row_id: int, sms_id: str) -> int:
    """The id Ozeki's answer gave the row at sending, as the workflow records it."""
    with engine.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id).values(provider_message_id=sms_id))
    return row_id


def test_ozeki_s_documented_report_is_matched_by_its_sms_id_as_well_as_the_token(settings, served, db):
    ours = with_sms_id(db, insert_accepted(db, "ozeki"), "7d678b16-0e81-4a05-805b-851e4794495e")
    other = with_sms_id(db, insert_accepted(db, "ozeki"), "6b5c6978-0cd6-4a58-86fc-3d1b279b9201")
    report = {"NotificationName": "SMSDeliveryReport", "Delivered": "False", "DeliveryStatus": "Undelivered"}
    elsewhere = requests.post(url_for(settings, "ozeki", other), timeout=5,
                              data={**report, "SmsId": "7d678b16-0e81-4a05-805b-851e4794495e"})
    assert elsewhere.status_code == 404 and state(db, other) == UNCHANGED
    applied = requests.post(url_for(settings, "ozeki", ours), timeout=5,
                            data={**report, "SmsId": "7d678b16-0e81-4a05-805b-851e4794495e"})
    assert (applied.status_code, applied.text.strip()) == (200, "applied")
    assert state(db, ours)[0::2] == ("failed", DispatchState.FAILED)


def test_every_ozeki_request_carries_both_spellings_of_the_report_url(settings):
    simulator = OzekiSimulator(username="u", password="pw", report_delay_s=3600).start()
    client = OzekiClient(url=simulator.api_url, username="u", password="pw", timeout=5)
    try:
        callback = url_for(settings, "ozeki", 1)
        client.send(OutgoingMessage(reference=1, recipient=NUMBER, text="Hi", callback_url=callback))
    finally:
        client.close()
        simulator.stop()
    (sent,) = simulator.events("send")
    assert sent["report_url_params"] == ["DelivaryReportURL", "DeliveryReportURL"]
    assert sent["callback"] == callback


def test_unknown_report_fields_are_logged_once_per_provider_by_name_only(mariadb_url, settings, db, caplog):
    served = Served(create_app(load_settings(database_url=mariadb_url, webhook_secret=SECRET)))
    rows = [insert_accepted(db, "ozeki") for _ in range(2)] + [insert_accepted(db, "accolades")]
    report = {"NotificationName": "SMSDeliveryReport", "SmsId": "s-9", "Delivered": "True",
              "OperatorCode": "secret-value-1", "Price": "0.05"}
    try:
        with caplog.at_level(logging.INFO, logger="webhooks.app"):
            for row in rows[:2]:
                answer = requests.post(served.url + "/reports/ozeki/" + url_for(settings, "ozeki", row)
                                       .rsplit("/", 1)[1], data=report, timeout=5)
                assert answer.status_code == 200
            answer = requests.get(served.url + "/reports/accolades/" + url_for(settings, "accolades", rows[2])
                                  .rsplit("/", 1)[1], params=accolades_report(rows[2], "sent", Cost="1"), timeout=5)
            assert answer.status_code == 200
    finally:
        served.stop()
    said = [r.getMessage() for r in caplog.records if "do not read" in r.getMessage()]
    assert said == ["ozeki report carries fields we do not read: OperatorCode, Price",
                    "accolades report carries fields we do not read: Cost"]
    assert not any("secret-value-1" in r.getMessage() for r in caplog.records)


def test_duplicate_report_changes_nothing_the_second_time(settings, served, db):
    row = insert_accepted(db, "accolades")
    url = url_for(settings, "accolades", row)
    first = requests.post(url, data=accolades_report(row, "error", errorMessage="absent"), timeout=5)
    after_first = state(db, row)
    second = requests.post(url, data=accolades_report(row, "error", errorMessage="absent"), timeout=5)
    assert (first.text.strip(), second.status_code, second.text.strip()) == ("applied", 200, "duplicate")
    assert state(db, row) == after_first


def test_a_late_contrary_final_report_never_overwrites_a_final_status(settings, served, db):
    row = insert_accepted(db, "accolades")
    url = url_for(settings, "accolades", row)
    requests.post(url, data=accolades_report(row, "sent"), timeout=5)
    late = requests.post(url, data=accolades_report(row, "error", errorMessage="late"), timeout=5)
    assert (late.status_code, late.text.strip()) == (200, "stale")
    assert state(db, row) == ("success", "", DispatchState.DELIVERED, None)


def test_an_older_accepted_report_after_the_final_one_changes_nothing(settings, served, db):
    row = insert_accepted(db, "ozeki")
    url = url_for(settings, "ozeki", row)
    final = requests.post(url, data={"SmsId": "s-1", "Delivered": "False", "DeliveryStatus": "Expired"},
                          timeout=5)
    after_final = state(db, row)
    older = requests.post(url, data={"SmsId": "s-1", "DeliveryStatus": "Enroute"}, timeout=5)
    assert (final.status_code, older.status_code, older.text.strip()) == (200, 200, "stale")
    assert state(db, row) == after_final == ("failed", "Ozeki reported the message undelivered (Expired)",
                                                 DispatchState.FAILED,
                                                 "Ozeki reported the message undelivered (Expired)")


def test_an_accepted_report_before_the_final_one_changes_nothing(settings, served, db):
    row = insert_accepted(db, "ozeki")
    answer = requests.post(url_for(settings, "ozeki", row), data={"SmsId": "s", "Status": "Sent"}, timeout=5)
    assert answer.status_code == 200
    assert state(db, row) == ("success", "", DispatchState.ACCEPTED, None)


def resend(engine, row_id: int) -> None:
    """What an operator's resend leaves behind once the new send is accepted: the row's next send."""
    with engine.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                     .values(resends=Dispatch.resends + 1, state=DispatchState.ACCEPTED))


def test_a_report_about_the_send_before_an_operator_s_resend_changes_nothing(settings, served, db):
    """The first send's report can come after the operator sent the row again (a row still awaiting its
    report may be resent): it must not give the new send the first one's outcome."""
    row = insert_accepted(db, "accolades")
    first_url = url_for(settings, "accolades", row)
    resend(db, row)
    late = requests.post(first_url, data=accolades_report(row, "error", errorMessage="absent"), timeout=5)
    assert (late.status_code, late.text.strip()) == (200, "stale")
    assert state(db, row) == ("success", "", DispatchState.ACCEPTED, None)
    current = requests.post(url_for(settings, "accolades", row, resends=1), data=accolades_report(row), timeout=5)
    assert (current.status_code, current.text.strip()) == (200, "applied")
    assert state(db, row) == ("success", "", DispatchState.DELIVERED, None)


def test_an_earlier_attempt_s_failure_report_does_not_fail_the_attempt_that_went_through(settings, served, db):
    """Attempt 1's answer was lost (a timeout after Accolades got it), so the row was sent again
    (`SMS_ACCOLADES_ON_UNKNOWN=resend`) and attempt 2 was accepted. Attempt 1's `error` report must not end
    the row `failed`: attempt 2 may well be delivered. A `delivered` report from any attempt stands: the
    message arrived."""
    row = insert_accepted(db, "accolades")
    with db.begin() as conn:  # attempt 2 holds the row now
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row).values(attempts=2))
    first = requests.post(url_for(settings, "accolades", row, attempt=1),
                          data=accolades_report(row, "error", errorMessage="absent"), timeout=5)
    assert (first.status_code, first.text.strip()) == (200, "stale")
    assert state(db, row) == ("success", "", DispatchState.ACCEPTED, None)
    delivered = requests.post(url_for(settings, "accolades", row, attempt=1), data=accolades_report(row),
                              timeout=5)
    assert (delivered.status_code, delivered.text.strip()) == (200, "applied")
    assert state(db, row) == ("success", "", DispatchState.DELIVERED, None)


def test_a_url_handed_out_before_tokens_named_the_send_still_reports(settings, served, db):
    """Messages sent before an upgrade carry tokens that name only the row; their reports still count."""
    row = insert_accepted(db, "ozeki")
    resend(db, row)
    token = URLSafeSerializer(SECRET, salt="sms-report:ozeki", signer_kwargs={"digest_method": hashlib.sha256})
    answer = requests.post(f"{served.url}/reports/ozeki/{token.dumps(row)}", timeout=5,
                           data={"SmsId": "s-1", "Delivered": "True"})
    assert (answer.status_code, answer.text.strip()) == (200, "applied")
    assert state(db, row)[0::2] == ("success", DispatchState.DELIVERED)


# --- refusals that change nothing -----------------------------------------------------------------

def test_forged_token_is_refused(settings, served, db):
    row = insert_accepted(db, "accolades")
    before = state(db, row)
    payload = base64.urlsafe_b64encode(str(row).encode()).decode().rstrip("=")
    forged = f"{payload}.{'A' * 43}"
    for token in (forged, "nonsense", "x" * 300):
        answer = requests.post(f"{served.url}/reports/accolades/{token}", data=accolades_report(row),
                               timeout=5)
        assert answer.status_code == 403
    assert state(db, row) == before


def test_token_altered_to_name_another_row_is_refused(settings, served, db):
    mine, victim = insert_accepted(db, "accolades"), insert_accepted(db, "accolades")
    before = state(db, victim)
    _, issued, signature = url_for(settings, "accolades", mine).rsplit("/", 1)[1].split(".")
    payload = base64.urlsafe_b64encode(f"[{victim},0]".encode()).decode().rstrip("=")
    altered = f"{payload}.{issued}.{signature}"
    answer = requests.post(f"{served.url}/reports/accolades/{altered}",
                           data=accolades_report(victim, "error", errorMessage="x"), timeout=5)
    assert answer.status_code == 403
    assert state(db, victim) == before


def test_report_replayed_onto_another_rows_url_is_refused(settings, served, db):
    first, second = insert_accepted(db, "accolades"), insert_accepted(db, "accolades")
    before = (state(db, first), state(db, second))
    # A genuine report about `second`, sent to the URL we handed out for `first`.
    answer = requests.post(url_for(settings, "accolades", first),
                           data=accolades_report(second, "error", errorMessage="x"), timeout=5)
    assert answer.status_code == 403
    assert (state(db, first), state(db, second)) == before


def test_another_providers_token_is_refused(settings, served, db):
    row = insert_accepted(db, "ozeki")
    before = state(db, row)
    token = url_for(settings, "ozeki", row).rsplit("/", 1)[1]
    answer = requests.post(f"{served.url}/reports/accolades/{token}", data=accolades_report(row), timeout=5)
    assert answer.status_code == 403
    assert state(db, row) == before


@pytest.mark.parametrize("provider, kwargs", [
    ("accolades", {"data": {"apiName": "sms", "type": "deliveryReport", "status": "sent"}}),   # no id
    ("accolades", {"data": {"status": "delivered-ish", "id": "{row}"}}),
    ("accolades", {"data": {"id": "{row}"}}),
    ("accolades", {"json": {"status": "sent", "id": "{row}"}}),                                # not a form
    ("ozeki", {"data": {"Delivered": "True"}}),                                                # no SmsId
    ("ozeki", {"data": {"SmsId": "x", "Delivered": "maybe"}}),
    ("ozeki", {"data": b"\xff\xfe\x00garbage", "headers": {"Content-Type": "application/octet-stream"}}),
])
def test_malformed_reports_get_400_and_change_nothing(settings, served, db, provider, kwargs):
    row = insert_accepted(db, provider)
    before = state(db, row)
    for key in ("data", "json"):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = {k: v.format(row=row) for k, v in kwargs[key].items()}
    answer = requests.post(url_for(settings, provider, row), timeout=5, **kwargs)
    assert answer.status_code == 400
    assert state(db, row) == before


def test_oversized_report_is_refused_unread(settings, served, db):
    row = insert_accepted(db, "accolades")
    before = state(db, row)
    answer = requests.post(url_for(settings, "accolades", row), timeout=5,
                           data=accolades_report(row, "error", errorMessage="x" * 100_000))
    assert answer.status_code == 413
    assert state(db, row) == before


def test_unknown_row_is_404(settings, served, db):
    orphan = insert_unknown(db)
    assert requests.post(url_for(settings, "accolades", orphan), data=accolades_report(orphan),
                         timeout=5).status_code == 404
    assert state(db, orphan) == ("new", "", None, None)
    never = 2_000_000_000
    assert requests.post(url_for(settings, "ozeki", never), data={"SmsId": "z", "Delivered": "True"},
                         timeout=5).status_code == 404


def test_a_row_of_another_provider_is_unknown_here(settings, served, db):
    row = insert_accepted(db, "ozeki")
    before = state(db, row)
    answer = requests.post(url_for(settings, "accolades", row), data=accolades_report(row), timeout=5)
    assert answer.status_code == 404
    assert state(db, row) == before


def test_unknown_route_and_health(served):
    assert requests.get(f"{served.url}/healthz", timeout=5).text == "ok\n"
    assert requests.post(f"{served.url}/reports/mobilgroup/abc", timeout=5).status_code == 404
    assert requests.get(f"{served.url}/reports/accolades", timeout=5).status_code == 404


def test_database_down_is_503_not_a_crash(mariadb_url):
    dead_port = free_port()
    down = load_settings(database_url=f"mysql+mysqldb://root@127.0.0.1:{dead_port}/none",
                         webhook_secret=SECRET, public_url="http://unused.example")
    served = Served(create_app(down))
    try:
        token = url_for(down, "accolades", 5).rsplit("/", 1)[1]
        answer = requests.post(f"{served.url}/reports/accolades/{token}", data=accolades_report(5),
                               timeout=20)
        assert answer.status_code == 503
        assert requests.get(f"{served.url}/healthz", timeout=5).status_code == 200
    finally:
        served.stop()


def test_logs_carry_neither_numbers_texts_nor_tokens(settings, served, db, caplog):
    row = insert_accepted(db, "accolades")
    url = url_for(settings, "accolades", row)
    token = url.rsplit("/", 1)[1]
    with caplog.at_level(logging.DEBUG):
        requests.post(url, data=accolades_report(row, "error", errorMessage=f"to {NUMBER} failed"), timeout=5)
        requests.post(url, data=accolades_report(row + 1), timeout=5)
        requests.post(url, data={"status": "??"}, timeout=5)
    # Everything the server side logged (urllib3 is the test's own client).
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("urllib3"))
    assert f"row {row}" in logged
    assert NUMBER not in logged and token not in logged and token.split(".")[1] not in logged


def test_a_burst_of_reports_is_all_applied(settings, served, db):
    rows = [insert_accepted(db, "accolades") for _ in range(60)]

    def report(row: int) -> int:
        status = "error" if row % 3 == 0 else "sent"
        return requests.post(url_for(settings, "accolades", row), timeout=10,
                             data=accolades_report(row, status, errorMessage="gone")).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(report, rows + rows))     # every report twice, concurrently
    assert set(answers) == {200}
    for row in rows:
        assert state(db, row)[0] == ("failed" if row % 3 == 0 else "success")
        assert state(db, row)[2] == (DispatchState.FAILED if row % 3 == 0 else DispatchState.DELIVERED)


# --- the simulators calling the app back ----------------------------------------------------------

def wait_final(engine, rows: list[int], timeout: float = 15.0) -> dict[int, tuple]:
    deadline = time.monotonic() + timeout
    while True:
        states = {row: state(engine, row) for row in rows}
        if all(s[2] in DispatchState.FINAL for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.1)


@pytest.mark.parametrize("report_method", ["POST", "GET"])
def test_simulators_reports_reach_the_app_and_finish_every_message(settings, served, db, report_method):
    accolades_sim = AccoladesSimulator(account="77", password="pw", report_delay_s=0.05,
                                       report_method=report_method).start()
    ozeki_sim = OzekiSimulator(username="u", password="pw", report_delay_s=0.05,
                               report_method=report_method).start()
    accolades = AccoladesClient(url=accolades_sim.url, account="77", password="pw", timeout=5)
    ozeki = OzekiClient(url=ozeki_sim.api_url, username="u", password="pw", timeout=5)
    expected = {}
    try:
        for i in range(10):
            recipient = f"4072200{i:02d}" + ("13" if i % 4 == 0 else "00")
            for provider, client in (("accolades", accolades), ("ozeki", ozeki)):
                row = insert_accepted(db, provider, recipient)
                client.send(OutgoingMessage(reference=row, recipient=recipient, text="Hi",
                                            callback_url=url_for(settings, provider, row)))
                expected[row] = ("failed", DispatchState.FAILED) if i % 4 == 0 else \
                    ("success", DispatchState.DELIVERED)
        states = wait_final(db, list(expected))

        # A simulator journals a report once the app has answered it, which can be just after the
        # app has written the row.
        def journalled_reports():
            found = accolades_sim.events("report") + ozeki_sim.events("report")
            return found if len(found) >= len(expected) else None
        reports = wait_until(journalled_reports, timeout_s=10, interval_s=0.05, what="the simulators' report journals")
    finally:
        accolades.close()
        ozeki.close()
        accolades_sim.stop()
        ozeki_sim.stop()
    assert {row: (s[0], s[2]) for row, s in states.items()} == expected
    assert len(reports) == len(expected) and {r["status"] for r in reports} == {200}


# --- what strangers send: one table ---------------------------------------------------------------

def token_for(provider: str, row: int, *, key: str = SECRET, issued_ago_s: float = 0, timed: bool = True) -> str:
    """A token as `callback_url` makes them (signed with `key`, issued `issued_ago_s` ago), or as they were
    made before they carried a time (`timed=False`)."""
    options = {"salt": f"sms-report:{provider}", "signer_kwargs": {"digest_method": hashlib.sha256}}
    if not timed:
        return URLSafeSerializer(key, **options).dumps([row, 0])

    class IssuedThen(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - issued_ago_s)

    return URLSafeTimedSerializer(key, signer=IssuedThen, **options).dumps([row, 0])


UNCHANGED = ("success", "", DispatchState.ACCEPTED, None)
DELIVERED = ("success", "", DispatchState.DELIVERED, None)
ACCOLADES_ERROR = {"apiName": "sms", "type": "deliveryReport", "status": "error", "id": "{row}",
                   "errorMessage": "absent"}
OZEKI_UNDELIVERED = {"SmsId": "s-1", "Delivered": "False", "DeliveryStatus": "Undelivered"}
FAILED_ABSENT = ("failed", "Accolades could not send the message: absent", DispatchState.FAILED,
                 "Accolades could not send the message: absent")
DAY = 86_400

# (what, provider of the row, route, method, token, fields, HTTP status, the row afterwards)
STRANGERS = [
    ("forged signature", "accolades", "accolades", "POST", lambda row: token_for("accolades", row)[:-4] + "AAAA",
     ACCOLADES_ERROR, 403, UNCHANGED),
    ("not a token", "accolades", "accolades", "POST", lambda row: "not.a.token", ACCOLADES_ERROR, 403, UNCHANGED),
    ("expired (issued longer ago than the TTL)", "accolades", "accolades", "POST",
     lambda row: token_for("accolades", row, issued_ago_s=5 * DAY), ACCOLADES_ERROR, 403, UNCHANGED),
    ("within the TTL (issued three days ago)", "accolades", "accolades", "POST",
     lambda row: token_for("accolades", row, issued_ago_s=3 * DAY), ACCOLADES_ERROR, 200, FAILED_ABSENT),
    ("from a worker whose clock runs ahead", "ozeki", "ozeki", "POST",
     lambda row: token_for("ozeki", row, issued_ago_s=-30), {"SmsId": "s", "Delivered": "True"}, 200, DELIVERED),
    ("signed with the key before the last rotation", "accolades", "accolades", "POST",
     lambda row: token_for("accolades", row, key=OLD_KEY), ACCOLADES_ERROR, 200, FAILED_ABSENT),
    ("signed with a key no longer listed", "accolades", "accolades", "POST",
     lambda row: token_for("accolades", row, key=RETIRED_KEY), ACCOLADES_ERROR, 403, UNCHANGED),
    ("issued before tokens had a time, under the signing key", "ozeki", "ozeki", "GET",
     lambda row: token_for("ozeki", row, timed=False), {"SmsId": "s", "Delivered": "True"}, 200, DELIVERED),
    ("issued before tokens had a time, under a key since rotated out of first place", "ozeki", "ozeki", "GET",
     lambda row: token_for("ozeki", row, key=OLD_KEY, timed=False), OZEKI_UNDELIVERED, 403, UNCHANGED),
    ("another provider's token", "ozeki", "accolades", "POST", lambda row: token_for("ozeki", row),
     ACCOLADES_ERROR, 403, UNCHANGED),
    ("HEAD where Ozeki uses GET", "ozeki", "ozeki", "HEAD", lambda row: token_for("ozeki", row),
     OZEKI_UNDELIVERED, 405, UNCHANGED),
    ("GET for Accolades, whose method is not documented", "accolades", "accolades", "GET",
     lambda row: token_for("accolades", row), ACCOLADES_ERROR, 200, FAILED_ABSENT),
    ("HEAD where Accolades reports", "accolades", "accolades", "HEAD", lambda row: token_for("accolades", row),
     ACCOLADES_ERROR, 405, UNCHANGED),
    ("PATCH where Accolades reports", "accolades", "accolades", "PATCH", lambda row: token_for("accolades", row),
     ACCOLADES_ERROR, 405, UNCHANGED),
    ("PUT", "ozeki", "ozeki", "PUT", lambda row: token_for("ozeki", row), OZEKI_UNDELIVERED, 405, UNCHANGED),
    ("DELETE", "accolades", "accolades", "DELETE", lambda row: token_for("accolades", row), ACCOLADES_ERROR,
     405, UNCHANGED),
    ("a body over 16 KiB", "accolades", "accolades", "POST", lambda row: token_for("accolades", row),
     {**ACCOLADES_ERROR, "errorMessage": "x" * 20_000}, 413, UNCHANGED),
    ("a query string over 16 KiB", "ozeki", "ozeki", "GET", lambda row: token_for("ozeki", row),
     {**OZEKI_UNDELIVERED, "DeliveryStatus": "x" * 20_000}, 431, UNCHANGED),
    ("markup and control characters in the reason", "accolades", "accolades", "POST",
     lambda row: token_for("accolades", row),
     {**ACCOLADES_ERROR, "errorMessage": "<script>alert(1)</script> <b>Number</b>\x07 not\u202e in\r\nservice"},
     200, ("failed", "Accolades could not send the message: alert(1) Number not in service", DispatchState.FAILED,
           "Accolades could not send the message: alert(1) Number not in service")),
    ("escaped markup in the reason", "accolades", "accolades", "POST", lambda row: token_for("accolades", row),
     {**ACCOLADES_ERROR, "errorMessage": "&lt;img src=x onerror=alert(1)&gt; <i>gone"}, 200,
     ("failed", "Accolades could not send the message: ‹img src=x onerror=alert(1)› gone", DispatchState.FAILED,
      "Accolades could not send the message: ‹img src=x onerror=alert(1)› gone")),
    ("markup in Ozeki's status word, by GET", "ozeki", "ozeki", "GET", lambda row: token_for("ozeki", row),
     {**OZEKI_UNDELIVERED, "DeliveryStatus": '<img src=x onerror="alert(1)">'}, 200,
     ("failed", "Ozeki reported the message undelivered", DispatchState.FAILED,
      "Ozeki reported the message undelivered")),
]


@pytest.mark.parametrize("provider, route, method, make_token, fields, status, after",
                         [case[1:] for case in STRANGERS], ids=[case[0] for case in STRANGERS])
def test_what_strangers_send(served, db, provider, route, method, make_token, fields, status, after):
    """Each request gets its answer, and changes the row only as a genuine report would: as `after` says."""
    row = insert_accepted(db, provider)
    fields = {name: value.format(row=row) if name == "id" else value for name, value in fields.items()}
    where = "params" if method in ("GET", "HEAD") else "data"
    answer = requests.request(method, f"{served.url}/reports/{route}/{make_token(row)}", timeout=10,
                              **{where: fields})
    assert answer.status_code == status
    assert state(db, row) == after
    assert requests.get(f"{served.url}/healthz", timeout=5).status_code == 200


def test_a_connection_that_sends_no_whole_request_is_closed_at_the_deadline(mariadb_url):
    """A client trickling its headers a byte at a time keeps its socket only until the deadline."""
    served = Served(create_app(load_settings(database_url=mariadb_url, webhook_secret=SECRET)), deadline_s=1)
    try:
        with socket.create_connection(("127.0.0.1", served.server.effective_port), timeout=10) as trickle:
            started = time.monotonic()
            closed = False
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    trickle.sendall(bytes([byte]))
                    time.sleep(0.2)
                except OSError:
                    closed = True
                    break
                if time.monotonic() - started > 8:
                    break
            if not closed:
                closed = trickle.recv(1) == b""
        assert closed and time.monotonic() - started < 8
    finally:
        served.stop()
