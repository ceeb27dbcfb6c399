"""Mobilgroup's error 7 ("a request with this id was already sent") settles a row at once, with a real worker,
beat and the Mobilgroup simulator losing 30% of its answers after processing the request (HTTP 503); the
scenario is `bench/fault_scenarios.py`'s `lossy_mobilgroup`, which `bench/faults.py --only lossy` runs larger.

A send whose answer was lost is sent again; Mobilgroup answers error 7, and a status request confirms the
request is ours. When that confirmation is lost too, only the confirmation is asked again (taking a
rate-limit slot), never the send, and the send's backoff does not grow.
"""
from __future__ import annotations

import pytest

from bench import fault_scenarios as scenarios
from tests.conftest import REDIS_PREFIX, app_env
from workflow.send import CONFIRM_TRIES

pytestmark = pytest.mark.integration

SETTLE_S = 90


@pytest.fixture
def stage(db, mariadb_url, redis_url, celery, tmp_path):
    return scenarios.Stage(db, mariadb_url, redis_url, REDIS_PREFIX, app_env, celery, tmp_path)


def test_with_30_percent_of_answers_lost_every_row_settles_and_only_confirmations_are_repeated(stage):
    run = scenarios.lossy_mobilgroup(stage, rows=200, lost_rate=0.3, timeout_s=SETTLE_S)

    assert {status for _, status, _ in run.outcomes.values()} == {"success"}
    assert set(run.accepted) == {str(i) for i in run.outcomes} and set(run.accepted.values()) == {1}
    confirmed_again = 0
    for i, history in run.histories.items():
        in_a_row = 0  # confirmations lost in a row
        for command, lost in history:
            if command == "send":
                # Sent again only once CONFIRM_TRIES confirmations in a row were all lost.
                assert in_a_row in (0, CONFIRM_TRIES), \
                    f"row {i} was sent again after a lost confirmation: {history}"
                in_a_row = 0
            else:
                confirmed_again += in_a_row > 0
                in_a_row = in_a_row + 1 if lost else 0
        # Only a lost send counts as a failure (the backoff's exponent); a lost confirmation does not.
        assert run.failures[i] <= history.count(("send", True)), f"row {i}: {run.failures[i]} failures, {history}"
    assert run.lost["send"] and run.lost["status"], f"the simulator lost too little to test anything: {run.lost}"
    assert confirmed_again, "no confirmation was lost and asked again"
    print(f"{run.rows} rows success {run.settled_s:.0f} s after the worker started; answers lost: "
          f"{dict(run.lost)}; confirmations asked again after a loss: {confirmed_again}; most failures of a row: "
          f"{max(run.failures.values())}")
