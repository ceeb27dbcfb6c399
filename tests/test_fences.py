"""Where two mechanisms meet (issue 24): leases, fencing tokens, sweeps, reports and probes, each interleaving
played on real MariaDB, Redis and the Mobilgroup simulator, its order forced with the store's own functions
or a paused thread. Each test names what it keeps from happening: a message sent twice, or a row that says
something other than what became of its message."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

import workflow
from db import store
from db.engine import db_now_plus
from db.models import BatchContact, Breaker, Dispatch, Meta
from providers import registry
from providers.base import DeliveryReport
from settings import load_settings
from simulators.accolades import AccoladesSimulator
from simulators.mobilgroup import MobilgroupSimulator
from tests.conftest import REDIS_PREFIX, insert_rows, rows_by_id, started, wait_until
from tests.httpstub import StubServer
from tests.test_store_send import LEASE_S, claim_and_route, due_row, engine, state  # noqa: F401 - fixture
from tests.test_workflow import claim, runtime, sim  # noqa: F401 - fixtures
from workflow.reports import apply_report, apply_smpp_receipt
from workflow.runtime import Runtime
from workflow.throttle import identity_of

pytestmark = pytest.mark.integration

TASK_ID = "0f3c8a6e-4b1d-4e5f-9a7b-2c6d8e0f1a2b"


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run `fn` in a thread of its own; the list gets its result."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_a_task_redelivered_while_its_first_run_is_in_the_provider_call_is_not_sent_again(runtime, sim, db):
    """The broker hands the message out again (a prefork child lost, an unacknowledged message) while its
    first run waits for the provider: the second run has the same task id and retry number, and must find the
    row held."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-31", "hello")])
    assert claim(rt) == [row]
    sim.latency_s = 2.0
    owner = workflow.lease_owner(TASK_ID, 0)
    first, outcome = in_thread(workflow.send_row, rt, row, owner=owner)
    wait_until(lambda: rows_by_id(db)[row]["state"] == "sending", 5, 0.02, "the first run's lease")

    assert workflow.send_row(rt, row, owner=owner) == "skipped"
    first.join(10)
    assert outcome == ["accepted"]
    assert len(sim.events("send")) == 1


def test_the_retry_of_a_run_whose_lease_answer_was_lost_takes_the_lease_back(runtime, sim, db):
    """Run 0 took the lease, but the database's answer was lost (a broken connection), and runs 1 and 2 did
    not reach the database at all (it was away): run 3 takes the lease back at once instead of leaving the
    row to wait out the lease; a redelivered copy of run 0 does not."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-32", "hello")])
    assert claim(rt) == [row]
    assert store.begin_send(db, row, rt.settings.send_lease_s, workflow.lease_owner(TASK_ID, 0)) is not None

    assert workflow.send_row(rt, row, owner=workflow.lease_owner(TASK_ID, 3)) == "accepted"
    assert workflow.send_row(rt, row, owner=workflow.lease_owner(TASK_ID, 0)) == "skipped"
    assert rows_by_id(db)[row]["status"] == "success" and len(sim.events("send")) == 1


def lease_runs_out(engine, row_id: int) -> None:
    """The worker holding `row_id`'s lease hangs past it."""
    with engine.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                     .values(lease_until=datetime.now() - timedelta(seconds=1)))


def operator_resends(engine, row_id: int, provider: str = "mobilgroup") -> None:
    """An operator sets a finished row back to `new`, and a tick claims, routes and releases it."""
    with engine.begin() as conn:
        conn.execute(update(BatchContact).where(BatchContact.id == row_id).values(status="new"))
    claim_and_route(engine, provider)


def test_a_writer_left_from_before_an_operator_s_resend_cannot_move_the_resent_row(db, monkeypatch):
    """A send hangs past its lease and ends `error` (ON_UNKNOWN=error); the operator resends the row and a new
    send takes it. When the old writer wakes, its token must not match the new lease: its `wait_again` would
    put a row that is being sent back to waiting, to be sent a second time."""
    monkeypatch.setattr(store, "RESEND_AFTER_S", 0)
    row_id = due_row(db)
    old = store.begin_send(db, row_id, LEASE_S)
    lease_runs_out(db, row_id)
    assert store.expire_leases(db, "mobilgroup", resend=False, limit=10) == (0, [row_id])
    operator_resends(db, row_id)
    new = store.begin_send(db, row_id, LEASE_S)
    assert new is not None and new.resends == 1

    assert new.token > old.token, "the fencing token went back"
    assert not store.wait_again(db, row_id, old.token, 0, "throttled", "throttled")
    assert state(db, row_id)["state"] == "sending", "a writer of the earlier send moved the resent row"


def _late_queued_task(db, row_id: int):
    """A task whose message the broker only now hands out."""
    return store.begin_send(db, row_id, LEASE_S)


def _retry_after_a_lost_answer(db, row_id: int):
    """The retry of a run whose lease was taken with the database's answer lost: it takes the lease back."""
    return store.begin_send(db, row_id, LEASE_S, owner=store.lease_owner(TASK_ID, 1))


def _queued_past_the_window(db, row_id: int) -> None:
    with db.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                     .values(claimed_at=datetime.now() - timedelta(hours=2),
                             next_attempt_at=datetime.now() - timedelta(seconds=1)))


def _sent_past_its_lease(db, row_id: int) -> None:
    assert store.begin_send(db, row_id, LEASE_S, owner=store.lease_owner(TASK_ID, 0)) is not None
    lease_runs_out(db, row_id)


@pytest.mark.parametrize("setup, sweep, between, late_task", [
    (_queued_past_the_window, lambda db: store.requeue_lost(db, "mobilgroup", 30, 3600, 10), "finish_error",
     _late_queued_task),
    (_sent_past_its_lease, lambda db: store.expire_leases(db, "mobilgroup", resend=False, limit=10), "_finish",
     _retry_after_a_lost_answer),
], ids=["lost-task sweep", "lease sweep"])
def test_a_row_a_sweep_ends_as_error_is_not_being_sent(db, monkeypatch, setup, sweep, between, late_task):
    """A sweep chooses a row to end `error`; a task takes the row's lease before the sweep writes (forced:
    the task runs just before the sweep's write, where the sweep wrote after its choosing transaction). The
    row must not end `error` while that task sends it: an operator would resend it, and it would arrive twice."""
    row_id = due_row(db)
    setup(db, row_id)
    taken: list = []
    real = getattr(store, between)

    def task_first(*args, **kwargs):
        taken.append(late_task(db, row_id))
        return real(*args, **kwargs)

    monkeypatch.setattr(store, between, task_first)
    sweep(db)
    if not taken:  # the sweep wrote in its choosing transaction: the task comes after it
        taken.append(late_task(db, row_id))

    after = state(db, row_id)
    assert taken[0] is None or after["status"] != "error", "a row being sent shows error"
    assert after["status"] == "error" or after["state"] == "sending"


def test_a_send_accepted_after_the_lease_sweep_ended_it_as_error_says_success(runtime, sim, db, caplog):
    """ON_UNKNOWN=error: the send outlives its lease (a slow provider), the sweep ends the row `error`, then
    the provider accepts it. The provider has the message: asterCC says `success`, with why it had said
    `error`, and an ALERT tells the operator not to send it again."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-33", "hello")])
    assert claim(rt) == [row]
    sim.latency_s = 2.0
    sending, outcome = in_thread(workflow.send_row, rt, row)
    wait_until(lambda: rows_by_id(db)[row]["state"] == "sending", 5, 0.02, "the lease")
    lease_runs_out(db, row)
    assert store.expire_leases(db, "mobilgroup", resend=False, limit=10) == (0, [row])
    assert rows_by_id(db)[row]["status"] == "error"

    sending.join(10)
    assert outcome == ["accepted"]
    after = rows_by_id(db)[row]
    assert (after["status"], after["state"]) == ("success", "accepted")
    assert after["error_msg"] == store.ACCEPTED_AFTER_ERROR
    assert any("ALERT: row %d was marked error" % row in r.getMessage() for r in caplog.records)
    assert len(sim.events("send")) == 1


def accepted_row(db, provider: str, provider_id: str) -> int:
    """A row `provider` accepted, awaiting its report."""
    row_id = due_row(db, provider=provider)
    job = store.begin_send(db, row_id, LEASE_S)
    assert store.record_accepted(db, row_id, job.token, [provider_id], 1, None, provider=provider, index_ids=True)
    return row_id


@pytest.mark.parametrize("provider, between, report", [
    ("accolades", "find_report_target",
     lambda db, row_id: apply_report(db, "accolades", DeliveryReport("delivered", reference=row_id, resends=0))),
    ("smsc", "settle_delivered_part",
     lambda db, row_id: apply_smpp_receipt(db, "smsc", DeliveryReport("delivered", provider_message_id="p-1"))),
], ids=["webhook", "smpp receipt"])
def test_a_report_on_a_send_before_an_operator_s_resend_does_not_finish_the_resend(db, monkeypatch, provider,
                                                                                  between, report):
    """The report for the first send finds its row while the row awaits it (by our reference and the send's
    resend count, or, smsc.ru's receipts, by its message id alone); the operator's resend is claimed just
    then (forced: right after that step). Finishing the resend with that report would leave the resent
    message never sent."""
    monkeypatch.setattr(store, "RESEND_AFTER_S", 0)
    row_id = accepted_row(db, provider, "p-1")
    real = getattr(store, between)

    def resend_claimed_meanwhile(*args, **kwargs):
        found = real(*args, **kwargs)
        operator_resends(db, row_id, provider)
        return found

    monkeypatch.setattr(store, between, resend_claimed_meanwhile)
    assert report(db, row_id) != "applied"
    assert (state(db, row_id)["state"], state(db, row_id)["status"]) == ("queued", "pending")


def paused(db, rows: int, *texts: str) -> list[int]:
    """Mobilgroup's circuit open and its pause just over, `rows` rows (the first with `texts`) waiting for it."""
    store.trip_breaker(db, "mobilgroup", 60, "client blocked")
    bodies = list(texts) + ["hello"] * (rows - len(texts))
    ids = insert_rows(db, [(f"+7 916 100-01-{k:02d}", body) for k, body in enumerate(bodies)])
    with db.begin() as conn:
        conn.execute(update(Breaker).values(open_until=datetime.now() - timedelta(seconds=1)))
    return ids


def test_a_probe_whose_task_was_lost_for_longer_than_a_lease_is_still_the_only_probe(runtime, sim, db):
    """The probe's task is lost (a Redis restart) and queued again by the lost-task sweep, which waits ever
    longer; the probe's mark lasted one lease, after which a second probe went to a refusing account."""
    rt = runtime()
    probe, _ = paused(db, 2)
    assert claim(rt) == [probe]
    with db.begin() as conn:  # a lease passes, the probe's task still lost
        conn.execute(update(Breaker).values(probe_until=datetime.now() - timedelta(seconds=1)))

    assert claim(rt) == [], "a second probe went while the first was still queued"
    assert store.breaker_states(db)["mobilgroup"].probing


def test_a_probe_that_ends_before_reaching_the_provider_lets_the_next_probe_go_at_once(runtime, sim, db):
    """The probe's own text cannot be sent (Mobilgroup's check refuses a control character): nothing reached
    the account, so the next tick probes with another row, rather than leaving the provider stalled a lease."""
    rt = runtime()
    probe, other = paused(db, 2, "bell \x07")
    assert claim(rt) == [probe]
    assert workflow.send_row(rt, probe) == "failed"

    assert claim(rt) == [other]
    assert not sim.events("send")


def test_a_probe_the_provider_answers_429_lets_the_next_probe_go_at_once(runtime, db):
    """A 429 on the probe says nothing about the account: the next tick probes again, with another row."""
    with StubServer(b"", status=429, headers={"Retry-After": "30"}) as stub:
        rt = Runtime(runtime().settings.model_copy(update={"mobilgroup_url": stub.url + "/extxml.php"}))
        probe, other = paused(db, 2)
        assert claim(rt) == [probe]
        assert workflow.send_row(rt, probe) == "throttled"

        assert claim(rt) == [other]
        assert len(stub.requests) == 1


def failing_over(mariadb_url: str, redis_url: str, mobilgroup_url: str, accolades: AccoladesSimulator,
                 **settings) -> Runtime:
    """A deployment sending through Mobilgroup, failing over to Accolades."""
    return Runtime(load_settings(
        database_url=mariadb_url, redis_url=redis_url, redis_prefix=REDIS_PREFIX, default_provider="mobilgroup",
        failover="mobilgroup:accolades", mobilgroup_url=mobilgroup_url, mobilgroup_user_id="1",
        mobilgroup_user="demo", mobilgroup_password="demo", mobilgroup_identical_s=0, accolades_url=accolades.url,
        accolades_account=accolades.account, accolades_password=accolades.password, **settings))


def test_a_provider_used_only_as_a_fallback_gets_a_probe_once_its_circuit_opened(db, mariadb_url, redis_url):
    """Accolades serves only as Mobilgroup's fallback. Both circuits are open, Accolades' pause is over, and
    only Mobilgroup has rows: Accolades must get one of them to probe with, or it stays paused for good and
    failover stops without a word."""
    with started(MobilgroupSimulator()) as mobilgroup, started(AccoladesSimulator()) as accolades:
        rt = failing_over(mariadb_url, redis_url, mobilgroup.api_url, accolades)
        store.trip_breaker(db, "mobilgroup", 600, "unreachable: test")
        store.trip_breaker(db, "accolades", 0, "blocked: test")
        rows = insert_rows(db, [(f"+7 916 100-02-{k:02d}", "hello") for k in range(3)])
        sent: list[tuple[str, int]] = []
        for _ in range(2):
            workflow.dispatch_due(rt, lambda ids, provider: sent.extend((provider, i) for i in ids))

        assert [provider for provider, _ in sent] == ["accolades"], "no probe, or more than one"
        assert workflow.send_row(rt, sent[0][1]) == "accepted"
        assert not store.breaker_states(db)["accolades"].open
        workflow.dispatch_due(rt, lambda ids, provider: sent.extend((provider, i) for i in ids))
    assert sorted(i for provider, i in sent if provider == "accolades") == rows, "failover did not resume"


def test_an_accepted_send_is_recorded_however_long_the_database_is_away(runtime, sim, db, monkeypatch):
    """The provider accepts a send while the database is away, longer than half the lease (the old limit of
    the write's retries) and longer than the lease itself. The write must land once the database is back,
    and the first tick back must not take the lease for an unknown outcome and send the message again."""
    rt = runtime(send_lease_s=12, http_timeout_s=2)
    (row,) = insert_rows(db, [("+7 916 100-00-34", "hello")])
    assert claim(rt) == [row]
    away = threading.Event()
    away.set()
    tries: list[float] = []
    real = store.record_accepted

    def while_away(*args, **kwargs):
        tries.append(time.monotonic())
        if away.is_set():
            raise OperationalError("UPDATE …", {}, Exception("Can't connect to MySQL server (111)"))
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "record_accepted", while_away)
    sending, outcome = in_thread(workflow.send_row, rt, row)
    wait_until(lambda: tries and time.monotonic() - tries[0] > 8, 20, 0.2, "an outage past half the lease")
    # The outage outlasts the lease too, and no tick reached the database meanwhile.
    lease_runs_out(db, row)
    with db.begin() as conn:
        conn.execute(update(Meta).where(Meta.name == store.LEASE_CLOCK).values(value=db_now_plus(-60)))
    claim(rt)  # the database is back: the first tick runs before the write's next try
    away.clear()
    sending.join(10)

    assert outcome == ["accepted"]
    assert rows_by_id(db)[row]["status"] == "success"
    assert claim(rt) == [] and len(sim.events("send")) == 1


def test_leases_do_not_run_while_no_tick_reaches_the_database(engine):
    """On MariaDB and on SQLite (the embedded default): a tick on time leaves the leases alone; the first
    tick after a gap pushes every lease under way back by the gap, once."""
    row_id = due_row(engine)
    store.begin_send(engine, row_id, LEASE_S)
    assert store.stretch_leases(engine, 4) == 0  # the first tick starts the clock
    assert store.stretch_leases(engine, 4) == 0
    with engine.connect() as conn:
        before = conn.scalar(select(Dispatch.lease_until).where(Dispatch.batchcontact_id == row_id))
    with engine.begin() as conn:  # the last tick was 150 s ago, by the clock the ticks keep
        conn.execute(update(Meta).where(Meta.name == store.LEASE_CLOCK).values(value=db_now_plus(-150)))

    assert store.stretch_leases(engine, 4) in (150, 151)
    assert store.stretch_leases(engine, 4) == 0
    with engine.connect() as conn:
        after = conn.scalar(select(Dispatch.lease_until).where(Dispatch.batchcontact_id == row_id))
    if isinstance(after, str):  # SQLite gives text
        before, after = datetime.fromisoformat(before), datetime.fromisoformat(after)
    assert (after - before).total_seconds() in (150, 151)


def test_two_deployments_on_one_provider_account_share_its_rate_and_identical_request_rule(mariadb_url, redis_url):
    """Two deployments share a Redis, each under its own SMS_REDIS_PREFIX, and send through one Mobilgroup
    account: the account's rate and its one-identical-request-a-minute rule hold for both together."""
    deployments = [Runtime(load_settings(
        database_url=mariadb_url, redis_url=redis_url, redis_prefix=f"{REDIS_PREFIX}{name}:",
        default_provider="mobilgroup", mobilgroup_url="http://127.0.0.1:9/extxml.php", mobilgroup_user_id="1",
        mobilgroup_user="demo", mobilgroup_password="demo", mobilgroup_rate=1)) for name in ("east", "west")]
    account = deployments[0].account("mobilgroup")
    identity = identity_of("79161000035", "hello", deployments[0].identity_key("mobilgroup"))

    def acquire(rt: Runtime, **limits):
        return rt.throttle.acquire(account, 1, max_wait_s=0, **limits)

    assert acquire(deployments[0], identity=identity, identical_s=60).reserved
    assert acquire(deployments[1], identity=identity, identical_s=60).reason == "identical"
    assert acquire(deployments[1]).reason == "rate", "the second deployment got a rate of its own"


def test_a_probe_refused_with_an_error_that_could_be_about_one_message_keeps_the_circuit_open(runtime, db):
    """The circuit opened on an error that could be about one message (Mobilgroup error 6, met by three
    rows), more than 10 minutes ago. The probe meets it again: that is the account still refusing, not this
    message alone, so the circuit stays open; closing it would send a refusing account a room's worth of
    rows every pause (Accolades blacklists the address on 403.6)."""
    refusal = ('<?xml version="1.0" encoding="windows-1251"?>\n<response>\n<result>ERROR</result>\n'
               '<error>6</error>\n</response>\n').encode("windows-1251")
    with StubServer(refusal) as stub:
        rt = Runtime(runtime().settings.model_copy(update={"mobilgroup_url": stub.url + "/extxml.php"}))
        probe, _ = paused(db, 2)
        assert claim(rt) == [probe]
        assert workflow.send_row(rt, probe) == "paused"

        assert store.breaker_states(db)["mobilgroup"].open, "a refused probe closed the circuit"
        assert claim(rt) == [] and len(stub.requests) == 1


def test_a_row_whose_request_got_an_error_answer_is_not_moved_to_the_fallback(db, mariadb_url, redis_url):
    """Mobilgroup answers HTTP 503: the request left and an answer came, so Mobilgroup may have the message.
    Once Mobilgroup's circuit opens, the row must wait for Mobilgroup, not go through Accolades too."""
    with StubServer(b"busy", status=503) as stub, started(AccoladesSimulator()) as accolades:
        rt = failing_over(mariadb_url, redis_url, stub.url + "/extxml.php", accolades)
        (row,) = insert_rows(db, [("+7 916 100-00-36", "hello")])
        assert claim(rt) == [row]
        assert workflow.send_row(rt, row) == "retry"
        store.trip_breaker(db, "mobilgroup", 600, "unreachable: test")

        assert workflow.fail_over(rt, "mobilgroup", store.breaker_states(db)) == 0
    assert rows_by_id(db)[row]["provider"] == "mobilgroup"


def test_a_row_whose_answer_was_just_lost_is_not_asked_about_until_its_request_could_have_arrived(
        db, mariadb_url, redis_url):
    """A send to Mobilgroup timed out a moment ago: its request may still be on its way, so Mobilgroup's
    "no such request" now does not mean it never arrives. The row is asked about (and moved) only later."""
    with started(MobilgroupSimulator()) as mobilgroup, started(AccoladesSimulator()) as accolades:
        rt = failing_over(mariadb_url, redis_url, mobilgroup.api_url, accolades)
        (row,) = insert_rows(db, [("+7 916 100-00-37", "hello")])
        assert claim(rt) == [row]
        job = store.begin_send(db, row, LEASE_S)
        assert store.wait_again(db, row, job.token, 60, "no answer", "unknown", failed=True, unknown=True)
        store.trip_breaker(db, "mobilgroup", 600, "unreachable: test")

        assert workflow.fail_over(rt, "mobilgroup", store.breaker_states(db)) == 0
        assert not mobilgroup.events("status"), "asked while the request may be on its way"
        with db.begin() as conn:
            conn.execute(update(Dispatch).values(updated_at=datetime.now() - timedelta(minutes=2)))
        rt.confirm_asked.clear()
        assert workflow.fail_over(rt, "mobilgroup", store.breaker_states(db)) == 1
    assert rows_by_id(db)[row]["provider"] == "accolades"


def test_failover_s_status_requests_take_slots_of_the_account_s_rate(db, mariadb_url, redis_url):
    """Two rows in doubt at Mobilgroup, whose account allows one request every 10 s: failover asks about
    one of them now, and about the other only when its slot comes, as a send would wait."""
    with started(MobilgroupSimulator()) as mobilgroup, started(AccoladesSimulator()) as accolades:
        rt = failing_over(mariadb_url, redis_url, mobilgroup.api_url, accolades, mobilgroup_rate=0.1)
        rows = insert_rows(db, [(f"+7 916 100-00-{k}", "hello") for k in (38, 39)])
        assert sorted(claim(rt)) == rows
        with db.begin() as conn:  # both sends' answers were lost, long ago
            conn.execute(update(Dispatch).values(state="waiting", wait_reason="unknown", unknowns=1,
                                                 updated_at=datetime.now() - timedelta(minutes=2)))
        store.trip_breaker(db, "mobilgroup", 600, "unreachable: test")

        assert workflow.fail_over(rt, "mobilgroup", store.breaker_states(db)) == 1
        assert len(mobilgroup.events("status")) == 1


def test_the_status_request_confirming_an_error_7_waits_for_a_slot_of_the_account_s_rate(runtime, sim, db):
    """A resend is answered error 7 ("already have this request"): the status request confirming the request
    is ours is a request to Mobilgroup like any other, so it goes only when the account's rate allows one
    more (here one a second), not right after the send."""
    rt = runtime(mobilgroup_rate=1)
    (row,) = insert_rows(db, [("+7 916 100-00-40", "hello")])
    assert claim(rt) == [row]
    # The row's first request reached Mobilgroup; its answer was lost.
    reference = str(registry.entry("mobilgroup").reference(rt.settings, row, 0))
    sim.requests[reference] = {"phones": ["79161000040"], "accepted": time.time(), "due": None}

    assert workflow.send_row(rt, row) == "accepted"
    (send,), (status,) = sim.events("send"), sim.events("status")
    assert send["outcome"] == "duplicate"
    assert status["time"] - send["time"] >= 0.9, "the confirmation went without a slot of its own"
    assert rows_by_id(db)[row]["status"] == "success"


@pytest.mark.parametrize("outcome", ["accepted", "report"])
def test_an_operator_s_resend_asked_while_the_send_or_its_report_was_on_its_way_is_not_overwritten(
        runtime, sim, db, monkeypatch, outcome):
    """The operator sets a row back to `new` in asterCC while its send is in the provider call, or once it
    was accepted but before its delivery report lands: our outcome must not overwrite that `new`, or asterCC
    shows `success` as if the resend had gone, and it never goes. The row is claimed again once its record
    is final, and sent again."""
    monkeypatch.setattr(store, "RESEND_AFTER_S", 0)
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-36", "hello")])
    assert claim(rt) == [row]

    def reset():
        with db.begin() as conn:
            conn.execute(update(BatchContact).where(BatchContact.id == row).values(status="new"))

    if outcome == "accepted":
        sim.latency_s = 1.0
        sending, result = in_thread(workflow.send_row, rt, row)
        wait_until(lambda: rows_by_id(db)[row]["state"] == "sending", 5, 0.02, "the send's lease")
        reset()
        sending.join(10)
        sim.latency_s = 0
        assert result == ["accepted"]
    else:
        assert workflow.send_row(rt, row) == "accepted"
        reset()
        assert store.apply_final_report(db, row, delivered=True, reason="", resends=0)
    assert rows_by_id(db)[row]["status"] == "new", "the operator's resend was overwritten"
    assert claim(rt) == [row], "the resend was not claimed"
    assert workflow.send_row(rt, row) == "accepted"
    assert len(sim.events("send")) == 2 and rows_by_id(db)[row]["status"] == "success"


def accepted_and_due_for_polling(rt: Runtime, db, target: str) -> int:
    """A row Mobilgroup accepted whose status poll is due now."""
    (row,) = insert_rows(db, [(target, "hello")])
    assert claim(rt) == [row] and workflow.send_row(rt, row) == "accepted"
    with db.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row).values(poll_at=db_now_plus(-1)))
    return row


def test_a_status_poll_of_a_send_the_operator_resent_elsewhere_leaves_the_resend_alone(runtime, sim, db):
    """A Mobilgroup row's poll is claimed; meanwhile the operator sends it again and the resend is accepted
    by another provider (failover, a route change). The poll, run late, must not ask Mobilgroup about a
    request it never got and mark the resend unconfirmed; nor may an answer to the earlier send, on its way
    as the resend is accepted, schedule polls on the resend that nothing would ever end."""
    rt = runtime()
    row = accepted_and_due_for_polling(rt, db, "+7 916 100-00-37")
    assert workflow.claim_polls(rt) == [row]
    with db.begin() as conn:  # the resend, claimed, moved to Accolades and accepted there
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row)
                     .values(resends=1, provider="accolades", routed_provider="mobilgroup", poll_at=None))

    assert workflow.poll_row(rt, row) == "skipped"
    assert sim.events("status") == [], "Mobilgroup was asked about a request it never got"
    assert not store.poll_again(db, row, 60, 5, resends=0), "the earlier send's answer scheduled a poll"
    store.stop_polling(db, row, "status unknown", resends=0)
    with db.connect() as conn:
        state, poll_at = conn.execute(select(Dispatch.state, Dispatch.poll_at)
                                      .where(Dispatch.batchcontact_id == row)).one()
    assert (state, poll_at) == ("accepted", None)


def test_two_pollers_at_once_never_both_ask_about_one_row(runtime, sim, db):
    """Two beat ticks' poll claims overlap (two housekeeping threads, or two beats for a moment): the one
    that did not push a row's poll time must not return it, or Mobilgroup is asked twice about one message,
    where its document asks to be asked once."""
    rt = runtime()
    row = accepted_and_due_for_polling(rt, db, "+7 916 100-00-38")
    first = db.connect()
    first_claim = first.begin()  # the first poller has pushed the row's poll time, not yet committed
    first.execute(update(Dispatch).where(Dispatch.batchcontact_id == row).values(poll_at=db_now_plus(300)))
    commits = threading.Timer(0.5, first_claim.commit)
    commits.start()
    try:
        assert store.claim_due_polls(db, "mobilgroup", 10, 300) == []
    finally:
        commits.join()
        first.close()
