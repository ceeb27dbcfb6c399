"""Retention (`db.retention.prune`) on MariaDB and SQLite: records of rows final for longer than the retention
are emptied of everything personal, their provider ids removed, but never deleted, whatever their provider;
nothing else is touched (asterCC's tables, rows still on their way, recent ones); batches are bounded; the
resend count survives, so a request id is never used twice; and a pruned Mobilgroup row that an operator
sends again goes out under a request id Mobilgroup never had, through real workers and the simulator."""
from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
from sqlalchemy import insert, select, text, update

from db import store
from db.models import BatchContact, BatchContactArchive, Dispatch, DispatchState as S, MessageId
from db.retention import prune
from settings import ConfigError, load_settings
from simulators.mobilgroup import MobilgroupSimulator
from tests.conftest import MARIADB, ROOT, app_env, insert_rows, rows_by_id, started, wait_until

NUMBER = "79031234567"
DAYS = 90

# (provider, state, days since it last changed, what prune leaves: "kept" or "emptied")
RECORDS = [
    ("accolades", S.DELIVERED, 91, "emptied"),
    ("ozeki", S.FAILED, 200, "emptied"),
    ("smsc", S.UNCONFIRMED, 91, "emptied"),
    (None, S.FAILED, 91, "emptied"),                # refused before it was routed (a bad number)
    ("mobilgroup", S.DELIVERED, 91, "emptied"),
    ("mobilgroup", S.ERROR, 365, "emptied"),
    ("accolades", S.DELIVERED, 89, "kept"),         # final, but not for long enough
    ("mobilgroup", S.FAILED, 10, "kept"),
    ("accolades", S.ACCEPTED, 200, "kept"),         # still awaiting its report
    ("mobilgroup", S.ACCEPTED, 200, "kept"),        # still to be polled
    ("smsc", S.WAITING, 200, "kept"),
    ("ozeki", S.QUEUED, 200, "kept"),
    ("accolades", S.SENDING, 200, "kept"),
]


@pytest.fixture(params=["mariadb", "sqlite"])
def engine(request):
    return request.getfixturevalue("db" if request.param == "mariadb" else "sqlite_db")


def db_clock(engine) -> datetime:
    with engine.connect() as conn:
        now = conn.scalar(text("SELECT datetime('now', 'localtime')" if engine.dialect.name == "sqlite"
                               else "SELECT NOW()"))
    return now if isinstance(now, datetime) else datetime.fromisoformat(now)


def add_record(engine, provider: str | None, state: str, age_days: float, resends: int = 0) -> int:
    """An asterCC row and our record of it, last changed `age_days` ago by the database's clock, with two
    provider ids filed under it."""
    changed = db_clock(engine) - timedelta(days=age_days)
    status = {S.FAILED: "failed", S.ERROR: "error"}.get(state, "success")
    with engine.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content="Hello"))
        row = conn.execute(insert(BatchContact).values(
            batchcontact_archive_id=archive.inserted_primary_key[0], target=NUMBER, status=status,
            schedulertime=changed, contacttime=changed, created=changed, creby="agent", error_msg="",
            responsenote="")).inserted_primary_key[0]
        conn.execute(insert(Dispatch).values(
            batchcontact_id=row, claim_token="t", provider=provider, recipient=provider and NUMBER,
            state=state, attempts=1, parts=1, provider_message_id=provider and f"m{row}",
            last_error=f"absent: {NUMBER}", resends=resends, accepted_at=changed, created_at=changed,
            updated_at=changed))
        if provider:
            conn.execute(insert(MessageId), [{"provider": provider, "provider_message_id": f"m{row}-{k}",
                                              "batchcontact_id": row} for k in range(2)])
    return row


def records(engine) -> dict[int, tuple]:
    with engine.connect() as conn:
        dispatch = {r.batchcontact_id: (r.provider, r.state, r.recipient, r.provider_message_id, r.last_error,
                                        r.resends)
                    for r in conn.execute(select(Dispatch))}
        ids = {}
        for r in conn.execute(select(MessageId)):
            ids.setdefault(r.batchcontact_id, []).append(r.provider_message_id)
    return {row: (dispatch.get(row), sorted(ids.get(row, []))) for row in set(dispatch) | set(ids)}


def astercc(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT * FROM cc10_batchcontacts ORDER BY id"))] + \
            [tuple(r) for r in conn.execute(text("SELECT * FROM cc10_batchcontact_archives ORDER BY id"))]


def test_prune_empties_only_records_final_for_longer_than_the_retention(engine):
    rows = {add_record(engine, provider, state, age, resends=2): (provider, state, expect)
            for provider, state, age, expect in RECORDS}
    before, astercc_before = records(engine), astercc(engine)

    assert prune(engine, DAYS) == sum(expect != "kept" for _, _, expect in rows.values())

    after = records(engine)
    for row, (provider, state, expect) in rows.items():
        if expect == "kept":
            assert after[row] == before[row]
        else:   # no number, no provider id, no error text; the row id, state and resend count stay
            assert after[row] == ((provider, state, None, None, None, 2), [])
    assert astercc(engine) == astercc_before, "asterCC's tables are never touched"
    assert prune(engine, DAYS) == 0, "an emptied record is not pruned again"


def test_prune_works_in_bounded_batches(engine):
    for _ in range(25):
        add_record(engine, "accolades", S.DELIVERED, 100)
    assert prune(engine, DAYS, batch=10, max_batches=2) == 20
    assert sum(ids != [] for _, ids in records(engine).values()) == 5
    assert prune(engine, DAYS, batch=10, max_batches=2) == 5
    assert prune(engine, DAYS, batch=10, max_batches=2) == 0
    assert all(ids == [] for _, ids in records(engine).values())


def test_a_row_pruned_after_it_last_went_through_another_provider_keeps_its_resend_count(engine, monkeypatch):
    """A row went through Mobilgroup once (its request id: the row id), was resent by an operator and went
    through Accolades after a route change, and was pruned. Its next resend must still be counted as one: a
    first send again would give Mobilgroup the row id it already has, and its error 7 would read as
    "the first one arrived": `success` for a message never sent."""
    monkeypatch.setattr(store, "RESEND_AFTER_S", 0)
    row = add_record(engine, "accolades", S.DELIVERED, DAYS + 1, resends=1)
    assert prune(engine, DAYS) == 1
    with engine.begin() as conn:   # the operator's resend
        conn.execute(update(BatchContact).where(BatchContact.id == row).values(status="new"))

    assert [claimed.id for claimed in store.claim_due(engine, 10)] == [row]
    with engine.connect() as conn:
        assert conn.scalar(select(Dispatch.resends).where(Dispatch.batchcontact_id == row)) == 2


@pytest.mark.integration
def test_a_pruned_mobilgroup_row_sent_again_goes_out_under_a_new_request_id(db, mariadb_url, redis_url, celery):
    """The operator sets a long-finished row back to `new`: Mobilgroup must get a request id it never had,
    so that its answer is a real send, not error 7 read as "the first one arrived"."""
    with started(MobilgroupSimulator()) as sim:
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url,
                      SMS_MOBILGROUP_USER_ID=sim.user_id, SMS_MOBILGROUP_USER=sim.user,
                      SMS_MOBILGROUP_PASSWORD=sim.password, SMS_DISPATCH_INTERVAL_S=1,
                      SMS_MOBILGROUP_IDENTICAL_S=0)  # the resend repeats the first send at once
        row = insert_rows(db, [(NUMBER, "Your appointment is tomorrow")])[0]
        celery("worker", env, "-c", "2")
        celery("beat", env)
        wait_until(lambda: rows_by_id(db)[row]["status"] == "success", 60, what="the first send")
        with db.begin() as conn:   # delivered, long ago
            conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row).values(
                state=S.DELIVERED, poll_at=None, updated_at=db_clock(db) - timedelta(days=DAYS + 1)))
        assert prune(db, DAYS) == 1
        with db.begin() as conn:   # the operator's resend
            conn.execute(update(BatchContact).where(BatchContact.id == row).values(status="new"))

        def second_send():
            sends = [e for e in sim.events("send") if e["phone"] == NUMBER]
            return sends if len(sends) == 2 else None

        sends = wait_until(second_send, 60, what="the resend to reach Mobilgroup")
        wait_until(lambda: rows_by_id(db)[row]["status"] == "success", 30, what="the resend's outcome")
    assert [e["outcome"] for e in sends] == ["accepted", "accepted"], sends
    assert sends[0]["id"] == str(row) and sends[1]["id"] != sends[0]["id"]


def test_the_retention_must_outlast_the_callback_urls():
    """A pruned row sent again starts afresh: no callback URL of its earlier sends may still be accepted."""
    assert load_settings().retention_days == 90
    with pytest.raises(ConfigError, match="SMS_RETENTION_DAYS"):
        load_settings(retention_days=3)   # callback URLs live 4 days by default


@pytest.mark.integration
def test_the_retention_benchmark_runs_and_prints_its_figures():
    result = subprocess.run([sys.executable, "bench/retention.py", "--mariadb", MARIADB, "--kept", "3000",
                             "--due", "2500", "--recent", "500", "--idle-calls", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^pruned\s+2500$", result.stdout, re.M), result.stdout
    assert re.search(r"^call with nothing due \(ms\)\s+\d", result.stdout, re.M), result.stdout
