"""Issue 24, item 7: our own timers (leases, backoffs, the account circuit, retry windows) run on UTC, so a
daylight-saving change on a MariaDB server that keeps local time moves none of them; asterCC's due times,
which are local, are still judged by the local clock.

The change is played as it reaches the dispatcher: connections made after it read `NOW()` an hour later
(here: a session time zone an hour ahead of the first one's), while `UTC_TIMESTAMP()` goes on.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, insert, select, text
from sqlalchemy.pool import NullPool

from db import store
from db.models import BatchContact, BatchContactArchive, Dispatch
from tests.conftest import ROOT
from tests.test_store_send import due_row

LEASE_S = 300


def shifted(url: str, zone: str):
    """An engine on the same database whose connections keep local time in `zone`."""
    engine = create_engine(url, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _zone(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET time_zone = '{zone}'")
        cursor.close()

    return engine


@pytest.fixture
def before_and_after(db, mariadb_url):
    """(engine before the change, engine after it): local time +00:00, then +01:00."""
    before, after = shifted(mariadb_url, "+00:00"), shifted(mariadb_url, "+01:00")
    yield before, after
    before.dispose()
    after.dispose()


def test_an_hour_forward_expires_no_lease_in_flight(before_and_after):
    before, after = before_and_after
    row_id = due_row(before)
    job = store.begin_send(before, row_id, LEASE_S)
    assert job is not None
    resent, ended = store.expire_leases(after, "mobilgroup", resend=True, limit=10)
    assert (resent, ended) == (0, [])
    with after.connect() as conn:
        assert conn.scalar(select(Dispatch.state).where(Dispatch.batchcontact_id == row_id)) == "sending"


def test_an_hour_forward_ends_no_wait_and_no_account_pause_early(before_and_after):
    before, after = before_and_after
    row_id = due_row(before)
    job = store.begin_send(before, row_id, LEASE_S)
    assert store.wait_again(before, row_id, job.token, 600, "provider busy", "retry")
    assert store.trip_breaker(before, "mobilgroup", 600, "account blocked")
    assert store.release_waiting(after, "mobilgroup", 10, 30) == []
    breaker = store.breaker_states(after)["mobilgroup"]
    assert breaker.open and breaker.open_for_s > 500


def test_asterccs_local_due_times_follow_the_local_clock(before_and_after):
    """A row asterCC scheduled for 30 minutes from now, in the local time it writes, is due once the local
    clock has moved an hour forward (that is what asterCC's operator sees on the wall)."""
    before, after = before_and_after
    with before.begin() as conn:
        archive = conn.execute(insert(BatchContactArchive).values(archivetype="sms", content="hi")).inserted_primary_key[0]
        local_now = conn.scalar(text("SELECT NOW()"))
        conn.execute(insert(BatchContact).values(
            batchcontact_archive_id=archive, target="+7 916 100-00-09", status="new", creby="agent",
            schedulertime=local_now + timedelta(minutes=30), created=datetime.now(), error_msg="", responsenote=""))
    assert store.claim_due(before, 10) == []
    assert len(store.claim_due(after, 10)) == 1


def test_the_upgrade_moves_records_written_in_local_time_to_utc(tmp_path):
    """A database whose server keeps local time (here SQLite on a host in Bucharest, UTC+2 in December):
    the times our records held before the upgrade were local, and are UTC after it; an emptied record keeps
    its mark."""
    url = f"sqlite:///{tmp_path / 'sms.db'}"
    script = (
        "import sys\n"
        "from sqlalchemy import create_engine, text\n"
        "from db import schema\n"
        "url, step = sys.argv[1], sys.argv[2]\n"
        "if step == 'old':\n"
        "    schema.upgrade(url, '0005')\n"
        "    with create_engine(url).begin() as conn:\n"
        "        for row_id, lease in ((1, '2026-12-07 12:00:00'), (2, '1970-01-02 00:00:00')):\n"
        "            conn.execute(text(\"INSERT INTO sms_dispatch (batchcontact_id, claim_token, state, attempts, failures,\"\n"
        "                \" unknowns, polls, parts, resends, lease_until, updated_at, created_at)\"\n"
        "                \" VALUES (:i, 'x', 'sending', 1, 0, 0, 0, 1, 0, :t, :t, :t)\"), {'i': row_id, 't': lease})\n"
        "else:\n"
        "    schema.upgrade(url)\n"
    )
    env = {**os.environ, "TZ": "Europe/Bucharest"}
    for step in ("old", "new"):
        subprocess.run([sys.executable, "-c", script, url, step], cwd=ROOT, env=env, check=True, timeout=60)
    with create_engine(url).connect() as conn:
        rows = dict(conn.execute(text("SELECT batchcontact_id, updated_at FROM sms_dispatch")).all())
    assert rows == {1: "2026-12-07 10:00:00", 2: "1970-01-02 00:00:00"}
