"""The dispatch spine end to end: asterCC rows in MariaDB → celery beat → Redis → celery workers →
the Mobilgroup simulator over HTTP → statuses back in asterCC, with real processes throughout.

What a call centre relies on: every due row is sent exactly once and ends `success` with `contacttime`;
rows scheduled later wait; invalid rows end `failed` with a reason; a provider failing 30% of requests
still gets everything; the status is asked only after the message lifetime. (A worker killed mid-batch:
`tests/test_faults.py`.)
"""
from __future__ import annotations

import time
from collections import Counter

import pytest

from simulators.mobilgroup import MobilgroupSimulator
from tests.conftest import app_env, insert_rows, rows_by_id, started, wait_until

pytestmark = pytest.mark.integration


def mobilgroup_env(db_url, broker, sim, **extra):
    settings = dict(
        SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url, SMS_MOBILGROUP_USER_ID=sim.user_id,
        SMS_MOBILGROUP_USER=sim.user, SMS_MOBILGROUP_PASSWORD=sim.password, SMS_MOBILGROUP_RATE=500,
        SMS_MOBILGROUP_IDENTICAL_S=1, SMS_DISPATCH_INTERVAL_S=1, SMS_RETRY_BASE_S=0.2, SMS_RETRY_MAX_S=1,
        SMS_MOBILGROUP_POLL_INTERVAL_S=1, SMS_MOBILGROUP_POLL_RETRY_S=2,
    )
    settings.update(extra)
    return app_env(db_url, broker, **settings)


def number(i: int) -> str:
    """Distinct Russian mobile numbers typed the way agents type them; none ends in 13 (undeliverable)."""
    return f"+7 (916) {100 + i // 10_000:03d}-{(i // 100) % 100:02d}-{50 + i % 40:02d}"


def accepted_per_id(sim) -> Counter:
    return Counter(int(e["id"]) for e in sim.events("send") if e["outcome"] == "accepted")


def test_500_due_rows_through_a_flaky_provider_are_each_sent_once(db, mariadb_url, redis_url, celery):
    sim = MobilgroupSimulator(fail_rate=0.3, seed=42, undeliverable_suffix="13")
    with started(sim):
        due = insert_rows(db, [(number(i), f"Order {i} is ready for pickup.") for i in range(500)])
        later = insert_rows(db, [(number(900 + i), f"Reminder {i}") for i in range(5)],
                            schedule_sql="NOW() + INTERVAL 12 SECOND")
        invalid = insert_rows(db, [("12", "hello"), ("+7 916 555-00-01", ""), ("+7 916 555-00-02", None),
                                   ("+7 916 555-00-03", "y" * 141), ("call me", "hello")])
        inserted_at = time.time()
        env = mobilgroup_env(mariadb_url, redis_url, sim)
        celery("worker", env, "-c", "4")
        celery("beat", env)

        def all_final():
            rows = rows_by_id(db)
            return all(r["status"] in ("success", "failed", "error") for r in rows.values()) and rows

        rows = wait_until(all_final, 150, what="every row to reach a final status")

    assert [i for i in due + later if rows[i]["status"] != "success"] == []
    assert all(rows[i]["contacttime"] is not None for i in due + later)
    sends = accepted_per_id(sim)
    assert set(sends) == set(due + later)
    assert max(sends.values()) == 1, "a message reached the provider twice"
    assert len(sim.events("fault")) > 50, "the simulator should have failed about 30% of requests"
    first_send = {int(e["id"]): e["time"] for e in sim.events("send")}
    assert min(first_send[i] for i in later) >= inserted_at + 11, "a row scheduled later was sent early"
    reasons = {i: (rows[i]["status"], rows[i]["error_msg"]) for i in invalid}
    assert reasons == {
        invalid[0]: ("failed", 'the recipient "**" is not a phone number: it is neither a valid RU number nor a '
                               "valid international one"),
        invalid[1]: ("failed", "the message text is empty"),
        invalid[2]: ("failed", "the message text is missing"),
        invalid[3]: ("failed", "the message is too long: 141 characters, at most 140 (or 64 in Unicode)"),
        invalid[4]: ("failed", 'the recipient "call me" is not a phone number: it contains letters'),
    }
    assert not any(int(e["id"]) in invalid for e in sim.events("send")), "an invalid row cost money"


def test_status_is_polled_only_after_the_lifetime_and_fails_undelivered_rows(db, mariadb_url, redis_url, celery):
    sim = MobilgroupSimulator(undeliverable_suffix="13")
    with started(sim):
        good = insert_rows(db, [(number(i), f"Code {i}") for i in range(20)])
        dead = insert_rows(db, [("+7 916 200-00-13", "Code x"), ("+7 916 200-01-13", "Code y"),
                                ("+7 916 200-02-13", "Code z")])
        env = mobilgroup_env(mariadb_url, redis_url, sim, SMS_MOBILGROUP_POLL_AFTER_S=6)
        celery("worker", env, "-c", "2")
        celery("beat", env)

        def polled_all():
            rows = rows_by_id(db)
            return all(r["state"] in ("delivered", "failed") for r in rows.values()) and rows

        rows = wait_until(polled_all, 90, what="every row's status to be polled")

    sent_at = {int(e["id"]): e["time"] for e in sim.events("send") if e["outcome"] == "accepted"}
    polled_at = {}
    for event in sim.events("status"):
        polled_at.setdefault(int(event["id"]), event["time"])
    assert set(polled_at) == set(good + dead)
    # The lifetime ends 6 s after the acceptance was recorded, by the database's clock, which counts whole
    # seconds: up to a second earlier than 6 s after the send by the simulator's.
    assert all(polled_at[i] - sent_at[i] >= 6 - 1.05 for i in polled_at), "status asked before the lifetime ended"
    assert all(rows[i]["status"] == "success" and rows[i]["state"] == "delivered" for i in good)
    for i in dead:
        assert rows[i]["status"] == "failed"
        assert rows[i]["error_msg"].startswith("not delivered")


