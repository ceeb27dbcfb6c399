"""The fleet-wide rate limit and identical-request rule end to end: asterCC rows in MariaDB → celery beat →
Redis → several `celery worker` processes → the Mobilgroup simulator, which journals when each request
arrived.

What a call centre relies on: four worker processes together never send more than the account's limit in
any one second and still drain a backlog at close to that limit, and none sends on a slot it woke up too late
for; an identical message (same recipient and
text) reaches the provider only after the identical-request interval, even when the first one was a failed
attempt being retried; waiting for the limiter is not a failed attempt, and the worker log says why a
message waits; a backlog is sent oldest due first; and with the limiter's Redis unreachable nothing
is sent at all, while the worker log says why.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import pytest
import requests

from bench.throttle_bench import largest_window, smallest_gap
from simulators.mobilgroup import API_PATH, MobilgroupSimulator
from smsctl.processes import pool_option
from workflow.throttle import KEY_PREFIX, SEND_WITHIN_S, RedisThrottle
from tests.conftest import (
    REDIS_PREFIX,
    app_env,
    free_port,
    insert_rows,
    rows_by_id,
    started,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timing, pytest.mark.xdist_group("rates")]


def fleet_env(db_url, broker, sim, **extra):
    """Mobilgroup at 20/s through the simulator; dispatch every second in large batches, so that the
    limiter and not the dispatcher sets the pace."""
    settings = dict(
        SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url, SMS_MOBILGROUP_USER_ID=sim.user_id,
        SMS_MOBILGROUP_USER=sim.user, SMS_MOBILGROUP_PASSWORD=sim.password, SMS_MOBILGROUP_RATE=20,
        SMS_DISPATCH_INTERVAL_S=1, SMS_DISPATCH_BATCH=1000, SMS_RETRY_BASE_S=0.2, SMS_RETRY_MAX_S=1,
    )
    settings.update(extra)
    return app_env(db_url, broker, **settings)


def start_fleet(celery, env, workers: int = 2, concurrency: int = 2) -> list:
    """`workers` celery workers of `concurrency` prefork processes each, and one beat."""
    fleet = [celery("worker", env, "-c", str(concurrency), "-P", pool_option("prefork")) for _ in range(workers)]
    celery("beat", env)
    return fleet


def number(i: int) -> str:
    """Distinct Russian mobile numbers, typed as agents type them."""
    return f"+7 (916) {300 + i // 100:03d}-{i % 100:02d}-77"


def all_final(db):
    def check():
        rows = rows_by_id(db)
        return all(r["status"] in ("success", "failed", "error") for r in rows.values()) and rows
    return check


def sends_by_id(sim) -> dict[int, dict]:
    return {int(e["id"]): e for e in sim.events("send") if e["outcome"] == "accepted"}


def assert_private(logs: str, sim) -> None:
    """No recipient number and no message text in what operators see."""
    for event in sim.events("send"):
        assert event["phone"] not in logs, "a phone number reached a log"
        assert event["message"] not in logs, "a message text reached a log"


class SimulatorProcess:
    """The Mobilgroup simulator in a process of its own (`smsctl simulate`), its journal read over HTTP.
    Arrival times are stamped where the provider would stamp them: in the simulator, which then shares its
    interpreter with nothing else. In this test's process the test's own work held the simulator's threads
    up, and one request in about three runs was stamped 50–100 ms late, the one after it on time."""

    user_id, user, password = "1", "demo", "demo"  # the simulator's defaults

    def __init__(self, log_path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api_url = self.url + API_PATH
        self._journal = None
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen([sys.executable, "-m", "smsctl.cli", "simulate", "mobilgroup",
                                          "--port", str(port)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._answers, 20, interval_s=0.1, what="the simulator to listen")

    def _answers(self) -> bool:
        try:
            requests.get(self.url + "/_sim/journal", timeout=2)
            return True
        except requests.ConnectionError:
            return False

    def events(self, kind: str) -> list[dict]:
        """The journal's events of `kind`; after `close()`, as they were when it closed."""
        journal = self._journal if self._journal is not None else self._read_journal()
        return [event for event in journal if event["kind"] == kind]

    def _read_journal(self) -> list[dict]:
        return requests.get(self.url + "/_sim/journal", timeout=10).json()

    def close(self) -> None:
        try:
            self._journal = self._read_journal()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._log.close()


@contextmanager
def simulator_process(log_path):
    sim = SimulatorProcess(log_path)
    try:
        yield sim
    finally:
        sim.close()


def test_four_processes_keep_20_per_second_and_identical_messages_a_minute_apart(
        db, mariadb_url, redis_url, celery, tmp_path):
    rate, count = 20, 400
    with simulator_process(tmp_path / "simulator.log") as sim:
        # The backlog's newer half is inserted first (lower ids): the older half must still go first.
        # The dispatcher claims oldest due first, one batch at a time, so the batch is smaller than each half.
        newer = insert_rows(db, [(number(i), f"Your order {i} has shipped.") for i in range(count // 2)],
                            schedule_sql="NOW() - INTERVAL 1 MINUTE")
        older = insert_rows(db, [(number(i), f"Your order {i} has shipped.") for i in range(count // 2, count)],
                            schedule_sql="NOW() - INTERVAL 1 HOUR")
        # Two messages sent twice each: the second copy must wait for the default 60 s rule.
        twins = insert_rows(db, [("+7 916 777-00-01", "Your code is 4711."),
                                 ("+7 916 777-00-02", "See you at 10.")] * 2,
                            schedule_sql="NOW() - INTERVAL 2 HOUR")
        env = fleet_env(mariadb_url, redis_url, sim, SMS_DISPATCH_BATCH=100)
        fleet = start_fleet(celery, env, workers=2, concurrency=2)
        rows = wait_until(all_final(db), 150, what="every row to reach a final status")

    sends = sends_by_id(sim)
    assert set(sends) == set(newer + older + twins)
    assert len(sim.events("send")) == len(sends), "a message reached the provider twice"
    assert all(r["status"] == "success" and r["failures"] == 0 for r in rows.values()), \
        "a throttled send ended otherwise than success after one attempt"

    times = [e["time"] for e in sends.values()]
    batch = [sends[i]["time"] for i in newer + older]
    took = max(batch) - min(batch)
    widest = largest_window(times)
    print(f"\n{count} messages at {rate}/s through 4 processes: {took:.2f} s ({took / (count / rate):.1%} of "
          f"{count / rate:g} s), {(count - 1) / took:.2f}/s, largest one-second window {widest}")
    assert widest <= rate, f"{widest} messages reached the provider within one second (limit {rate})"
    # Close to the rate, not at it: on a busy host the fleet reached 91–93% of it (README, Performance), and
    # senders that wake late give their slots back; a limiter spacing slots twice too far would reach 50%.
    assert took <= 1.25 * count / rate, f"the batch took {took:.2f} s, more than 25% over {count / rate:g} s"

    gaps = [abs(sends[a]["time"] - sends[b]["time"]) for a, b in zip(twins[:2], twins[2:])]
    print(f"identical messages arrived {', '.join(f'{g:.2f}' for g in gaps)} s apart (rule: 60 s)")
    assert min(gaps) >= 60, "an identical message reached the provider within 60 s of the first"

    # Oldest due first: nearly every (older, newer) pair arrives in that order.
    in_order = sum(sends[o]["time"] < sends[n]["time"] for o in older for n in newer) / (len(older) * len(newer))
    print(f"older-due rows sent before newer-due rows in {in_order:.1%} of pairs")
    assert in_order >= 0.95

    # Every wake-up is reported (each pool process still holds its last one); none later than SEND_WITHIN_S sent.
    throttle = RedisThrottle(redis_url, prefix=REDIS_PREFIX + KEY_PREFIX)
    account = f"mobilgroup:{sim.user_id}"
    lateness, given_back = sorted(throttle.lateness(account)), throttle.given_back_count(account)
    throttle.close()
    print(f"wake-up after slot: p50 {lateness[len(lateness) // 2] * 1000:.1f} ms, max {lateness[-1] * 1000:.1f} ms "
          f"over {len(lateness)} wake-ups; {given_back} slot(s) given back")
    assert len(lateness) >= len(sends) - 4
    assert sum(late > SEND_WITHIN_S for late in lateness) <= given_back

    logs = "".join(worker.log() for worker in fleet)
    assert logs.count("identical message to this recipient sent less than 60 s ago") >= 2
    assert "sends throttled so far" in logs
    assert_private(logs, sim)


def test_identical_messages_wait_even_behind_a_failed_attempt_and_the_log_says_why(
        db, mariadb_url, redis_url, celery):
    identical_s = 5
    sim = MobilgroupSimulator(fail_rate=1.0)
    with started(sim):
        first = insert_rows(db, [("+7 916 555-10-01", "Your code is 1234.")])
        env = fleet_env(mariadb_url, redis_url, sim, SMS_MOBILGROUP_IDENTICAL_S=identical_s)
        fleet = start_fleet(celery, env, workers=2, concurrency=2)
        fault = wait_until(lambda: sim.events("fault"), 60, interval_s=0.02, what="the first attempt to fail")[0]
        sim.fail_rate = 0.0
        copies = insert_rows(db, [("+7 916 555-10-01", "Your code is 1234.")] * 2
                             + [("+7 916 555-10-02", "Meeting moved to 3 pm.")] * 3)
        # Same text to another recipient, another text to the same recipient: not identical, not delayed.
        others = insert_rows(db, [("+7 916 555-10-03", "Your code is 1234."),
                                  ("+7 916 555-10-01", "Your code is 5678.")])
        rows = wait_until(all_final(db), 90, what="every row to reach a final status")

    assert all(r["status"] == "success" for r in rows.values())
    assert rows[first[0]]["failures"] == 1, "the failed attempt before the send that succeeded"
    assert all(rows[i]["failures"] == 0 for i in copies + others), "waiting counted as a failed attempt"
    assert len(sim.events("fault")) == 1

    by_message = defaultdict(list)
    for event in sim.events("send"):
        by_message[event["phone"], event["message"]].append(event["time"])
    code_to_first = by_message[sends_by_id(sim)[first[0]]["phone"], "Your code is 1234."]
    meeting = by_message[sends_by_id(sim)[copies[2]]["phone"], "Meeting moved to 3 pm."]
    groups = {"retried message and its two copies": (4, [fault["time"], *code_to_first]),
              "three copies of one message": (3, meeting)}
    for what, (expected, times) in groups.items():
        assert len(times) == expected, what
        gap = smallest_gap(times)
        print(f"{what}: smallest gap {gap:.2f} s (rule {identical_s} s)")
        assert gap >= identical_s, f"{what}: two identical requests {gap:.2f} s apart"
    unrelated = [sends_by_id(sim)[i]["time"] for i in others]
    inserted = min(sends_by_id(sim)[i]["time"] for i in copies + others)
    assert max(unrelated) - inserted < identical_s, "a message that is not identical was held back"

    logs = "".join(worker.log() for worker in fleet)
    waiting = [line for line in logs.splitlines() if "identical message to this recipient" in line]
    assert len(waiting) >= 4, "the log does not say why the copies waited"
    assert all("sends throttled so far" in line for line in waiting)
    assert_private(logs, sim)


def test_nothing_is_sent_while_the_limiter_is_unreachable(db, mariadb_url, redis_url, celery):
    sim = MobilgroupSimulator()
    with started(sim):
        ids = insert_rows(db, [(number(i), f"Reminder {i}") for i in range(8)])
        port = free_port()
        env = fleet_env(mariadb_url, redis_url, sim, SMS_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        fleet = start_fleet(celery, env, workers=2, concurrency=2)

        def told_why():
            logs = "".join(worker.log() for worker in fleet)
            return all(f"send of row {i} waits: the rate limiter is unavailable" in logs for i in ids) and logs

        logs = wait_until(told_why, 60, what="every send to report the unreachable limiter")
        time.sleep(2)  # a send that slipped through would show in the journal by now

    assert sim.events() == [], "a message was sent without the rate limiter"
    rows = rows_by_id(db)
    assert {rows[i]["status"] for i in ids} == {"pending"}
    assert {rows[i]["failures"] for i in ids} == {0}, "waiting for the limiter counted as a failed attempt"
    assert f"Redis at 127.0.0.1:{port}/0" in logs and "not sending, will retry" in logs
