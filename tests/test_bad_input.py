"""The bad-input catalogue: what agents type, what operators configure and what providers answer, each with
the outcome it must get. One table, `CATALOGUE`; its rows are checked where they are decided (the reading
of targets, the providers' text preparation, their answer parsing, start-up), and the rows a call centre
meets every day also end to end, through a real Celery worker, MariaDB, Redis and the simulators.

Outcomes: `sent` (the provider gets `detail`: the number, or the text), `failed` (asterCC `failed`, the
reason contains `detail`, nothing reaches a provider), `retried` (a transient error: tried again later).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
from sqlalchemy import text as sql

from db import schema
from providers import smsc_text
from providers.accolades import AccoladesClient
from providers.base import OutgoingMessage, PermanentError, TransientError
from providers.mobilgroup import MobilgroupClient
from providers.ozeki import OzekiClient
from providers.smsc import SmscClient
from providers.text import mask
from settings import ConfigError, load_settings
from simulators.accolades import AccoladesSimulator
from simulators.mobilgroup import MobilgroupSimulator
from simulators.ozeki import OzekiSimulator
from workflow.routing import InvalidNumber, normalise
from tests.conftest import app_env, compose_worker, insert_rows, rows_by_id, started, wait_until
from tests.httpstub import StubServer

SENT, FAILED, RETRIED = "sent", "failed", "retried"
HTTP = ("mobilgroup", "accolades", "ozeki")
EVERY = (*HTTP, "smsc")
ROUTING = {"default_provider": "mobilgroup", "routes": "40=accolades", "default_region": "RU"}
"""How the catalogue's deployment routes: Russia (the default region) through Mobilgroup, Romania through
Accolades; so SMS_ALLOWED_COUNTRIES defaults to RU and +40."""
SMSC_CHANNELS = frozenset({"viber"})
REFERENCES = itertools.count(100)
"""Row ids of the function-level sends: Mobilgroup refuses an id it has seen."""


@dataclass(frozen=True)
class Case:
    kind: str
    """`target`, `text`, `archive`, `schedule`, `answer`, `setting`."""
    given: object
    outcome: str
    detail: str
    providers: tuple[str, ...] = EVERY
    """For texts and answers: the providers the row is about."""

    def __str__(self) -> str:
        return f"{self.kind}:{self.given!r:.40}:{','.join(self.providers)}"


def target(given: str, outcome: str, detail: str) -> Case:
    return Case("target", given, outcome, detail)


BOMB = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
        b"<response><result>&b;</result></response>")

CATALOGUE: list[Case] = [
    # --- targets as agents type them --------------------------------------------------------------------
    target("+7 903 123-45-67", SENT, "79031234567"),
    target("8 (903) 123-45-67", SENT, "79031234567"),                  # the national trunk prefix 8
    target("8.903.123.45.67", SENT, "79031234567"),
    target("79031234567", SENT, "79031234567"),
    target("9031234567", SENT, "79031234567"),
    target("+7\u00a0903\u00a0123\u00a045\u00a067", SENT, "79031234567"),  # no-break spaces, pasted from a page
    target("+7 903 123–45–67", SENT, "79031234567"),                   # en dashes, pasted from a document
    target("40712000042", SENT, "40712000042"),                        # Romanian, international digits, no +
    target("+40 712 000 042", SENT, "40712000042"),
    target("810 40 712000042", SENT, "40712000042"),                   # RU's international prefix 810
    target("9512780035", SENT, "79512780035"),                         # valid in RU and as +95: RU wins
    target("+7903IVANOVA", FAILED, "it contains letters"),             # keypad letters: not 79034826682
    target("89031234567 (Ivan)", FAILED, "it contains letters"),
    target("89o31234567", FAILED, "it contains letters"),              # a letter o typed for a zero
    target("call me", FAILED, "it contains letters"),
    target("89031234567 ext 12", FAILED, "it has an extension"),
    target("89031234567x12", FAILED, "it has an extension"),
    target("89031234567#12", FAILED, "it has an extension"),
    target("89031234567;12", FAILED, "it has an extension"),
    target("89031234567 доб. 12", FAILED, "it has an extension"),
    target("ivan.petrov@mail.ru", FAILED, "it looks like an e-mail address"),
    target("89031234567, 89037654321", FAILED, "it holds more than one number"),
    target("89031234567 / 89037654321", FAILED, "it holds more than one number"),
    target("89031234567\n89037654321", FAILED, "it holds more than one number"),
    target("89031234567 89037654321", FAILED, "it is neither a valid RU number nor a valid international one"),
    target("+7 903 123 45 67 +7 903 765 43 21", FAILED, "it has a + after its start"),
    target("++79031234567", FAILED, "it has a + after its start"),
    target("8 (903 123-45-67", FAILED, "its brackets do not match"),
    target("+7 903 123 45 67 😀", FAILED, "it contains 'grinning face'"),
    target("+7 903 ١٢٣ 45 67", FAILED, "it contains 'arabic-indic digit one'"),
    target("12", FAILED, "it is neither a valid RU number nor a valid international one"),
    target("+7 100 123-45-67", FAILED, "it is not a valid RU number"),  # a possible length, no such range
    target("+79001234", FAILED, "it is not a valid RU number"),
    target("+999 123 456 789", FAILED, "no country has such a calling code"),
    target("447700900123", FAILED, "it is neither a valid RU number nor a valid international one"),  # drama range
    target("0040712000042", FAILED, "it is neither a valid RU number nor"),  # 00 is not RU's international prefix
    target("", FAILED, "the recipient's phone number is empty"),
    target("   ", FAILED, "the recipient's phone number is empty"),
    target("+44 7400 123456", FAILED, "is in GB, where this deployment does not send "
                                      "(SMS_ALLOWED_COUNTRIES: 40,RU)"),
    target("447400123456", FAILED, "is in GB, where this deployment does not send"),
    target("+1 202 555 0123", FAILED, "is in US, where this deployment does not send"),
    target("+7 701 123 4567", FAILED, "is in KZ, where this deployment does not send"),  # +7, but Kazakhstan
    # --- texts ----------------------------------------------------------------------------------------
    Case("text", "Your order has shipped.", SENT, "Your order has shipped."),
    Case("text", "Ваш код: 4711 👍", SENT, "Ваш код: 4711 👍"),
    Case("text", "Hi ~~~ see you", SENT, "Hi ~~~ see you"),            # not a separator: it needs its own line
    Case("text", "Hello\n~~~\nnote: the customer asked for a callback", SENT, "Hello", HTTP),
    Case("text", "Hello\n~~~\nnote: the customer asked for a callback", SENT,
         "Hello\n~~~\nnote: the customer asked for a callback", ("smsc",)),  # smsc.ru strips it itself
    Case("text", "a" * 140 + "\n~~~\n" + "a long note " * 20, SENT, "a" * 140, ("mobilgroup",)),  # not counted
    Case("text", "", FAILED, "the message text is empty"),
    Case("text", "  \t ", FAILED, "the message text is empty"),
    Case("text", "\n~~~\nonly a note", FAILED, "nothing to send"),
    Case("text", "  \n~~~\nonly a note", FAILED, "nothing to send"),
    Case("text", "__VIBER__: Hello", FAILED, "smsc.ru's __VIBER__: channel prefix, which only smsc.ru can send",
         HTTP),
    Case("text", "__VIBER__: Hello", SENT, "__VIBER__: Hello", ("smsc",)),  # SMS_SMSC_CHANNELS=viber
    Case("text", "__TGM__: Hello", FAILED, "the tgm channel is not enabled (SMS_SMSC_CHANNELS)", ("smsc",)),
    Case("text", "__HLR__", FAILED, "the hlr channel is not enabled", ("smsc",)),
    Case("text", "__HLR__", FAILED, "which only smsc.ru can send", HTTP),
    Case("text", "Я" * 67 * 7, FAILED, "too long"),
    Case("text", "x" * 141, FAILED, "the message is too long: 141 characters", ("mobilgroup",)),
    Case("text", "Hello\x00", FAILED, "a control character that cannot be sent", ("mobilgroup",)),
    # --- asterCC rows -----------------------------------------------------------------------------------
    Case("archive", 0, FAILED, "the message text is missing"),          # no archive row at all
    Case("archive", 999_999, FAILED, "the message text is missing"),    # an archive id that does not exist
    # --- schedules: asterCC's `schedulertime` as SQL (SMS_MAX_AGE_S is 3 days) -------------------------
    Case("schedule", "'0000-00-00 00:00:00'", SENT, "queued"),          # the zero date: due at once
    Case("schedule", "NOW() - INTERVAL 2 DAY", SENT, "queued"),         # late, within SMS_MAX_AGE_S
    Case("schedule", "NOW() - INTERVAL 4 DAY", FAILED, "expired: due "),
    Case("schedule", "NOW() - INTERVAL 7 YEAR", FAILED, "more than 3 days ago (SMS_MAX_AGE_S)"),
    Case("schedule", "NOW() + INTERVAL 1 HOUR", "new", ""),             # not due yet: not claimed
    # --- provider answers -------------------------------------------------------------------------------
    Case("answer", b"<response><result>OK</resu", RETRIED, "unreadable answer from Mobilgroup", ("mobilgroup",)),
    Case("answer", b"", RETRIED, "unreadable answer from Mobilgroup", ("mobilgroup",)),
    Case("answer", BOMB, RETRIED, "declares a DTD or entities; refused", ("mobilgroup",)),
    Case("answer", b"<response><result>ERROR</result><error>abc</error></response>", RETRIED, "bad error code",
         ("mobilgroup",)),
    Case("answer", b"not json", RETRIED, "not its JSON reply", ("accolades",)),
    Case("answer", b'{"type": "ok"', RETRIED, "not its JSON reply", ("accolades",)),
    Case("answer", b"[]", RETRIED, "not its JSON reply", ("accolades",)),
    Case("answer", b"x" * 70_000, RETRIED, "far too large", ("accolades",)),
    Case("answer", b'{"type": "Error", "code": "400", "message": "bad number +79031234567"}', FAILED,
         "Accolades refused the message: bad number … (code 400)", ("accolades",)),  # its number redacted
    Case("answer", b"<OzApi_CommandResult_SendSms><Code>2OO</Code></OzApi_CommandResult_SendSms>", RETRIED,
         "no result code", ("ozeki",)),
    Case("answer", BOMB, RETRIED, "cannot read", ("ozeki",)),
    Case("answer", b"\xff\xfe not text", RETRIED, "cannot read", ("ozeki",)),
    # --- settings (start-up refuses them, naming the variable) ---------------------------------------
    Case("setting", {"SMS_ALLOWED_COUNTRIES": "7,XX"}, FAILED, "SMS_ALLOWED_COUNTRIES: Value error, 'XX' is "
         "neither a country calling code"),
    Case("setting", {"SMS_ALLOWED_COUNTRIES": "999"}, FAILED, "SMS_ALLOWED_COUNTRIES"),
    Case("setting", {"SMS_SMSC_CHANNELS": "viber,fax"}, FAILED, "SMS_SMSC_CHANNELS: Value error, unknown channel"),
    # --- webhook requests: their table is `tests/test_webhooks.py::STRANGERS` (checked through the app)
    # --- SMPP PDUs: their tables are `tests/test_smsc_receiver_hostile.py::SURVIVABLE` and `FATAL` (a real socket)
]


def cases(*kinds: str) -> list:
    return [pytest.param(case, id=str(case)) for case in CATALOGUE if case.kind in kinds]


def test_the_catalogue_holds_every_class_of_bad_input():
    kinds = {case.kind for case in CATALOGUE}
    assert len(CATALOGUE) >= 40 and {"target", "text", "archive", "answer", "setting"} <= kinds
    assert len({(case.kind, repr(case.given), case.providers) for case in CATALOGUE}) == len(CATALOGUE), \
        "a row is in the catalogue twice"


# --- checked where it is decided ------------------------------------------------------------------------

@pytest.mark.parametrize("case", cases("target"))
def test_targets(case):
    settings = load_settings(**ROUTING)
    if case.outcome == SENT:
        assert normalise(case.given, settings) == case.detail
        return
    with pytest.raises(InvalidNumber) as refused:
        normalise(case.given, settings)
    reason = str(refused.value)
    assert case.detail in reason
    assert not re.search(r"\d{5}", reason), "a refusal shows an unmasked number"
    if case.given.strip():
        assert f'"{mask(case.given)}"' in reason, "a refusal does not quote what was typed"


@pytest.fixture(scope="module")
def simulators():
    sims = {"mobilgroup": MobilgroupSimulator(), "accolades": AccoladesSimulator(report_delay_s=0),
            "ozeki": OzekiSimulator(report_delay_s=0)}
    for sim in sims.values():
        sim.start()
    yield sims
    for sim in sims.values():
        sim.stop()


def simulated(provider: str, sims: dict):
    """A provider's client against its simulator in `sims`; smsc.ru's with no server behind it (the text
    checks send nothing there)."""
    sim = sims.get(provider)
    if provider == "mobilgroup":
        return MobilgroupClient(url=sim.api_url, user_id=sim.user_id, user=sim.user, password=sim.password)
    if provider == "accolades":
        return AccoladesClient(url=sim.url, account=sim.account, password=sim.password)
    if provider == "ozeki":
        return OzekiClient(url=sim.api_url, username=sim.username, password=sim.password)
    return SmscClient(host="127.0.0.1", port=9, system_id="u", password="p", channels=SMSC_CHANNELS)


def stubbed(provider: str, url: str):
    """An HTTP provider's client against a stub server at `url`."""
    if provider == "mobilgroup":
        return MobilgroupClient(url=f"{url}/extxml.php", user_id="1", user="u", password="p")
    if provider == "accolades":
        return AccoladesClient(url=url, account="1000", password="p")
    return OzekiClient(url=f"{url}/api", username="u", password="p")


def received(sim) -> list[str]:
    """The texts a simulator took, in order."""
    return [event["message"] for event in sim.events("send")]


@pytest.mark.parametrize("case", cases("text"))
def test_texts(case, simulators):
    for provider in case.providers:
        message = OutgoingMessage(reference=next(REFERENCES), recipient="79031234567", text=case.given)
        sim = simulators.get(provider)
        before = received(sim) if sim else []
        sender = simulated(provider, simulators)
        try:
            if case.outcome == FAILED:
                with pytest.raises(PermanentError, match=re.escape(case.detail)):
                    sender.check(message)
                with pytest.raises(PermanentError, match=re.escape(case.detail)):
                    sender.send(message)
                assert not sim or received(sim) == before, f"{provider} got a request for a refused text"
            elif sim:
                sender.send(message)
                assert received(sim)[len(before):] == [case.detail], f"{provider} got another text"
            else:  # smsc.ru: what would go in the submits, without a server behind them
                plan = smsc_text.layout(message.text)
                assert sender.check(message) == plan.billed_parts
                assert "".join(smsc_text.decode(part, plan.data_coding) for part in plan.segments) == case.detail
        finally:
            sender.close()


@pytest.mark.parametrize("case", cases("answer"))
def test_provider_answers(case):
    (provider,) = case.providers
    error = TransientError if case.outcome == RETRIED else PermanentError
    with StubServer(case.given) as stub:
        sender = stubbed(provider, stub.url)
        try:
            with pytest.raises(error, match=re.escape(case.detail)) as raised:
                sender.send(OutgoingMessage(reference=7, recipient="79031234567", text="Hello"))
        finally:
            sender.close()
    assert case.outcome == FAILED or not isinstance(raised.value, PermanentError)
    assert not re.search(r"\d{5}", str(raised.value)), "a provider's number reached error_msg"


@pytest.mark.parametrize("case", cases("schedule"))
def test_schedules(case, db, mariadb_url):
    """A row due long ago (a first deployment on an old table, a restart after a long outage) is not sent:
    it ends `failed`, saying when it was due; a late one within `SMS_MAX_AGE_S` is sent."""
    import workflow
    from workflow.runtime import Runtime

    (row,) = insert_rows(db, [("+7 903 123-45-67", "Your appointment is tomorrow.")], schedule_sql=case.given)
    rt = Runtime(load_settings(**ROUTING, database_url=mariadb_url, mobilgroup_user_id="1", mobilgroup_user="u",
                               mobilgroup_password="p"))
    released: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: released.extend(ids))
    after = rows_by_id(db)[row]
    if case.outcome == SENT:
        assert released == [row] and after["state"] == case.detail
    elif case.outcome == FAILED:
        assert (released, after["status"]) == ([], "failed") and case.detail in after["error_msg"]
    else:
        assert (released, after["status"], after["state"]) == ([], "new", None)


@pytest.mark.parametrize("case", cases("setting"))
def test_settings(case, monkeypatch):
    for name, value in case.given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(case.detail)):
        load_settings()


def test_allowed_countries_by_calling_code_or_iso_code():
    assert normalise("+40 712 000 042", load_settings(**ROUTING, allowed_countries="RO")) == "40712000042"
    assert normalise("+7 701 123 4567", load_settings(**ROUTING, allowed_countries="7")) == "77011234567"
    with pytest.raises(InvalidNumber, match=r"is in KZ, .*SMS_ALLOWED_COUNTRIES: RU\)"):
        normalise("+7 701 123 4567", load_settings(**ROUTING, allowed_countries="RU"))
    with pytest.raises(InvalidNumber, match="is in RU"):
        normalise("+7 903 123 45 67", load_settings(**ROUTING, allowed_countries="40"))
    # A route names its prefix's calling codes: `7=` lets Kazakhstan's +7 numbers through.
    assert normalise("+7 701 123 4567", load_settings(**ROUTING | {"routes": "7=mobilgroup"})) == "77011234567"


# --- end to end -----------------------------------------------------------------------------------------

def as_astercc_stores(typed: str) -> str:
    """`typed` as asterCC's `utf8` (3-byte) columns hold it: a character outside the BMP becomes `?`."""
    return re.sub("[\U00010000-\U0010FFFF]", "?", typed)


def check_refused(case: Case, row: tuple[str, str]) -> None:
    """A refused row is `failed`, with the catalogue's reason when the database kept what was typed."""
    assert row[0] == "failed", (case, row)
    assert case.detail in row[1] or as_astercc_stores(case.given) != case.given, (case, row)


def insert_missing_archive(engine, archive_id: int, target: str) -> int:
    with engine.begin() as conn, schema.astercc_mode(conn):
        return conn.execute(sql(
            "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
            " created) VALUES (:a, :t, 'new', '0000-00-00 00:00:00', 'agent', NOW())"),
            {"a": archive_id, "t": target}).lastrowid


@pytest.mark.integration
def test_the_catalogue_through_real_workers(db, mariadb_url, redis_url, celery):
    """Targets, Mobilgroup's texts, asterCC rows and expired schedules of the catalogue, plus 150 Romanian
    numbers written as international digits, through beat, a worker of docker-compose.yml and the simulators."""
    targets = [case for case in CATALOGUE if case.kind == "target"]
    texts = [case for case in CATALOGUE if case.kind == "text" and "mobilgroup" in case.providers]
    archives = [case for case in CATALOGUE if case.kind == "archive"]
    expired = [case for case in CATALOGUE if case.kind == "schedule" and case.outcome == FAILED]
    romanian = [f"40712{i:06d}" for i in range(150)]
    mobilgroup, accolades = MobilgroupSimulator(), AccoladesSimulator(report_delay_s=0)
    with started(mobilgroup), started(accolades):
        # Each row's text is its own, so the identical-request rule holds none back; each carries a note.
        target_ids = insert_rows(db, [(case.given, f"Catalogue row {i}\n~~~\nnote: agent {i} typed this")
                                      for i, case in enumerate(targets)])
        text_numbers = [f"+7 916 300-{i // 100:02d}-{i % 100:02d}" for i in range(len(texts))]
        text_ids = insert_rows(db, [(number, case.given) for number, case in zip(text_numbers, texts)])
        archive_ids = [insert_missing_archive(db, case.given, "+7 916 400-00-01") for case in archives]
        expired_ids = [insert_rows(db, [("+7 916 400-00-02", f"A reminder due long ago ({i})")],
                                   schedule_sql=case.given)[0] for i, case in enumerate(expired)]
        romanian_ids = insert_rows(db, [(number, f"Comanda {i} a fost expediată.") for i, number in
                                        enumerate(romanian)])
        env = app_env(
            mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_ROUTES="40=accolades",
            SMS_DEFAULT_REGION="RU", SMS_MOBILGROUP_URL=mobilgroup.api_url,
            SMS_MOBILGROUP_USER_ID=mobilgroup.user_id, SMS_MOBILGROUP_USER=mobilgroup.user,
            SMS_MOBILGROUP_PASSWORD=mobilgroup.password, SMS_MOBILGROUP_RATE=500, SMS_ACCOLADES_URL=accolades.url,
            SMS_ACCOLADES_ACCOUNT=accolades.account,
            SMS_ACCOLADES_PASSWORD=accolades.password, SMS_ACCOLADES_RATE=500, SMS_DISPATCH_INTERVAL_S=1)
        celery("worker", env, *compose_worker("worker"))
        celery("beat", env)

        def all_final():
            rows = rows_by_id(db)
            return all(row["status"] in ("success", "failed", "error") for row in rows.values()) and rows

        rows = wait_until(all_final, 120, what="every catalogue row to reach a final status")
        sent = {int(e["id"]): e for e in mobilgroup.events("send")}
        sent |= {int(e["id"]): {**e, "provider": "accolades"} for e in accolades.events("send")}
        rejected = mobilgroup.events("request") + accolades.events("reject")

    outcome = {row_id: (rows[row_id]["status"], rows[row_id]["error_msg"]) for row_id in rows}
    expected_number = {}
    for row_id, case in zip(target_ids, targets):
        if case.outcome == SENT:
            assert outcome[row_id] == ("success", ""), case
            expected_number[row_id] = case.detail
        else:
            check_refused(case, outcome[row_id])
            assert row_id not in sent, f"{case.given!r} was sent"
    for row_id, case in zip(text_ids, texts):
        if case.outcome == SENT:
            assert outcome[row_id] == ("success", ""), case
            assert sent[row_id]["message"] == as_astercc_stores(case.detail), case
        else:
            check_refused(case, outcome[row_id])
            assert row_id not in sent, f"{case.given!r} was sent"
    for row_id, case in zip(archive_ids, archives):
        assert outcome[row_id] == ("failed", case.detail) and row_id not in sent
    for row_id, case in zip(expired_ids, expired):
        assert outcome[row_id][0] == "failed" and case.detail in outcome[row_id][1] and row_id not in sent
    expected_number |= {row_id: number for row_id, number in zip(romanian_ids, romanian)}
    expected_number |= {row_id: re.sub(r"\D", "", number) for row_id, number, case in
                        zip(text_ids, text_numbers, texts) if case.outcome == SENT}

    # Every request went to the number typed for its row, and only rows that should be sent were.
    assert {row_id: event["phone"] for row_id, event in sent.items()} == expected_number
    assert rejected == []
    # Romanian numbers typed without + all reached Accolades; everything else went to Mobilgroup.
    assert {row_id for row_id, event in sent.items() if event.get("provider") == "accolades"} == \
        set(romanian_ids) | {row_id for row_id, case in zip(target_ids, targets) if case.detail.startswith("40")}
    assert all(rows[row_id]["provider"] == "accolades" for row_id in romanian_ids)
    # The notes after the separator reached no provider.
    assert not [e for e in sent.values() if smsc_text.COMMENT_SEPARATOR in e["message"] or "note:" in e["message"]]
