"""One provider's trouble never holds up another's messages (issue 16), with real processes: MariaDB, Redis,
`celery worker` and `celery beat` subprocesses (the plain worker: threads, 64 of them, every queue) and the
provider simulators. The scenarios are `bench/fault_scenarios.py`'s; `bench/faults.py` prints the first one's
figures at a larger size. The workers' and beat's logs are in the test's `tmp_path`.
"""
from __future__ import annotations

import re

import pytest

from bench import fault_scenarios as scenarios
from tests.conftest import REDIS_PREFIX, app_env

pytestmark = [pytest.mark.integration, pytest.mark.timing]


@pytest.fixture
def stage(db, mariadb_url, redis_url, celery, tmp_path):
    return scenarios.Stage(db, mariadb_url, redis_url, REDIS_PREFIX, app_env, celery, tmp_path)


def requests_per_pause(times: list[float], pause_s: float) -> list[int]:
    """How many requests fell in each `pause_s` window after the first window."""
    start = times[0] + pause_s
    counts = [0] * (int((times[-1] - start) // pause_s) + 1) if times[-1] >= start else []
    for t in times:
        if t >= start:
            counts[int((t - start) // pause_s)] += 1
    return counts


def test_a_broke_mobilgroup_account_neither_holds_up_accolades_nor_gets_a_herd(stage):
    """Mobilgroup answers "no money" (error 9) to every send; in-flight cap 10; 300 Mobilgroup rows fall due,
    then 30 Accolades rows. The pause between probes (`SMS_ACCOUNT_RETRY_S`, 300 s by default) is shortened
    to 5 s, the window its rows wait through (`SMS_ACCOUNT_RETRY_WINDOW_S`, a day) to 20 s, and the
    identical-request rule (`SMS_MOBILGROUP_IDENTICAL_S`, 60 s) to 1 s, under the pause (the next test shows
    why): the Accolades rows all go out within 20 s; Mobilgroup gets about one probe per pause, not a burst;
    its rows end `error` with the account's reason once the window is spent."""
    pause_s, window_s = 5, 20
    run = scenarios.paused_beside_healthy(stage, paused_rows=300, healthy_rows=30, inflight=10,
                                          retry_s=pause_s, window_s=window_s)
    requests = run.troubled_requests
    per_pause = requests_per_pause(requests, pause_s)
    print(f"Accolades due→sent p50 {run.median:.2f} s, max {max(run.healthy_delays):.2f} s; Mobilgroup "
          f"requests {len(requests)}, per {pause_s} s after the first: {per_pause}")
    assert len(run.healthy_delays) == len(run.healthy) and max(run.healthy_delays) < 20, run.healthy_delays
    assert {run.outcomes[i][:2] for i in run.healthy} == {("accepted", "success")}
    assert len(requests) <= 10 + window_s / pause_s + 3, f"{len(requests)} requests: a herd ({per_pause})"
    assert max(per_pause, default=0) <= 2, f"more than one probe in a pause: {per_pause}"
    ends = {run.outcomes[i][:2] for i in run.troubled}
    assert ends == {("error", "error")}, ends
    reasons = {run.outcomes[i][2] for i in run.troubled}
    assert all("not enough money" in r for r in reasons), reasons


def test_a_probe_held_back_by_the_identical_request_rule_does_not_shut_the_circuit_for_a_lease(stage):
    """The same broke account with the identical-request rule at its default (60 s), longer than the pause
    (5 s): the probe, the oldest waiting row, was refused a pause ago with the same text, so the rule holds it
    back. Another probe must follow within a pause, not after the probe's lease (`SMS_SEND_LEASE_S`, 180 s):
    an operator who shortens `SMS_ACCOUNT_RETRY_S` below `SMS_MOBILGROUP_IDENTICAL_S` must not get a circuit
    that stays shut. Nor may the rows whose slot came while the circuit opened hold their recipients' marks
    for requests never sent: each would cost a tick without a probe (three probes in 20 s fell to two)."""
    pause_s, window_s = 5, 20
    run = scenarios.paused_beside_healthy(stage, paused_rows=300, healthy_rows=30, inflight=10,
                                          retry_s=pause_s, window_s=window_s, identical_s=60)
    requests = run.troubled_requests
    probes = [t - requests[0] for t in requests if t >= requests[0] + pause_s / 2]
    print(f"Mobilgroup requests {len(requests)}, probes at {[round(t, 1) for t in probes]} s after the first")
    assert len(probes) >= window_s / pause_s - 1, f"{len(probes)} probes in {window_s} s: {probes}"


def test_a_provider_that_never_answers_does_not_hold_up_another_in_the_same_worker(stage):
    """Ozeki accepts connections and never answers; 1,000 Ozeki rows fall due, and once its calls hang, 50
    Mobilgroup rows: they reach Mobilgroup with a median under 3 s after they fall due. Then Ozeki answers
    again and every row ends (at 100/s, for test time)."""
    run = scenarios.hung_beside_healthy(stage, hung_rows=1000, healthy_rows=50, hung_rate=100)
    print(f"Mobilgroup due→sent p50 {run.median:.2f} s, p90 {run.percentile(0.9):.2f} s, max "
          f"{max(run.healthy_delays):.2f} s beside {run.stuck_connections} hung Ozeki connections")
    assert run.stuck_connections > 0, "Ozeki was not hanging when the Mobilgroup rows went out"
    assert len(run.healthy_delays) == len(run.healthy)
    assert run.median < 3, sorted(run.healthy_delays)
    assert {run.outcomes[i][0] for i in run.healthy} <= {"accepted", "delivered"}


@pytest.mark.parametrize("offset_s", [10, -10])
def test_a_worker_whose_clock_is_off_by_ten_seconds_sends_due_rows_in_time(stage, offset_s):
    """A worker whose clock runs 10 s ahead, or 10 s behind (libfaketime; beat, MariaDB and the provider keep
    the true time): rows falling due are sent within 15 s, and the worker warns about its clock."""
    run = scenarios.skewed_worker(stage, offset_s, rows=20)
    print(f"clock {offset_s:+d} s: due→sent p50 {run.median:.2f} s, max {max(run.healthy_delays):.2f} s")
    worker_log = open(run.logs[0]).read()
    assert re.search(r"this host's clock is [+-]\d+\.\d s off the database's", worker_log), \
        "the worker did not run on a skewed clock (or did not notice it)"
    assert len(run.healthy_delays) == len(run.healthy) and max(run.healthy_delays) < 15, run.healthy_delays


def test_one_refused_recipient_fails_alone_and_the_account_keeps_its_rate(stage):
    """Accolades refuses one recipient with HTTP 403 and accepts the rest, at a limit of 20/s: the refused
    row ends `failed` with Accolades' reason, the account is not paused, and the other 200 messages reach
    Accolades at no less than 80% of the limit."""
    rate = 20
    run, achieved = scenarios.refused_recipient(stage, rows=200, rate=rate)
    print(f"{achieved:.1f} msg/s to Accolades beside one refused recipient (limit {rate}/s)")
    (refused,) = run.troubled
    state, status, reason = run.outcomes[refused]
    assert (state, status) == ("failed", "failed")
    assert "Sending to this destination is not allowed for this account" in reason, reason
    assert {run.outcomes[i][:2] for i in run.healthy} == {("accepted", "success")}
    assert achieved >= 0.8 * rate, f"{achieved:.1f} msg/s"


def test_the_beat_tasks_do_not_wait_behind_sends_that_wait_for_a_thread(stage):
    """A plain worker serving Ozeki alone, Ozeki hanging: all its threads but two sit in Ozeki calls, and
    it holds as many sends again that find no thread. Rows that fall due meanwhile are still claimed by the
    next dispatch tick (every second here): those sends give their rows back at once
    (`workflow.runtime.HANGING_AFTER_S`), so the worker takes in the tick, which runs on a thread of its own
    (`celery_ext.pool`). When each such send waited 0.2 s for a thread first, the rows were claimed 4 s late."""
    delays = scenarios.ticks_beside_hung(stage)
    print(f"due→claimed: {sorted(round(d, 2) for d in delays)}")
    assert max(delays) < 2.5, sorted(delays)
