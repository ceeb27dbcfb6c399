"""Mobilgroup's error 7 ("a request with this id was already sent") settles a row at once, with a real worker,
beat and the Mobilgroup simulator losing 30% of its answers after processing the request (HTTP 503).

A send whose answer was lost is sent again; Mobilgroup answers error 7, and a status request confirms the
request is ours. When that confirmation is lost too, only the confirmation is asked again (taking a
rate-limit slot), never the send, and the send's backoff does not grow.
"""
from __future__ import annotations

import time
from collections import Counter

import pytest

from simulators.mobilgroup import MobilgroupSimulator
from tests.conftest import app_env, insert_rows, rows_by_id, started, wait_until
from workflow.send import CONFIRM_TRIES

pytestmark = pytest.mark.integration

ROWS = 200
SETTLE_S = 90


def requests_of(simulator: MobilgroupSimulator, request_id: str) -> list[tuple[str, bool]]:
    """The commands of `request_id` in the order they came, each with whether its answer was lost (the
    simulator journals a lost answer right after its command)."""
    history: list[tuple[str, bool]] = []
    for e in simulator.events():
        if e.get("id") != request_id:
            continue
        if e["kind"] in ("send", "status"):
            history.append((e["kind"], False))
        elif e["kind"] == "fault":
            assert history and history[-1] == (e["of"], False)
            history[-1] = (e["of"], True)
    return history


def test_with_30_percent_of_answers_lost_every_row_settles_and_only_confirmations_are_repeated(
        db, mariadb_url, redis_url, celery):
    mobilgroup = MobilgroupSimulator(lost_rate=0.3, seed=26)
    with started(mobilgroup):
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=mobilgroup.api_url,
                      SMS_MOBILGROUP_USER_ID="1", SMS_MOBILGROUP_USER="demo", SMS_MOBILGROUP_PASSWORD="demo",
                      SMS_MOBILGROUP_RATE=100, SMS_MOBILGROUP_IDENTICAL_S=1, SMS_DISPATCH_INTERVAL_S=1)
        ids = insert_rows(db, [(f"+7 916 {100 + i // 100:03d}-{i % 100:02d}-50", f"Your code is {1000 + i}")
                               for i in range(ROWS)])
        began = time.monotonic()
        celery("worker", env)
        celery("beat", env)

        def settled():
            rows = rows_by_id(db)
            return all(rows[i]["status"] == "success" for i in ids) and rows

        rows = wait_until(settled, SETTLE_S, interval_s=1, what=f"all {ROWS} rows to be success")
        took = time.monotonic() - began
        time.sleep(2)  # nothing more may reach the simulator for these rows

    accepted = Counter(e["id"] for e in mobilgroup.events("send") if e["outcome"] == "accepted")
    assert set(accepted) == {str(i) for i in ids} and set(accepted.values()) == {1}
    histories = {i: requests_of(mobilgroup, str(i)) for i in ids}
    confirmed_again = 0
    for i, history in histories.items():
        run = 0  # confirmations lost in a row
        for command, lost in history:
            if command == "send":
                assert run in (0, CONFIRM_TRIES), f"row {i} was sent again after a lost confirmation: {history}"
                run = 0
            else:
                confirmed_again += run > 0
                run = run + 1 if lost else 0
        # Only a lost send counts as a failure (the backoff's exponent); a lost confirmation does not.
        lost_sends = history.count(("send", True))
        assert rows[i]["failures"] <= lost_sends, f"row {i}: {rows[i]['failures']} failures, {history}"
    lost = Counter(command for h in histories.values() for command, was_lost in h if was_lost)
    assert lost["send"] and lost["status"], f"the simulator lost too little to test anything: {lost}"
    assert confirmed_again, "no confirmation was lost and asked again"
    print(f"{ROWS} rows success {took:.0f} s after the worker started; answers lost: {dict(lost)}; "
          f"confirmations asked again after a loss: {confirmed_again}; "
          f"most failures of a row: {max(r['failures'] for i, r in rows.items() if i in ids)}")
