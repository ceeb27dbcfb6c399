"""Where two mechanisms meet (issue 24): leases, fencing tokens, sweeps, reports and probes, each interleaving
played on real MariaDB, Redis and the Mobilgroup simulator, its order forced with the store's own functions
or a paused thread. Each test names what it keeps from happening: a message sent twice, or a row that says
something other than what became of its message."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update

import workflow
from db import store
from db.models import BatchContact, Dispatch
from providers.base import DeliveryReport
from tests.conftest import insert_rows, rows_by_id, wait_until
from tests.test_store_send import LEASE_S, claim_and_route, due_row, state
from tests.test_workflow import claim, runtime, sim  # noqa: F401 - fixtures
from workflow.reports import apply_report, apply_smpp_receipt

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
    """Run 0 took the lease, but the database's answer was lost (a broken connection): its retry, run 1, takes
    the lease back at once instead of leaving the row to wait out the lease."""
    rt = runtime()
    (row,) = insert_rows(db, [("+7 916 100-00-32", "hello")])
    assert claim(rt) == [row]
    lost = store.begin_send(db, row, rt.settings.send_lease_s, workflow.lease_owner(TASK_ID, 0))
    assert lost is not None

    assert workflow.send_row(rt, row, owner=workflow.lease_owner(TASK_ID, 1),
                             retried=workflow.lease_owner(TASK_ID, 0)) == "accepted"
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
    return store.begin_send(db, row_id, LEASE_S, owner="task.1", retried="task.0")


def _queued_past_the_window(db, row_id: int) -> None:
    with db.begin() as conn:
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == row_id)
                     .values(claimed_at=datetime.now() - timedelta(hours=2),
                             next_attempt_at=datetime.now() - timedelta(seconds=1)))


def _sent_past_its_lease(db, row_id: int) -> None:
    assert store.begin_send(db, row_id, LEASE_S, owner="task.0") is not None
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
