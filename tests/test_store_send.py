"""The send's own reads and writes (`db.store.begin_send`, `db.store.record_accepted`), on MariaDB, where each
goes to the server as one packet of statements, and on SQLite (the embedded default): what asterCC shows
afterwards, that a packet that fails part-way leaves nothing half done, and what an operator's resend leaves
of the earlier send."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import insert, select, text, update

from db import store
from db.models import BatchContact, BatchContactArchive, Dispatch, MessageId
from tests.conftest import deadlocks

LEASE_S = 300


@pytest.fixture(params=["db", "sqlite_db"])
def engine(request):
    return request.getfixturevalue(request.param)


def due_row(engine, target: str = "+7 916 100-00-01", body: str = "hello",
            provider: str = "mobilgroup") -> int:
    """An asterCC row that fell due a minute ago, claimed and routed to `provider` as a dispatch tick does."""
    with engine.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content=body)).inserted_primary_key[0]
        row_id = conn.execute(insert(BatchContact).values(
            batchcontact_archive_id=archive, target=target, status="new", creby="agent",
            schedulertime=datetime.now() - timedelta(minutes=1), created=datetime.now(), error_msg="",
            responsenote="")).inserted_primary_key[0]
    claim_and_route(engine, provider)
    return row_id


def claim_and_route(engine, provider: str = "mobilgroup") -> None:
    """Claim, route and release to the broker, as a dispatch tick does."""
    claimed = store.claim_due(engine, 10)
    assert claimed, "nothing was due"
    store.assign_routes(engine, {row.id: (provider, "+79161000001") for row in claimed})
    assert store.release_waiting(engine, provider, 10, 30)


def state(engine, row_id: int) -> dict:
    with engine.connect() as conn:
        row = conn.execute(
            select(BatchContact.status, BatchContact.error_msg, BatchContact.contacttime, Dispatch.state,
                   Dispatch.attempts, Dispatch.resends, Dispatch.provider_message_id, Dispatch.parts,
                   Dispatch.poll_at)
            .join(Dispatch, Dispatch.batchcontact_id == BatchContact.id).where(BatchContact.id == row_id)).one()
        indexed = conn.scalars(select(MessageId.provider_message_id).where(MessageId.batchcontact_id == row_id)
                               .order_by(MessageId.provider_message_id)).all()
    return {**row._asdict(), "indexed": indexed}


def test_a_row_is_taken_once_and_the_provider_s_answer_is_what_asterCC_shows(engine):
    row_id = due_row(engine, body="Your order is ready")

    job = store.begin_send(engine, row_id, LEASE_S)
    assert (job.provider, job.recipient, job.text, job.token, job.resends) == (
        "mobilgroup", "+79161000001", "Your order is ready", 1, 0)
    assert store.begin_send(engine, row_id, LEASE_S) is None, "a second task took a leased row"

    assert store.record_accepted(engine, row_id, job.token, ["m-1", "m-2"], 2, 600, provider="smsc", index_ids=True)

    after = state(engine, row_id)
    assert (after["status"], after["error_msg"], after["state"]) == ("success", "", "accepted")
    assert after["contacttime"] is not None and after["poll_at"] is not None
    assert (after["provider_message_id"], after["parts"], after["indexed"]) == ("m-1,m-2", 2, ["m-1", "m-2"])
    assert store.begin_send(engine, row_id, LEASE_S) is None, "an accepted row was taken again"


def test_a_report_that_arrived_before_the_send_was_recorded_keeps_its_outcome(engine):
    row_id = due_row(engine)
    job = store.begin_send(engine, row_id, LEASE_S)
    assert store.apply_final_report(engine, row_id, delivered=False, reason="absent subscriber", resends=0)

    store.record_accepted(engine, row_id, job.token, ["m-1"], 1, None, provider="mobilgroup", index_ids=False)

    after = state(engine, row_id)
    assert (after["status"], after["error_msg"], after["state"]) == ("failed", "absent subscriber", "failed")
    assert after["contacttime"] is not None, "the contact time was not filled in"


def test_a_record_that_fails_part_way_leaves_nothing_half_done(db):
    """MariaDB: the record's statements go as one packet in one transaction. When one after the first fails,
    the server stops there with the transaction open; the connection must not go back to the pool like that
    (its next user's START TRANSACTION would commit the half, and the retry would find the row no longer
    `sending` and leave asterCC without its `success`)."""
    row_id = due_row(db)
    job = store.begin_send(db, row_id, LEASE_S)
    with deadlocks(db, "cc10_batchcontacts", times=1) as left:
        store.record_accepted(db, row_id, job.token, ["m-1"], 1, 600, provider="mobilgroup", index_ids=False)
        assert left() == 0, "asterCC's update never failed: the test proved nothing"

    after = state(db, row_id)
    assert (after["status"], after["state"], after["provider_message_id"]) == ("success", "accepted", "m-1")
    with db.connect() as conn:
        # This database's connections only: other test runs may share the server.
        assert conn.scalar(text("SELECT COUNT(*) FROM information_schema.INNODB_TRX t"
                                " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
                                " WHERE p.DB = DATABASE()")) == 0


def test_a_delivery_report_moves_the_row_forward_once(engine):
    row_id = due_row(engine)
    job = store.begin_send(engine, row_id, LEASE_S)
    store.record_accepted(engine, row_id, job.token, ["m-1"], 1, None, provider="mobilgroup", index_ids=False)

    assert store.apply_final_report(engine, row_id, delivered=True, reason="", resends=0)
    assert not store.apply_final_report(engine, row_id, delivered=False, reason="expired", resends=0), "final row moved"

    after = state(engine, row_id)
    assert (after["status"], after["error_msg"], after["state"]) == ("success", "", "delivered")


@pytest.mark.parametrize("delivered", [True, False])
def test_a_report_about_a_request_whose_answer_was_lost_finishes_the_row_ended_error(engine, delivered):
    """The send's answer never came and the row ended `error` ("may or may not have this message": the
    unknown-outcome policy, or its retry window spent); then the provider's report about that very request
    comes. It says what happened, and asterCC must show it; an `error` row whose requests never reached the
    provider is not the report's to move."""
    row_id, never_reached = due_row(engine, "+7 916 100-00-01"), due_row(engine, "+7 916 100-00-02")
    for row, unknown in ((row_id, True), (never_reached, False)):
        job = store.begin_send(engine, row, LEASE_S)
        assert store.finish_error(engine, row, "no answer", token=job.token, unknown=unknown)

    assert store.apply_final_report(engine, row_id, delivered=delivered, reason="expired", resends=0)
    after = state(engine, row_id)
    assert (after["status"], after["state"]) == (("success", "delivered") if delivered else ("failed", "failed"))
    assert not store.apply_final_report(engine, never_reached, delivered=delivered, reason="", resends=0)
    assert state(engine, never_reached)["status"] == "error"


def test_an_operator_s_resend_forgets_the_earlier_send_s_provider_ids(engine, monkeypatch):
    """smsc.ru's receipts name only its own message id, and may come late or twice: one about the send before
    an operator's resend must find no row, not finish the new send with the old outcome."""
    monkeypatch.setattr(store, "RESEND_AFTER_S", 0)
    row_id = due_row(engine, provider="smsc")
    job = store.begin_send(engine, row_id, LEASE_S)
    store.record_accepted(engine, row_id, job.token, ["first-1"], 1, None, provider="smsc", index_ids=True)
    with engine.begin() as conn:
        conn.execute(update(BatchContact).where(BatchContact.id == row_id).values(status="new"))
    claim_and_route(engine, "smsc")
    job = store.begin_send(engine, row_id, LEASE_S)
    store.record_accepted(engine, row_id, job.token, ["second-1"], 1, None, provider="smsc", index_ids=True)

    assert store.find_report_target(engine, "smsc", provider_message_id="first-1") is None
    assert store.find_report_target(engine, "smsc", provider_message_id="second-1") == \
        store.ReportTarget(row_id, "accepted", 1, job.token)


@pytest.mark.parametrize("give_up", [store.finish_error, store.finish_failed])
def test_giving_up_on_a_send_never_overwrites_a_report_s_outcome(engine, give_up):
    """A callback can say `delivered` while our own request is still timing out; when that attempt then
    ends the row (retry window spent, or a refusal), asterCC keeps what the report said."""
    row_id = due_row(engine)
    store.begin_send(engine, row_id, LEASE_S)
    assert store.apply_final_report(engine, row_id, delivered=True, reason="", resends=0)

    give_up(engine, row_id, "Mobilgroup did not answer within 10 s (gave up after 3 attempts)")

    after = state(engine, row_id)
    assert (after["status"], after["error_msg"], after["state"]) == ("success", "", "delivered")


def test_a_reply_with_an_emoji_is_recorded(engine):
    """asterCC's tables are utf8, three bytes a character at most: a four-byte one (an emoji) was refused
    by MariaDB, and smsc.ru delivered the reply again and again. Such characters are shown as U+FFFD."""
    row_id = due_row(engine)
    store.record_reply(engine, row_id, "Спасибо 👍 до завтра")
    with engine.connect() as conn:
        note = conn.scalar(select(BatchContact.responsenote).where(BatchContact.id == row_id))
    assert note == "Спасибо \ufffd до завтра"


def test_a_send_that_lost_its_lease_changes_nothing(engine):
    """Fencing: a worker whose lease ran out (a slow answer, a database outage while recording) must not
    finish or overwrite the row once another send took it under a new lease."""
    row_id = due_row(engine)
    stale = store.begin_send(engine, row_id, LEASE_S)
    with engine.begin() as conn:  # the lease runs out; the tick settles it and releases the row again
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                     .values(lease_until=datetime.now() - timedelta(seconds=1)))
    assert store.expire_leases(engine, "mobilgroup", resend=True, limit=10) == (1, [])
    assert [r.id for r in store.release_waiting(engine, "mobilgroup", 10, 30)] == [row_id]
    current = store.begin_send(engine, row_id, LEASE_S)
    assert current.token == stale.token + 1 and current.unknowns == 1

    assert not store.record_accepted(engine, row_id, stale.token, ["old"], 1, None, provider="mobilgroup",
                                     index_ids=True)
    # Nor file its provider id under the row: a receipt about that request would finish the current send.
    assert store.find_report_target(engine, "mobilgroup", provider_message_id="old") is None
    assert not store.finish_failed(engine, row_id, "stale refusal", token=stale.token)
    assert not store.wait_again(engine, row_id, stale.token, 60, "stale", "retry")
    assert state(engine, row_id)["state"] == "sending", "a stale holder moved the row"

    assert store.record_accepted(engine, row_id, current.token, ["new"], 1, None, provider="mobilgroup",
                                 index_ids=False)
    assert (state(engine, row_id)["state"], state(engine, row_id)["provider_message_id"]) == ("accepted", "new")


def test_waiting_rows_are_released_oldest_due_first_and_only_when_due(engine):
    ids = [due_row(engine) for _ in range(3)]  # each claimed and released as it is made
    jobs = [store.begin_send(engine, row_id, LEASE_S) for row_id in ids]
    for job, delay in zip(jobs, (0, 0, 600)):
        store.wait_again(engine, job.id, job.token, delay, "throttled", "throttled")

    assert [r.id for r in store.release_waiting(engine, "mobilgroup", 1, 30)] == [ids[0]], "not the oldest due first"
    assert [r.id for r in store.release_waiting(engine, "mobilgroup", 10, 30)] == [ids[1]], "a row not due yet was released"
    assert store.release_waiting(engine, "accolades", 10, 30) == [], "another provider's rows were released"


def test_a_queued_row_whose_task_was_lost_is_queued_again_ever_less_often(engine):
    """The broker lost the task (a Redis restart, a killed worker), or nobody consumes the queue: the row is
    put in the broker again after `requeue_s`, then after as long again as it has waited, so that a queue no
    worker takes holds a handful of copies an hour, not one per `requeue_s`."""
    row_id = due_row(engine)
    waits = []
    for queued_s in (31, 61, 250):
        with engine.begin() as conn:
            conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                         .values(queued_at=datetime.now() - timedelta(seconds=queued_s),
                                 next_attempt_at=datetime.now() - timedelta(seconds=1)))
        assert store.requeue_lost(engine, "mobilgroup", 30, 3600, 10) == ([row_id], 0)
        with engine.connect() as conn:
            waits.append(conn.scalar(select(Dispatch.next_attempt_at).where(Dispatch.batchcontact_id == row_id)))
        assert store.requeue_lost(engine, "mobilgroup", 30, 3600, 10) == ([], 0), "queued again before its time"
    gaps = [round((w - datetime.now()).total_seconds() / 10) * 10 for w in waits]
    assert gaps == [30, 60, 240]


def test_a_queued_row_no_worker_takes_ends_as_error_after_the_retry_window(engine):
    row_id = due_row(engine)
    with engine.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                     .values(claimed_at=datetime.now() - timedelta(hours=2),
                             next_attempt_at=datetime.now() - timedelta(seconds=1)))
    assert store.requeue_lost(engine, "mobilgroup", 30, 3600, 10) == ([], 1)
    after = state(engine, row_id)
    assert (after["status"], after["state"]) == ("error", "error")
    assert "no worker took it from queue send.mobilgroup" in after["error_msg"]


def test_a_lease_whose_answer_was_lost_is_taken_again_by_the_same_task_only(engine):
    """The lease was committed but its answer lost (the connection broke): the task's retry takes it again,
    and no other task can, nor a redelivery of the same run; without this the row waited out its lease and
    was taken for an unknown outcome."""
    row_id = due_row(engine)
    task_a, task_b = "a" * 32, "b" * 32
    first = store.begin_send(engine, row_id, LEASE_S, owner=store.lease_owner(task_a, 0))
    assert store.begin_send(engine, row_id, LEASE_S, owner=store.lease_owner(task_b, 1)) is None, \
        "another task took a held lease"
    assert store.begin_send(engine, row_id, LEASE_S, owner=store.lease_owner(task_a, 0)) is None, \
        "a redelivery took a held lease"
    again = store.begin_send(engine, row_id, LEASE_S, owner=store.lease_owner(task_a, 1))
    assert again is not None and again.token == first.token + 1
    assert not store.wait_again(engine, row_id, first.token, 0, "stale", "busy"), "the first try's token still holds"
