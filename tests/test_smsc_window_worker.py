"""One sending worker as deployed (`worker-smsc`: `--pool threads --concurrency 64`), real MariaDB and Redis,
the SMSC simulator answering each submit after 50 ms: the worker's threads share one SMPP session with many
submits in flight on it, every part of every message reaches the SMSC once, and every row ends `success`.
How fast is measured by `bench/smpp_window.py --worker`, not here."""
from __future__ import annotations

from collections import Counter

from providers import smsc_text
from simulators.smsc import SmscSimulator
from tests.conftest import app_env, compose_worker, insert_rows, rows_by_id, started, wait_until


def test_one_threads_worker_sends_every_part_once_over_one_session(db, mariadb_url, redis_url, celery):
    assert compose_worker("worker-smsc")[:4] == ["-l", "info", "--pool", "threads"]
    messages = [(f"+7 916 500-{n // 100:02d}-{n % 100:02d}",
                 f"Заказ {n} готов. " * (6 if n % 5 == 0 else 1)) for n in range(300)]  # every fifth: 2 parts
    parts = sum(len(smsc_text.layout(body).segments) for _, body in messages)
    assert parts > len(messages)
    sim = SmscSimulator(latency_s=0.05, receipts=False)
    with started(sim):
        ids = insert_rows(db, messages)
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="smsc", SMS_SMSC_HOST="127.0.0.1",
                      SMS_SMSC_PORT=sim.port, SMS_SMSC_SYSTEM_ID=sim.system_id, SMS_SMSC_PASSWORD=sim.password,
                      SMS_SMSC_RATE=100000, SMS_SMSC_IDENTICAL_S=0, SMS_DISPATCH_INTERVAL_S=1)
        celery("worker", env, "-Q", "dispatch", "--pool", "threads", "--concurrency", "2")
        celery("worker", env, *compose_worker("worker-smsc"))
        celery("beat", env)
        wait_until(lambda: all(r["status"] == "success" for r in rows_by_id(db).values()), 120,
                   what="every row success")
        submits, binds = sim.events("submit"), sim.events("bind")

    rows = rows_by_id(db)
    assert sorted(rows) == sorted(ids)
    assert {(r["status"], r["state"], r["attempts"]) for r in rows.values()} == {("success", "accepted", 1)}
    assert len(submits) == parts and {s["status"] for s in submits} == {0}
    assert max(Counter((s["destination_addr"], s["short_message"]) for s in submits).values()) == 1
    assert [b["mode"] for b in binds] == ["tx"], "one session for the sending worker process"
    assert sim.max_in_flight > 1, "the submits went one at a time"


def test_the_window_benchmark_prints_its_table():
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "bench/smpp_window.py", "--latency", "0.02", "--messages", "40",
                             "--threads", "8", "--windows", "1,8"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+1\s+\d+\s+\(one at a time\)$", result.stdout, re.M), result.stdout
    assert re.search(r"^\s+8\s+\d+$", result.stdout, re.M), result.stdout
