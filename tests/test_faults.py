"""Deploys, crashes and outages (issue 17) with real processes: MariaDB, Redis, `celery worker` and `celery
beat` subprocesses, the Accolades simulator, and a loopback proxy (`simulators.proxy`) standing in for a
restarting Redis or MariaDB. The scenarios are `bench/fault_scenarios.py`'s, at small sizes; `bench/faults.py`
runs them larger and prints the figures.

What a call centre relies on: whatever happens to a worker, Redis or the database, no message is lost, none
reaches the recipient twice unless its request was on the wire when a worker died, and sending resumes
within seconds of the fault's end, not after `SMS_REQUEUE_AFTER_S`. Each test waits until every row is
settled; the workers' and beat's logs are in the test's `tmp_path`.
"""
from __future__ import annotations

import pytest

from bench import fault_scenarios as scenarios
from tests.conftest import REDIS_PREFIX, app_env

pytestmark = pytest.mark.integration


@pytest.fixture
def stage(db, mariadb_url, redis_url, celery, tmp_path):
    return scenarios.Stage(db, mariadb_url, redis_url, REDIS_PREFIX, app_env, celery, tmp_path)


def report(run: scenarios.FaultRun) -> str:
    return (f"{run.scenario}: {len(run.lost)} lost, {len(run.doubled)} sent twice, {len(run.in_flight)} in "
            f"flight, {len(run.held)} queued and {len(run.waiting)} waiting at the fault, {len(run.unknown)} "
            f"settled as unknown outcomes ({run.unknown[:10]}), resumed after {run.resumed_s} s, settled "
            f"{run.rest_s:.1f} s after the fault's end; logs: {run.logs}")


def test_a_deploy_mid_batch_sends_every_message_exactly_once(stage):
    """SIGTERM to the worker while a batch goes to a provider answering in 3 s, SIGKILL 10 s later if it is
    still alive (`docker compose up -d`), then a new worker: the old one finishes its calls and hands back
    the rest, so every message reaches Accolades exactly once."""
    run = scenarios.deploy(stage, rows=150, latency_s=3.0)
    print(report(run))
    assert run.lost == [], report(run)
    assert run.doubled == [], report(run)
    assert len(run.in_flight) > 0, "the deploy came when nothing was being sent"
    assert run.sent_before_back < run.rows, "the batch was over before the deploy"


def test_a_crash_mid_batch_loses_nothing_and_resends_only_what_was_on_the_wire(stage):
    """SIGKILL to the worker mid-batch, a new worker at once. Only `SMS_SEND_LEASE_S` is shortened (15 s for
    180, and with it the provider's deadline, 5 s for 15), and the identical-request rule their repeats wait
    out (10 s for 60), so the killed sends settle in test time: no message is lost; only rows whose send was under way at the
    kill may reach the provider twice; the rows not yet in a call (held by the dead worker, in the broker, or
    waiting in the database) are sent within a minute; every row is settled within the lease plus a minute of
    the kill."""
    lease_s = 15
    run = scenarios.crash(stage, rows=150, latency_s=3.0, lease_s=lease_s, identical_s=10)
    print(report(run))
    assert run.lost == [], report(run)
    assert set(run.doubled) <= set(run.in_flight), report(run)
    not_started = run.held + run.waiting
    assert not_started, "every row was in a call or done at the kill"
    late = {i: round(s, 1) for i, s in run.first_send_after_fault(not_started).items() if s > 60}
    assert late == {}, f"rows not yet in a call at the kill sent over a minute later: {late}; {report(run)}"
    assert run.settled_at - run.fault_at <= lease_s + 60, report(run)


def test_redis_cut_off_and_emptied_mid_batch_loses_nothing_and_sending_resumes(stage):
    """Redis (broker and rate limiter) unreachable for 15 s mid-batch and emptied meanwhile, as a restart
    without persistence: nothing is lost, sending resumes within 30 s of Redis coming back, and the rest of
    the batch takes no longer than its rate allows plus 30 s."""
    rate = 40
    run = scenarios.redis_loss(stage, rows=600, rate=rate, outage_s=15)
    print(report(run))
    assert run.lost == [], report(run)
    assert run.resumed_s is not None and run.resumed_s <= 30, report(run)
    assert run.rest_s <= (run.rows - run.sent_before_back) / rate + 30, report(run)


def test_mariadb_cut_off_mid_batch_loses_and_doubles_nothing_and_sending_resumes(stage):
    """MariaDB refusing the workers and beat for 30 s mid-batch (their connections reset, new ones refused):
    nothing lost, nothing sent twice, sending resumes within 30 s of the database coming back. No row is
    taken for an unknown outcome either: every request that left got its answer, so none may be counted as
    "may have been sent" (with `SMS_<P>_ON_UNKNOWN=error` it would end `error` unsent), nor wait out its
    send lease (180 s) before it goes."""
    rate = 40
    run = scenarios.database_loss(stage, rows=600, rate=rate, outage_s=30, timeout_s=90)
    print(report(run))
    assert run.lost == [], report(run)
    assert run.doubled == [], report(run)
    assert run.resumed_s is not None and run.resumed_s <= 30, report(run)
    assert run.unknown == [], report(run)
    assert run.rest_s <= (run.rows - run.sent_before_back) / rate + 30, report(run)


def test_mariadb_gone_longer_than_half_a_lease_with_sends_in_flight_sends_nothing_twice(stage):
    """Issue 24, item 4, shortened from `bench/faults.py`'s 150 s: MariaDB away for 20 s while sends to a
    provider answering in 2 s are in flight, with the send lease at 30 s (so the outage outlasts half of
    it): every accepted send is recorded once the database is back, none is sent again, and every row ends
    `success`."""
    run = scenarios.database_loss(stage, rows=80, latency_s=2.0, rate=20, outage_s=20, timeout_s=240,
                                  name="MariaDB 20 s", SMS_SEND_LEASE_S=30, SMS_HTTP_TIMEOUT_S=5)
    print(report(run))
    assert run.in_flight, "nothing was being sent when the database went"
    assert run.lost == [], report(run)
    assert run.doubled == [], report(run)
    assert run.not_success == {}, report(run)


@pytest.mark.alone  # it changes the server's global time zone for a moment: nothing else may run beside it
def test_the_database_clock_an_hour_forward_mid_batch_sends_every_row_once_and_each_succeeds(stage):
    """Issue 24, item 7: the database's local clock jumps an hour forward mid-batch (its time zone offset
    changes and its connections reset, as a daylight-saving change on a server that keeps local time does),
    with sends in flight at a provider answering in 2 s: no lease runs out early, no row is sent twice or
    ends otherwise than `success`."""
    run = scenarios.clock_jump(stage, rows=80, latency_s=2.0, rate=20, timeout_s=240)
    print(report(run))
    assert run.in_flight, "nothing was being sent when the clock moved"
    assert run.lost == [], report(run)
    assert run.doubled == [], report(run)
    assert run.not_success == {}, report(run)
