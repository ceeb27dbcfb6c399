"""Smoke tests of the benchmarks (`bench/e2e.py`, `bench/celery_floor.py`, `bench/optouts.py`) and of the
optional asterCC index.

The benchmark is what an operator runs to size a deployment and what backs the README's figures, so it must
keep running end to end: real MariaDB, Redis, simulator, beat and workers, and a table at the end. Speed is
not asserted here (this machine is shared); only that every row went through both the pipeline and the
baseline, and that the optional index is what the dispatch tick's query then uses.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from db import schema
from tests.conftest import MARIADB, ROOT, insert_rows

pytestmark = pytest.mark.integration


def run_script(script: str, *args: str, timeout: float = 240) -> str:
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_bench(*args: str) -> str:
    return run_script("bench/e2e.py", "--mariadb", MARIADB, *args)


def test_the_benchmark_runs_pipeline_and_baseline_on_the_same_rows_and_prints_its_table():
    out = run_bench("--rows", "200", "--light-rows", "20", "--workers", "1", "--concurrency", "4",
                    "--baseline-max-s", "60", "--dispatch-interval", "1")
    assert re.search(r"^messages\s+200\s+200\s*$", out, re.M), out
    for label in ("messages/s", "due→provider p50 (s)", "due→provider p99 (s)", "DB statements / message",
                  "CPU s / 1000 msg, ours", "CPU s / 1000 msg, Redis", "CPU s / 1000 msg, all",
                  "peak RSS, worker (MB)"):
        assert re.search(rf"^{re.escape(label)}\s+\d", out, re.M), f"no {label!r} figure in:\n{out}"
    assert re.search(r"^messages/s\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M), "no ratio printed"
    assert re.search(r"^messages/s \d+ cores allow\s+\d+\s+\d+$", out, re.M), "no ceiling printed"
    assert "SMS_MOBILGROUP_RATE=100000 and SMS_MOBILGROUP_IDENTICAL_S=0" in out
    assert "light load: 20 rows" in out


def test_tick_only_shows_the_plan_without_and_with_the_optional_index():
    out = run_bench("--tick-only", "--filler", "5000", "--tick-rows", "50", "--tick-repeats", "1")
    without, with_index = out.split("EXPLAIN (with index)")
    assert re.search(r"table=cc10_batchcontacts\s+type=ALL", without), out
    assert re.search(r"table=cc10_batchcontacts\s+type=range\s+key=sms_dispatcher_due", with_index), out
    assert re.search(r"with index\s+claim 50 due:\s+[\d.]+ ms\s+empty tick:\s+[\d.]+ ms", out), out


def test_the_celery_floor_runs_every_task_under_each_event_setting():
    out = run_script("bench/celery_floor.py", "--tasks", "200", "--workers", "1", "--concurrency", "2",
                     "--events", "worker", "none")
    for events in ("worker", "none"):
        assert re.search(rf"^{events}\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), out


def test_the_opt_out_benchmark_ends_every_row_both_ways_and_prints_the_ratio():
    out = run_script("bench/optouts.py", "--mariadb", MARIADB, "--rows", "50", "--repeats", "1")
    assert "50 opted-out rows ended" in out, out
    for label in ("one transaction", "one per row", "ratio"):
        assert re.search(rf"^{label}\s+[\d.]+( ms|x)$", out, re.M), out


def test_the_astercc_index_is_optional_idempotent_and_removable(db):
    insert_rows(db, [("+7 916 100-00-01", "hello")])
    assert schema.add_astercc_index(db) is True
    assert schema.add_astercc_index(db) is False
    assert schema.drop_astercc_index(db) is True
    assert schema.drop_astercc_index(db) is False


def test_the_sampler_still_counts_a_pool_process_that_has_exited():
    """A prefork worker replaces its pool processes; the CPU and peak memory of one that is gone must still
    be in the figures (its CPU through the parent's count of reaped children, its memory from a sample)."""
    from bench.e2e import Sampler

    child = ("import multiprocessing, time\n"
             "def burn():\n"
             "    block = bytearray(96 * 2**20)\n"
             "    start = time.process_time()\n"
             "    while time.process_time() - start < 0.6:\n"
             "        block[0] = 1\n"
             "process = multiprocessing.Process(target=burn)\n"
             "process.start()\n"
             "process.join()\n"
             "print('reaped', flush=True)\n"
             "time.sleep(60)\n")
    root = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    sampler = Sampler(interval_s=0.1)
    try:
        sampler.watch(root.pid, "worker")
        sampler.start()
        before = sampler.cpu_total()
        assert root.stdout.readline().strip() == "reaped"  # bounded: the child stops after 0.6 s of CPU
        used = sampler.cpu_total() - before
    finally:
        sampler.stop()
        root.kill()
        root.wait(timeout=10)
    assert used >= 0.5, f"only {used:.2f} s of CPU counted"
    children = [rss for pid, rss in sampler.peak_rss.items() if sampler.role[pid] == "worker child"]
    assert children and max(children) >= 96 * 2**20, sampler.peak_rss


def test_a_stall_shows_in_the_after_heavy_figures():
    from bench.after_heavy import first_sent, longest_stall

    steady = [(2, 0, "room 4000"), (3, 0, "queued 4000"), (4, 50, "queued 3950"), (5, 400, "queued 3600"),
              (6, 4000, "none")]
    stalled = [(2, 0, "room 4000"), (3, 10, "queued 3990"), (4, 3990, "waiting 10"), *[
        (t, 3990, "unknown 10") for t in range(5, 66)], (66, 4000, "none")]
    late_tick = [(t, 0, "room 4000") for t in range(1, 40)] + [(40, 4000, "none")]
    assert (first_sent(steady), longest_stall(steady)) == (4, 0)
    assert (first_sent(stalled), longest_stall(stalled)) == (3, 61)  # 3990 sent from +4 s to +65 s
    assert (first_sent(late_tick), longest_stall(late_tick)) == (40, 0)

