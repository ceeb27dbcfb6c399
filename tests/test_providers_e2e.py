"""The providers that report later, end to end: asterCC rows in MariaDB → celery beat → Redis → celery
workers → a provider's simulator, and the outcome back from the provider alone: Accolades and Ozeki call
the webhook app (served here on a real port, applying reports to the test database), smsc.ru sends SMPP
receipts to the receiver (run here in a thread). Real processes and sockets throughout; the workers are
docker-compose.yml's (threads for the HTTP providers, processes for smsc.ru).

What a call centre relies on: a message routed by its number's prefix goes through that provider, which
is recorded; it is sent once (every part once); it ends `success` when the provider says delivered and
`failed` with the provider's reason when not, with nothing but the provider's report to go on; and a
recipient's reply lands in `responsenote`.
"""
from __future__ import annotations

import secrets
import threading
from collections import Counter
from contextlib import contextmanager

import pytest
from sqlalchemy import text

from providers import smsc_text
from settings import load_settings
from simulators.accolades import AccoladesSimulator
from simulators.ozeki import OzekiSimulator
from simulators.smsc import SmscSimulator
from workflow.runtime import Runtime
from workflow.reports import apply_smpp_receipt
from workflow.smpp_receiver import run_receiver
from tests.conftest import app_env, compose_worker, insert_rows, rows_by_id, started, wait_until
from webhooks.app import create_app, make_server

pytestmark = pytest.mark.integration

FINAL_STATES = ("delivered", "failed")
FAST = {"SMS_DISPATCH_INTERVAL_S": 1, "SMS_RETRY_BASE_S": 0.2, "SMS_RETRY_MAX_S": 1}


@contextmanager
def webhook_app(database_url: str, secret: str):
    """The webhook app on a free 127.0.0.1 port, served as `smsctl webhooks` serves it, applying reports to `database_url`; yields
    its public URL."""
    app = create_app(load_settings(database_url=database_url, webhook_secret=secret))
    server, stop = make_server(app, "127.0.0.1", 0), threading.Event()
    thread = threading.Thread(target=server.run_until, args=(stop,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stop.set()
        thread.join(timeout=5)


@contextmanager
def smpp_receiver(settings):
    """`run_receiver` in a thread, applying receipts and replies as it does by default (`apply_smpp_receipt`)."""
    rt = Runtime(settings)
    stop = threading.Event()
    def apply(provider, report):
        return apply_smpp_receipt(rt.engine, provider, report)

    thread = threading.Thread(target=run_receiver, args=(settings, stop, apply),
                              kwargs={"reconnect_min_s": 0.1}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive(), "the SMPP receiver did not stop"


def digits(number: str) -> str:
    return "".join(filter(str.isdigit, number))


def all_final(engine):
    """The rows once every dispatch record reached a final state, else None."""
    rows = rows_by_id(engine)
    return rows if all(r["state"] in FINAL_STATES for r in rows.values()) else None


def test_300_messages_split_across_accolades_and_ozeki_finish_by_their_callbacks(db, mariadb_url, redis_url,
                                                                                 celery):
    accolades = AccoladesSimulator(report_delay_s=0.3)
    ozeki = OzekiSimulator(report_delay_s=0.3)
    secret = secrets.token_hex(16)
    # Every tenth number ends in 13, which both simulators report undeliverable.
    romanian = [f"+40 721 {i:03d} 0{'13' if i % 10 == 3 else '20'}" for i in range(150)]
    british = [f"+44 7400 9{i:03d}{'13' if i % 10 == 7 else '20'}" for i in range(150)]
    with started(accolades), started(ozeki), webhook_app(mariadb_url, secret) as public_url:
        ro_ids = insert_rows(db, [(n, f"Comanda {i} a fost expediată.") for i, n in enumerate(romanian)])
        uk_ids = insert_rows(db, [(n, f"Your parcel {i} is on its way.") for i, n in enumerate(british)])
        env = app_env(
            mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="accolades", SMS_ROUTES="40=accolades,44=ozeki",
            SMS_PUBLIC_URL=public_url, SMS_WEBHOOK_SECRET=secret,
            SMS_ACCOLADES_URL=accolades.url, SMS_ACCOLADES_ACCOUNT=accolades.account,
            SMS_ACCOLADES_PASSWORD=accolades.password, SMS_ACCOLADES_RATE=200,
            SMS_OZEKI_URL=ozeki.api_url, SMS_OZEKI_USERNAME=ozeki.username, SMS_OZEKI_PASSWORD=ozeki.password,
            SMS_OZEKI_RATE=200, **FAST)
        celery("worker", env, *compose_worker("worker"))
        celery("beat", env)
        rows = wait_until(lambda: all_final(db), 60, what="every message's delivery report")
        accolades_journal, ozeki_journal = accolades.events(), ozeki.events()

    def expected(number, provider, reason):
        dead = number.endswith("13")
        return (provider, "failed" if dead else "delivered", "failed" if dead else "success",
                reason if dead else "")

    outcome = {i: (r["provider"], r["state"], r["status"], r["error_msg"]) for i, r in rows.items()}
    assert outcome == {
        **{i: expected(n, "accolades", "Accolades could not send the message: The destination number is "
                                          "not reachable") for i, n in zip(ro_ids, romanian)},
        **{i: expected(n, "ozeki", "Ozeki reported the message undelivered (Undelivered)")
           for i, n in zip(uk_ids, british)},
    }
    assert all(r["contacttime"] is not None and r["failures"] == 0 for r in rows.values())

    def kind(journal, name):
        return [e for e in journal if e["kind"] == name]

    # Sent once each: Accolades echoes our row id, Ozeki journals the recipient (all distinct here).
    assert Counter(int(e["id"]) for e in kind(accolades_journal, "send")) == Counter(ro_ids)
    assert Counter(e["recipient"] for e in kind(ozeki_journal, "send")) == Counter(map(digits, british))
    assert kind(accolades_journal, "reject") == kind(ozeki_journal, "reject") == []
    # The outcome came from the callbacks: one report per message, each accepted by the webhook app.
    assert Counter(int(e["id"]) for e in kind(accolades_journal, "report")) == Counter(ro_ids)
    assert len(kind(ozeki_journal, "report")) == len(uk_ids)
    assert {e["status"] for e in kind(accolades_journal, "report") + kind(ozeki_journal, "report")} == {200}


def smsc_texts(n: int) -> list[tuple[str, str]]:
    """(number, text) for `n` messages: short and long, GSM-7 and Cyrillic (UCS-2), every ninth to a
    number the simulator reports undeliverable."""
    shapes = [
        lambda i: f"Order {i} is ready for pickup.",
        lambda i: f"Dear customer, your order {i} has been packed and will be handed to the courier "
                  "tomorrow morning. The courier will call you an hour before arriving. Thank you for "
                  "shopping with us, and have a nice day!",                                  # 2 GSM parts
        lambda i: f"Ваш заказ {i} готов к выдаче.",                                            # 1 UCS-2 part
        lambda i: f"Уважаемый клиент, ваш заказ {i} собран и завтра утром будет передан курьеру. "
                  "Курьер позвонит вам за час до приезда. Спасибо за покупку!",               # 2 UCS-2 parts
        lambda i: f"Здравствуйте! Заказ {i}: " + "доставка переносится на пятницу, извините. " * 4,  # 3 parts
    ]
    return [(f"+7 916 {i // 100:03d}-{i % 100:02d}-{'13' if i % 9 == 4 else '20'}", shapes[i % 5](i))
            for i in range(n)]


def test_smsc_messages_long_and_cyrillic_finish_by_receipts_through_real_workers(db, mariadb_url, redis_url,
                                                                               celery):
    sim = SmscSimulator(receipt_delay_s=0.2)
    messages = smsc_texts(150)
    layouts = [smsc_text.layout(body) for _, body in messages]
    assert {len(plan.segments) for plan in layouts} == {1, 2, 3} and \
        {plan.data_coding for plan in layouts} == {0, 8}, "the sample should hold every kind of text"
    smpp = {"smsc_host": "127.0.0.1", "smsc_port": sim.port, "smsc_system_id": sim.system_id,
            "smsc_password": sim.password}
    with started(sim), smpp_receiver(load_settings(database_url=mariadb_url, **smpp)):
        ids = insert_rows(db, messages)
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="smsc", SMS_SMSC_RATE=200, **FAST,
                      **{f"SMS_{key.upper()}": value for key, value in smpp.items()})
        celery("worker", env, *compose_worker("worker"))
        celery("worker", env, *compose_worker("worker-smsc"))
        celery("beat", env)
        rows = wait_until(lambda: all_final(db), 60, what="every message's receipts")

        replier, (number, _) = next((i, m) for i, m in zip(ids, messages) if not m[0].endswith("13"))
        sim.send_reply(digits(number), "Спасибо, заберу завтра")
        wait_until(lambda: rows_by_id(db)[replier]["responsenote"], 10, what="the reply in responsenote")
        submits, delivers = sim.events("submit"), sim.events("deliver")
        with db.connect() as conn:
            part_ids = Counter(conn.execute(text(
                "SELECT batchcontact_id FROM sms_message_ids WHERE provider = 'smsc'")).scalars())

    for row_id, (number, _) in zip(ids, messages):
        row = rows[row_id]
        assert (row["provider"], row["failures"]) == ("smsc", 0)
        if number.endswith("13"):
            assert (row["state"], row["status"]) == ("failed", "failed")
            assert "no such number (smsc.ru error 1)" in row["error_msg"]
        else:
            assert (row["state"], row["status"], row["error_msg"]) == ("delivered", "success", "")
    assert rows_by_id(db)[replier]["responsenote"] == "Спасибо, заберу завтра"

    # Every part reached the SMSC once: one accepted submit per (recipient, part), as many as the layout.
    accepted = [e for e in submits if e["status"] == 0]
    assert len(accepted) == len(submits), "a submit was refused"
    assert max(Counter((e["destination_addr"], e["udh"]) for e in accepted).values()) == 1
    per_number = Counter(e["destination_addr"] for e in accepted)
    assert per_number == Counter({digits(number): len(plan.segments)
                                  for (number, _), plan in zip(messages, layouts)})
    assert {e["data_coding"] for e in accepted} == {0, 8}
    # A receipt for every part, each applied to its row through the provider's id of that part: a delivered
    # part's id is settled (the row is delivered once none is left), an undelivered one's stays.
    assert sum(e["esm_class"] == 0x04 for e in delivers) >= len(accepted)
    assert part_ids == Counter({row_id: len(plan.segments) for row_id, plan, (number, _)
                                in zip(ids, layouts, messages) if number.endswith("13")})
