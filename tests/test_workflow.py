"""The workflow's decisions, called directly (no Celery) against real MariaDB, Redis and the Mobilgroup
simulator: what an operator sees in asterCC after each kind of trouble."""
from __future__ import annotations

import multiprocessing
import re
import threading

import pytest
from pydantic import SecretStr
from sqlalchemy import bindparam, text
from sqlalchemy.exc import OperationalError

from db import engine as db_engine
from db import store
from settings import load_settings
from simulators.mobilgroup import MobilgroupSimulator
import workflow
from providers import mobilgroup, registry
from workflow.runtime import Runtime
from tests.conftest import REDIS_PREFIX, deadlocks, insert_rows, kill_connections, rows_by_id, started

pytestmark = pytest.mark.integration


@pytest.fixture
def sim():
    with started(MobilgroupSimulator()) as simulator:
        yield simulator


@pytest.fixture
def runtime(db, mariadb_url, redis_url, sim):
    def make(**overrides) -> Runtime:
        settings = load_settings(
            database_url=mariadb_url, redis_url=redis_url, redis_prefix=REDIS_PREFIX,
            default_provider="mobilgroup", mobilgroup_url=sim.api_url, mobilgroup_user_id=sim.user_id,
            mobilgroup_user=sim.user, mobilgroup_password=sim.password,
            **{"mobilgroup_rate": 1000, "mobilgroup_identical_s": 0, **overrides})
        return Runtime(settings)

    return make


def claim(rt: Runtime) -> list[int]:
    """One dispatch tick: the row ids it put in the broker."""
    enqueued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    return enqueued


def due_now(db, *rows: int, column: str = "next_attempt_at") -> None:
    """Let time pass for `rows`: what they wait for (a retry, a pause's end) is over."""
    with db.begin() as conn:
        conn.execute(text(f"UPDATE sms_dispatch SET {column} = NOW() - INTERVAL 1 SECOND"
                          " WHERE batchcontact_id IN :rows").bindparams(bindparam("rows", expanding=True)),
                     {"rows": list(rows)})


def pause_over(db) -> None:
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_breaker SET open_until = NOW() - INTERVAL 1 SECOND"))


def test_a_blocked_account_is_paused_and_one_probe_decides_when_it_sends_again(runtime, sim, db):
    rt = runtime(account_retry_s=30, mobilgroup_max_inflight=2)
    first, second, third = insert_rows(db, [("+7 916 100-00-01", "one"), ("+7 916 100-00-02", "two"),
                                            ("+7 916 100-00-03", "three")])
    assert claim(rt) == [first, second], "more than the provider's room went to the broker"
    sim.blocked = True

    assert workflow.send_row(rt, first) == "paused"
    calls = len(sim.events("send"))
    assert workflow.send_row(rt, second) == "paused"
    assert len(sim.events("send")) == calls, "a paused account was called again"
    rows = rows_by_id(db)
    assert {rows[r]["status"] for r in (first, second, third)} == {"pending"}
    assert {rows[r]["state"] for r in (first, second, third)} == {"waiting"}
    assert claim(rt) == [], "rows were released while the account is paused"

    pause_over(db)
    probe = claim(rt)
    assert len(probe) == 1 and claim(rt) == [], "not exactly one probe"
    assert workflow.send_row(rt, probe[0]) == "paused" and len(sim.events("send")) == calls + 1
    assert claim(rt) == [], "a refused probe released the backlog"

    sim.blocked = False
    pause_over(db)
    (probe,) = claim(rt)
    assert workflow.send_row(rt, probe) == "accepted"
    rest = claim(rt)
    assert sorted(rest + [probe]) == [first, second, third]
    assert [workflow.send_row(rt, row) for row in rest] == ["accepted", "accepted"]
    assert {r["status"] for r in rows_by_id(db).values()} == {"success"}


def test_a_send_held_back_by_a_circuit_that_opened_while_it_waited_for_its_slot_keeps_no_identical_mark(
        runtime, sim, db):
    """A send waits for its rate-limit slot; meanwhile another send meets an account error and the circuit
    opens. The send waits with the paused rows and nothing leaves, so the recipient's identical-request mark
    must go back with its slot: otherwise the probe after the pause, often this very row, is held back by the
    rule (`SMS_MOBILGROUP_IDENTICAL_S`, a minute) for a request Mobilgroup never got, and each such row costs
    the paused account a tick without a probe."""
    rt = runtime(mobilgroup_rate=1, mobilgroup_identical_s=60, account_retry_s=30)
    (row,) = insert_rows(db, [("+7 916 100-00-21", "held while the circuit opened")])
    assert claim(rt) == [row]
    rt.throttle.acquire(rt.account("mobilgroup"), 1).wait()  # the next slot is about a second away
    opens = threading.Timer(0.3, lambda: (store.trip_breaker(db, "mobilgroup", 30, "Mobilgroup error 9"),
                                          rt.forget_breakers()))
    opens.start()
    try:
        assert workflow.send_row(rt, row) == "paused"
    finally:
        opens.join()
    assert sim.events("send") == [], "a send left through an open circuit"

    store.close_breaker(db, "mobilgroup")
    rt.forget_breakers()
    assert claim(rt) == [row]
    assert workflow.send_row(rt, row) == "accepted", rows_by_id(db)[row]["wait_reason"]
    assert len(sim.events("send")) == 1


def test_a_refused_login_is_probed_at_its_own_pace_and_other_credentials_probe_at_once(runtime, sim, db):
    rt = runtime(account_retry_s=5, login_retry_min_s=600, mobilgroup_max_inflight=2)
    first, second, third = insert_rows(db, [("+7 916 100-00-11", "one"), ("+7 916 100-00-12", "two"),
                                            ("+7 916 100-00-13", "three")])
    assert claim(rt) == [first, second]
    sim.password = "changed"

    assert workflow.send_row(rt, first) == "paused"
    circuit = store.breaker_states(db)["mobilgroup"]
    assert circuit.open_for_s > 590, "a refused login probed again after SMS_ACCOUNT_RETRY_S"
    assert circuit.refused_login == rt.fingerprint("mobilgroup")
    assert workflow.send_row(rt, second) == "paused" and len(sim.events("send")) == 1
    assert claim(rt) == [], "a probe of the same credentials before the pause is over"

    fixed = Runtime(rt.settings.model_copy(update={"mobilgroup_password": SecretStr("changed")}))
    (probe,) = claim(fixed)
    assert claim(fixed) == [], "more than one probe"
    assert workflow.send_row(fixed, probe) == "accepted"
    assert store.breaker_states(db)["mobilgroup"].open is False
    rest = claim(fixed)
    assert sorted(rest + [probe]) == [first, second, third]


def test_rows_of_a_paused_account_end_as_error_once_the_account_window_is_spent(runtime, sim, db):
    rt = runtime(account_retry_s=30, account_retry_window_s=3600)
    first, second = insert_rows(db, [("+7 916 100-00-01", "one"), ("+7 916 100-00-02", "two")])
    claim(rt)
    sim.blocked = True
    workflow.send_row(rt, first)
    workflow.send_row(rt, second)
    due_now(db, first, second)
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET claimed_at = NOW() - INTERVAL 2 HOUR"))

    claim(rt)

    for row in (first, second):
        after = rows_by_id(db)[row]
        assert (after["status"], after["state"]) == ("error", "error")
        assert "account problem" in after["error_msg"] and "blocked" in after["error_msg"]


def test_transient_failures_end_as_error_with_the_attempt_count_after_the_window(runtime, sim, db):
    rt = runtime(retry_window_s=0)
    (row,) = insert_rows(db, [("+7 916 100-00-03", "hello")])
    claim(rt)
    sim.fail_rate = 1.0
    assert workflow.send_row(rt, row) == "error"
    assert rows_by_id(db)[row]["status"] == "error"
    # The age is counted in whole seconds of the database's clock: 0, or 1 when a second boundary fell between.
    assert re.fullmatch(r"Mobilgroup answered HTTP 503 \(gave up after 1 failed attempts in [01] s\)",
                        rows_by_id(db)[row]["error_msg"])


def test_the_retry_window_counts_from_the_claim(runtime, sim, db):
    rt = runtime(retry_window_s=3600, retry_base_s=1, retry_max_s=1)
    young, old = insert_rows(db, [("+7 916 100-00-05", "hello"), ("+7 916 100-00-06", "hello")])
    claim(rt)
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET claimed_at = NOW() - INTERVAL 2 HOUR"
                          " WHERE batchcontact_id = :row"), {"row": old})
    sim.fail_rate = 1.0
    assert workflow.send_row(rt, young) == "retry"
    assert workflow.send_row(rt, old) == "error"


def test_a_transient_failure_inside_the_window_waits_in_the_database_then_succeeds(runtime, sim, db):
    rt = runtime(retry_base_s=0.1, retry_max_s=0.2)
    (row,) = insert_rows(db, [("+7 916 100-00-04", "hello")])
    claim(rt)
    sim.fail_rate = 1.0
    assert workflow.send_row(rt, row) == "retry"
    sim.fail_rate = 0.0
    due_now(db, row)
    claim(rt)
    assert workflow.send_row(rt, row) == "accepted"
    assert rows_by_id(db)[row]["status"] == "success" and rows_by_id(db)[row]["attempts"] == 2


def test_a_duplicated_task_is_a_no_op(runtime, sim, db):
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-05", "hello")])
    claim(rt)
    assert workflow.send_row(rt, row) == "accepted"
    assert workflow.send_row(rt, row) == "skipped"
    assert len(sim.events("send")) == 1


def test_a_provider_whose_reports_carry_our_reference_gets_its_id_recorded_but_not_indexed(runtime, sim, db):
    """Mobilgroup's status answers name our request id, so its ids need no lookup table (SMPP's do:
    test_providers_e2e): one statement less per message."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-09", "hello")])
    claim(rt)
    assert workflow.send_row(rt, row) == "accepted"
    with db.connect() as conn:
        recorded = conn.execute(text("SELECT provider_message_id FROM sms_dispatch WHERE batchcontact_id = :i"),
                                {"i": row}).scalar()
        indexed = conn.execute(text("SELECT COUNT(*) FROM sms_message_ids")).scalar()
    assert (recorded, indexed) == (str(row), 0)


def _claim_all(url: str, batch: int, barrier) -> list[int]:
    from db.engine import engine_for

    engine = engine_for(url)
    barrier.wait(timeout=20)
    won: list[int] = []
    while got := store.claim_due(engine, batch):
        won.extend(c.id for c in got)
    return won


def test_dispatchers_racing_in_four_processes_never_claim_a_row_twice(db, mariadb_url):
    ids = insert_rows(db, [(f"+7 916 3{i % 100:02d}-{i // 100:02d}-00", f"m{i}") for i in range(800)])
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(4) as pool:
        barrier = manager.Barrier(4)
        results = [pool.apply_async(_claim_all, (mariadb_url, batch, barrier)) for batch in (30, 70, 110, 800)]
        claimed = [r.get(timeout=120) for r in results]
    everything = [row for won in claimed for row in won]
    assert sorted(everything) == sorted(ids), "a row was claimed twice or not at all"
    assert rows_by_id(db)[ids[0]]["status"] == "pending"


def test_an_operator_resend_of_a_finished_row_is_sent_again(runtime, sim, db, monkeypatch):
    monkeypatch.setattr(store, "RESEND_AFTER_S", 0)
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-06", "hello")])
    claim(rt)
    assert workflow.send_row(rt, row) == "accepted"
    with db.begin() as conn:
        conn.execute(text("UPDATE cc10_batchcontacts SET status = 'new' WHERE id = :i"), {"i": row})
    assert claim(rt) == [row]
    assert workflow.send_row(rt, row) == "accepted"
    # A new request id: Mobilgroup would refuse the old one as "already sent" and send nothing.
    assert [(e["outcome"], e["id"]) for e in sim.events("send")] == [
        ("accepted", str(row)), ("accepted", str(row + mobilgroup.RESEND_STRIDE))]
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET poll_at = NOW() WHERE batchcontact_id = :i"), {"i": row})
    assert workflow.claim_polls(rt) == [row]
    assert workflow.poll_row(rt, row) == "applied"
    assert sim.events("status")[-1]["id"] == str(row + mobilgroup.RESEND_STRIDE)
    assert rows_by_id(db)[row]["state"] == "delivered"


def test_a_status_poll_that_fails_is_asked_again_later(runtime, sim, db):
    rt = runtime(mobilgroup_poll_after_s=0, retry_max_s=1)
    (row,) = insert_rows(db, [("+7 916 100-00-07", "hello")])
    claim(rt)
    workflow.send_row(rt, row)
    assert workflow.claim_polls(rt) == [row]
    sim.fail_rate = 1.0
    assert workflow.poll_row(rt, row) == "retry"
    sim.fail_rate = 0.0
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET poll_at = NOW() WHERE batchcontact_id = :i"), {"i": row})
    assert workflow.claim_polls(rt) == [row]
    assert workflow.poll_row(rt, row) == "applied"
    assert rows_by_id(db)[row]["state"] == "delivered"


def test_a_status_poll_whose_login_is_refused_pauses_at_the_pace_of_refused_logins(runtime, sim, db):
    rt = runtime(mobilgroup_poll_after_s=0, account_retry_s=5, login_retry_min_s=600)
    (row,) = insert_rows(db, [("+7 916 100-00-08", "hello")])
    claim(rt)
    workflow.send_row(rt, row)
    sim.password = "changed"  # in the provider's cabinet, not yet in our settings
    assert workflow.claim_polls(rt) == [row]
    assert workflow.poll_row(rt, row) == "retry"
    circuit = store.breaker_states(db)["mobilgroup"]
    assert circuit.open and circuit.open_for_s > 590 and circuit.refused_login == rt.fingerprint("mobilgroup")
    assert sim.password not in circuit.refused_login and "demo" not in circuit.refused_login
    assert workflow.claim_polls(rt) == [], "polled on while the login is refused"
    fixed = Runtime(rt.settings.model_copy(update={"mobilgroup_password": SecretStr("changed")}))
    assert fixed.fingerprint("mobilgroup") != circuit.refused_login
    assert store.take_probe(db, "mobilgroup", 60, fixed.fingerprint("mobilgroup")), "other credentials wait"


def test_a_row_routed_to_a_provider_since_unconfigured_waits_like_an_account_problem(runtime, sim, db):
    """Its route was recorded while the provider was configured; the operator has since removed its
    settings. The row waits (and alerts) as for a blocked account, then ends as `error`, never stuck."""
    (row,) = insert_rows(db, [("+7 916 100-00-10", "hello")])
    claim(runtime())
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET provider = 'ozeki' WHERE batchcontact_id = :i"), {"i": row})

    assert workflow.send_row(runtime(account_retry_s=30), row) == "paused"
    assert (rows_by_id(db)[row]["status"], rows_by_id(db)[row]["state"]) == ("pending", "waiting")

    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET claimed_at = NOW() - INTERVAL 2 HOUR"))
    claim(runtime(account_retry_window_s=3600))
    assert rows_by_id(db)[row]["status"] == "error"
    assert "ozeki is not configured" in rows_by_id(db)[row]["error_msg"]


def test_a_task_for_a_row_that_waits_is_a_no_op(runtime, sim, db):
    """A task that comes early or twice (a worker's clock behind another's, a duplicate) for a row that waits
    in the database sends nothing: only the tick that releases the row decides when it goes."""
    rt = runtime(retry_base_s=60, retry_max_s=60)
    (row,) = insert_rows(db, [("+7 916 100-00-11", "hello")])
    claim(rt)
    sim.fail_rate = 1.0
    assert workflow.send_row(rt, row) == "retry"

    assert workflow.send_row(rt, row) == "skipped"
    assert claim(rt) == [], "a row was released before it was due"
    after = rows_by_id(db)[row]
    assert (after["state"], after["attempts"]) == ("waiting", 1), "it was sent early"


def test_a_refused_status_query_keeps_success_and_stops_polling(runtime, sim, db):
    """Mobilgroup's "no request with this id" is about the status request, not the message: asterCC keeps
    `success` (never `failed` on no evidence), and the row is not asked about again."""
    rt = runtime(mobilgroup_poll_after_s=0)
    (row,) = insert_rows(db, [("+7 916 100-00-09", "hello")])
    claim(rt)
    assert workflow.send_row(rt, row) == "accepted"
    with db.begin() as conn:  # the poll now asks about a request id the provider never had
        conn.execute(text("UPDATE sms_dispatch SET resends = 1 WHERE batchcontact_id = :i"), {"i": row})
    assert workflow.claim_polls(rt) == [row]

    assert workflow.poll_row(rt, row) == "unconfirmed"

    assert sim.events("status")[-1]["outcome"] == "error 12"
    after = rows_by_id(db)[row]
    assert (after["status"], after["error_msg"], after["state"]) == ("success", "", "unconfirmed")
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET poll_at = NOW() WHERE batchcontact_id = :i"), {"i": row})
    assert workflow.claim_polls(rt) == []


def test_an_accepted_send_is_recorded_through_a_database_hiccup(runtime, sim, db, monkeypatch):
    """The provider has the message: losing the record would make the row look lost and send it twice."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-08", "hello")])
    claim(rt)
    real = store.record_accepted
    failures = iter([True, True, False])

    def flaky(*args, **kwargs):
        if next(failures):
            raise OperationalError("UPDATE …", {}, Exception("MySQL server has gone away"))
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "record_accepted", flaky)
    assert workflow.send_row(rt, row) == "accepted"
    assert rows_by_id(db)[row]["status"] == "success"
    assert len(sim.events("send")) == 1


def test_a_send_picked_as_deadlock_victim_goes_ahead(runtime, sim, db):
    """Under load InnoDB picks a send's lease update as a deadlock victim now and then (seen in
    bench/e2e.py); the send must run again at once, not fail its task and wait ten minutes for the reaper."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-09", "hello")])
    claim(rt)
    with deadlocks(db, "sms_dispatch", times=2) as left:
        assert workflow.send_row(rt, row) == "accepted"
        assert left() == 0, "the trigger never fired: the test proved nothing"
    assert rows_by_id(db)[row]["status"] == "success"
    assert len(sim.events("send")) == 1


def test_a_send_that_stays_deadlocked_runs_again_soon(runtime, sim, db):
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-10", "hello")])
    claim(rt)
    with deadlocks(db, "sms_dispatch", times=store.DEADLOCK_RETRIES):
        outcome = workflow.send_row(rt, row)
    assert isinstance(outcome, workflow.Retry) and outcome.delay_s == workflow.RECONNECT_RETRY_S
    assert rows_by_id(db)[row]["state"] == "queued" and not sim.events("send")
    assert workflow.send_row(rt, row) == "accepted"


def test_a_send_that_meets_a_dead_database_connection_runs_again_soon(runtime, sim, db, mariadb_url, monkeypatch):
    """After a MariaDB restart, a connection used a moment ago is not pinged (db/engine.py): the send meets it
    dead. Nothing was sent yet, so it is retried in seconds on a new connection, not left to the reaper."""
    monkeypatch.setattr(db_engine, "PING_IDLE_S", 3600.0)
    rt = runtime()
    earlier, row = insert_rows(db, [("+7 916 100-00-14", "before"), ("+7 916 100-00-13", "hello")])
    claim(rt)
    db.dispose()  # and the send's pool with it: earlier tests' connections, some never to be used, are gone
    assert workflow.send_row(rt, earlier) == "accepted"  # the one connection the send's pool holds now
    kill_connections(mariadb_url)

    outcome = workflow.send_row(rt, row)
    assert isinstance(outcome, workflow.Retry) and outcome.delay_s == workflow.RECONNECT_RETRY_S
    assert len(sim.events("send")) == 1
    assert workflow.send_row(rt, row) == "accepted"
    db.dispose()  # the test's own pooled connection was killed too, and nothing pings it
    assert rows_by_id(db)[row]["status"] == "success" and len(sim.events("send")) == 2


def test_rows_whose_dispatch_died_between_claim_and_route_are_routed_by_the_reaper(runtime, sim, db):
    """A dispatch killed (or cut off from the database) after claiming rows and before routing them left
    them unsendable for ever; the one still `new` in asterCC also took the head of every later claim."""
    rt = runtime()
    routed_never, claimed_only, fresh = insert_rows(db, [("+7 916 100-00-11", "one"), ("+7 916 100-00-12", "two"),
                                                         ("+7 916 100-00-13", "three")])
    assert [c.id for c in store.claim_due(rt.engine, 1)] == [routed_never]     # both steps of the claim
    assert store._record_claims(rt.engine, 1, "a-dispatch-that-died")           # only the first
    assert claim(rt) == [fresh], "a stranded row was claimed again, or held up the claim"
    assert workflow.reap_rows(rt) == 0, "reaped inside the grace time"

    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET updated_at = NOW() - INTERVAL 61 SECOND"
                          " WHERE provider IS NULL"))
    assert workflow.reap_rows(rt) == 2
    assert workflow.reap_rows(rt) == 0, "routed twice"
    enqueued = claim(rt)
    assert sorted(enqueued) == [routed_never, claimed_only]
    assert [workflow.send_row(rt, row) for row in enqueued + [fresh]] == ["accepted"] * 3
    assert {r["status"] for r in rows_by_id(db).values()} == {"success"}


def test_error_7_for_another_number_is_not_taken_for_our_send(runtime, sim, db):
    """Another sender on the account (a staging copy without its own SMS_MOBILGROUP_ID_PREFIX) already used
    our row's request id: Mobilgroup answers error 7 "already sent", and the status request shows that
    request went to another number. The row must not show `success` for a message never sent."""
    from providers.base import OutgoingMessage
    from providers.mobilgroup import MobilgroupClient

    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-21", "hello")])
    other = MobilgroupClient(url=sim.api_url, user_id=sim.user_id, user=sim.user, password=sim.password)
    other.send(OutgoingMessage(reference=row, recipient="79161009999", text="staging"))
    other.close()
    claim(rt)

    assert workflow.send_row(rt, row) == "failed"
    after = rows_by_id(db)[row]
    assert after["status"] == "failed" and "SMS_MOBILGROUP_ID_PREFIX" in after["error_msg"]


def test_error_7_for_our_own_earlier_attempt_is_success(runtime, sim, db):
    """Our first attempt arrived but its answer was lost: the resend's error 7 is confirmed by the status
    request (same number) and the row is `success`, sent once."""
    from providers.base import OutgoingMessage
    from providers.mobilgroup import MobilgroupClient

    rt = runtime(mobilgroup_id_prefix="42")
    (row,) = insert_rows(db, [("+7 916 100-00-22", "hello")])
    first = MobilgroupClient(url=sim.api_url, user_id=sim.user_id, user=sim.user, password=sim.password)
    first.send(OutgoingMessage(reference=registry.entry("mobilgroup").reference(rt.settings, row, 0),
                               recipient="79161000022", text="hello"))
    first.close()
    claim(rt)

    assert workflow.send_row(rt, row) == "accepted"
    assert rows_by_id(db)[row]["status"] == "success"
    assert [e["id"] for e in sim.events("send")] == [str(42 * 10**12 + row)] * 2
    assert [e["outcome"] for e in sim.events("send")] == ["accepted", "duplicate"]


def test_a_changed_mobilgroup_id_prefix_stops_the_start(db, mariadb_url):
    """The prefix is recorded at the first start; another value later would make retries look new and polls
    ask for ids Mobilgroup never had, so workers and beat refuse it, naming the variable."""
    from settings import ConfigError
    from workflow.startup import check_database as _check_database

    def start(prefix: str) -> None:
        _check_database(load_settings(database_url=mariadb_url, default_provider="mobilgroup",
                                      mobilgroup_user_id="1", mobilgroup_user="u", mobilgroup_password="p",
                                      mobilgroup_id_prefix=prefix))

    start("7")
    start("7")
    with pytest.raises(ConfigError, match="SMS_MOBILGROUP_ID_PREFIX is '8' but .* sent with '7'"):
        start("8")
