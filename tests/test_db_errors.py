"""A database error says which statement failed and why, never with what: its text reaches the worker's log,
Celery's result backend and Flower, and the statements' values are recipients, reply texts and provider ids.
Each write below is made to fail by MariaDB itself, on every attempt, from a trigger."""
from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

from db import store
from tests.conftest import deadlocks
from tests.test_store_send import due_row

RECIPIENT, REPLY, PROVIDER_ID = "+79169990011", "PIN 4821, call me back", "mg-77f1c0"


def failure_of(write) -> str:
    with pytest.raises(DBAPIError) as raised:
        write()
    message = str(raised.value)
    assert "Deadlock found (test)" in message, "the write failed for another reason than the trigger's"
    return message


def test_a_failed_route_write_does_not_quote_the_recipient(db):
    row_id = due_row(db)
    with deadlocks(db, "sms_dispatch", times=store.DEADLOCK_RETRIES):
        message = failure_of(lambda: store.assign_routes(db, {row_id: ("mobilgroup", RECIPIENT)}))
    assert RECIPIENT not in message


def test_a_failed_reply_write_does_not_quote_the_reply(db):
    row_id = due_row(db)
    with deadlocks(db, "cc10_batchcontacts", times=store.DEADLOCK_RETRIES):
        message = failure_of(lambda: store.record_reply(db, row_id, REPLY))
    assert REPLY not in message


def test_a_failed_record_of_a_send_does_not_quote_the_provider_s_id(db):
    """The send's record goes to MariaDB as one packet, outside SQLAlchemy's execution (`db.packet.in_one_trip`)."""
    row_id = due_row(db)
    job = store.begin_send(db, row_id, 300)
    with deadlocks(db, "cc10_batchcontacts", times=store.DEADLOCK_RETRIES):
        message = failure_of(lambda: store.record_accepted(db, row_id, job.token, [PROVIDER_ID], 1, 600,
                                                           provider="mobilgroup", index_ids=True))
    assert PROVIDER_ID not in message
