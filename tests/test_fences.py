"""Where two mechanisms meet (issue 24): leases, fencing tokens, sweeps, reports and probes, each interleaving
played on real MariaDB, Redis and the Mobilgroup simulator, its order forced with the store's own functions
or a paused thread. Each test names what it keeps from happening: a message sent twice, or a row that says
something other than what became of its message."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

import workflow
from db import store
from tests.conftest import insert_rows, rows_by_id, wait_until
from tests.test_workflow import claim, runtime, sim  # noqa: F401 - fixtures

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
