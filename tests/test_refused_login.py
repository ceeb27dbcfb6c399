"""A refused login, fleet-wide (`workflow.logins`), with the README's smsc.ru deployment in real processes:
the plain worker (dispatch), `worker-smsc` and `smsctl smpp-receiver`, `celery beat`, a main and a backup
SMPP host (`simulators.smsc`, which refuses a wrong password with ESME_RINVPASWD).

What a call centre relies on: a wrong password never gets its address blocked by smsc.ru (5 refused logins
in 30 minutes), no message gives up meanwhile, and the password fixed and the processes restarted, every
message goes at once, each once. Time is scaled down by `SMS_LOGIN_RETRY_MIN_S` (15 s for 620 s: smsc.ru's
30 minutes are 45 s here); `SMS_ACCOUNT_RETRY_S` is shorter still, to show that it does not hurry a probe.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlalchemy import text

from db import store
from simulators.accolades import AccoladesSimulator
from simulators.smsc import SmscSimulator
from tests.conftest import (ROOT, app_env, compose_worker, insert_rows, rows_by_id, started,
                            wait_until)

# They count logins within seconds of each other.
pytestmark = [pytest.mark.integration, pytest.mark.timing]

SPACING_S = 15
WRONG = "Xq7wrZp2"
WINDOW_S = 3 * SPACING_S
"""smsc.ru's 30 minutes, scaled about as `SMS_LOGIN_RETRY_MIN_S` is (620 s → 15 s)."""


class Receiver:
    """`smsctl smpp-receiver` in a process of its own."""

    def __init__(self, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "smsctl.cli", "smpp-receiver"], env=env, cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


def refusals(*hosts: SmscSimulator) -> list[float]:
    return sorted(e["time"] for h in hosts for e in h.events("bind") if e["status"] != 0)


def test_a_wrong_password_never_gets_us_blocked_and_the_fixed_one_sends_at_once(db, mariadb_url, redis_url, celery,
                                                                                  tmp_path):
    main, backup = SmscSimulator(receipt_delay_s=0.2), SmscSimulator(receipt_delay_s=0.2)
    receivers = []
    with started(main), started(backup):
        def env(password):
            return app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="smsc",
                           SMS_SMSC_HOST=f"127.0.0.1:{main.port},127.0.0.1:{backup.port}",
                           SMS_SMSC_SYSTEM_ID="smsc", SMS_SMSC_PASSWORD=password, SMS_DISPATCH_INTERVAL_S=1,
                           SMS_ACCOUNT_RETRY_S=2, SMS_LOGIN_RETRY_MIN_S=SPACING_S, SMS_SMSC_RATE=200,
                           SMS_SMSC_IDENTICAL_S=1, SMS_HTTP_TIMEOUT_S=5)

        def deploy(password):
            processes = [celery("worker", env(password), *compose_worker("worker")),
                         celery("worker", env(password), *compose_worker("worker-smsc"))]
            receivers.append(Receiver(env(password), tmp_path / f"receiver-{len(receivers)}.log"))
            return processes + [receivers[-1]]

        try:
            ids = insert_rows(db, [(f"+7 916 555-{i:02d}-{50 + i}", f"Your code is {1000 + i}") for i in range(30)])
            wrong = deploy(WRONG)
            celery("beat", env(WRONG))
            wait_until(lambda: refusals(main, backup), 60, what="the first refused login")
            time.sleep(2 * SPACING_S + 8)  # two probes' worth

            refused = refusals(main, backup)
            first = refused[0]
            burst = [t for t in refused if t - first < 2]
            later = [t for t in refused if t - first >= 2]
            assert len(burst) <= 3, f"{len(burst)} refused logins at the start (one per process at most)"
            assert all(b - a >= SPACING_S * 0.9 for a, b in zip([first] + later, later)), \
                f"probes of a refused login closer than {SPACING_S} s: {[round(t - first, 1) for t in refused]}"
            assert 1 <= len(later) <= 3, f"the probes: {[round(t - first, 1) for t in refused]}"
            assert all(sum(1 for u in refused if t <= u < t + WINDOW_S) < 5 for t in refused), \
                f"5 refused logins within smsc.ru's 30 minutes (scaled): {[round(t - first, 1) for t in refused]}"
            assert not backup.events("bind"), "a refused login was tried on the backup host"
            assert not main.events("submit")
            rows = rows_by_id(db)
            assert {rows[i]["status"] for i in ids} == {"pending"}, "a row gave up while the login was refused"
            # Paused after a refusal, or not yet tried (waiting for room while the circuit is open).
            assert {rows[i]["wait_reason"] for i in ids if rows[i]["state"] == "waiting"} <= {"paused", "room"}
            assert {rows[i]["state"] for i in ids} <= {"waiting", "queued"}
            with db.connect() as conn:
                circuit = conn.execute(text("SELECT state, refused_login FROM sms_breaker"
                                            " WHERE provider = 'smsc'")).one()
            assert circuit.state == "open" and circuit.refused_login and WRONG not in circuit.refused_login

            # As if a probe had just been refused with smsc.ru's own spacing (10 minutes): fixed credentials
            # must not wait for it.
            store.trip_breaker(db, "smsc", 600, "smsc.ru refused the password", refused_login=circuit.refused_login)
            for process in wrong:
                process.stop()
            fixed_at = time.monotonic()
            deploy("secret")

            def all_sent():
                rows = rows_by_id(db)
                return all(rows[i]["status"] == "success" for i in ids) and rows

            wait_until(all_sent, 60, what="every row to be sent once the password was fixed")
            took = time.monotonic() - fixed_at
        finally:
            for receiver in receivers:
                receiver.stop()
        sends = Counter(e["destination_addr"] for e in main.events("submit") if e["status"] == 0)
    assert len(sends) == len(ids) and set(sends.values()) == {1}, "a number got its message twice"
    assert len(refusals(main, backup)) == len(refused), "a login refused after the password was fixed"
    worker_log = "".join(p.log() for p in wrong) + receivers[0].log()
    assert "ALERT: smsc refused our login" in worker_log and "SMS_SMSC_PASSWORD" in worker_log
    assert WRONG not in worker_log
    print(f"refused logins at {[round(t - first, 1) for t in refused]} s; all sent {took:.0f} s after the fix")


def test_a_wrong_accolades_password_is_never_a_burst_and_the_fixed_one_sends_at_once(db, mariadb_url, redis_url,
                                                                                     celery):
    """Accolades blacklists an address after a few invalid requests (403.6; the simulator after 5). The plain
    worker (64 threads) with 40 rows due at 20/s: the first 401 pauses every send already waiting for its
    rate-limit slot, then one probe per `SMS_LOGIN_RETRY_MIN_S` (10 s here)."""
    accolades = AccoladesSimulator(blacklist_after=5)
    with started(accolades):
        def env(password):
            return app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="accolades", SMS_DEFAULT_REGION="RO",
                           SMS_ACCOLADES_URL=accolades.url, SMS_ACCOLADES_ACCOUNT=accolades.account,
                           SMS_ACCOLADES_PASSWORD=password, SMS_ACCOLADES_RATE=20, SMS_ACCOLADES_IDENTICAL_S=1,
                           SMS_DISPATCH_INTERVAL_S=1, SMS_ACCOUNT_RETRY_S=1, SMS_LOGIN_RETRY_MIN_S=10)

        ids = insert_rows(db, [(f"+40 721 555 {100 + i:03d}", f"Your code is {1000 + i}") for i in range(40)])
        wrong = celery("worker", env(WRONG), *compose_worker("worker"))
        celery("beat", env(WRONG))
        wait_until(lambda: accolades.events("reject"), 60, what="the first refused request")
        time.sleep(23)

        refused = sorted(e["time"] for e in accolades.events("reject"))
        first = refused[0]
        burst = [t for t in refused if t - first < 2]
        later = [t for t in refused if t - first >= 2]
        assert len(burst) <= 2, f"{len(burst)} refused requests at the start"
        assert 1 <= len(later) <= 2 and all(b - a >= 9 for a, b in zip([first] + later, later)), \
            f"probes not one per pause: {[round(t - first, 1) for t in refused]}"
        assert {e["code"] for e in accolades.events("reject")} == {"401"}, "our address was blacklisted (403.6)"
        assert {r["status"] for i, r in rows_by_id(db).items() if i in ids} == {"pending"}

        wrong.stop()
        fixed_at = time.monotonic()
        celery("worker", env(accolades.password), *compose_worker("worker"))
        rows = wait_until(lambda: all(r["status"] == "success" for r in rows_by_id(db).values()) and rows_by_id(db),
                          60, what="every row to be sent once the password was fixed")
        took = time.monotonic() - fixed_at
    sends = Counter(e["id"] for e in accolades.events("send"))
    assert len(sends) == len(ids) and set(sends.values()) == {1}
    assert {rows[i]["provider"] for i in ids} == {"accolades"}
    print(f"Accolades refused at {[round(t - first, 1) for t in refused]} s; all sent {took:.0f} s after the fix")
