"""Does a burst stall right after another heavy run on the machine? (issue 24, item 13)

Runs `bench/e2e.py`'s burst (4,000 rows to a Mobilgroup stand-in answering at once, two workers, no
baseline) again and again, each time right after a different heavy run (the other benchmarks, a fault
scenario, a slice of the suite), alternating the plain worker and `--pool threads --concurrency 64`, the two
shapes that once took about 62 s where the others took 8–10 s. For each burst it prints its rate, how long
it took, when its first row was sent (a tick that did not come), and its longest stall: the longest stretch
of e2e's per-second progress in which no row was sent while rows were still open. It also counts, in that burst's Celery logs (info level), the lines that would
name a stall's cause: kombu dropping a stale broker connection, a send found lost and queued again, a
lease running out, a send whose answer never came; and, on Linux, the connections the kernel dropped
meanwhile because a listening socket's backlog was full (the simulator's, once).

    .venv/bin/python bench/after_heavy.py                 # fifteen heavy runs, each followed by a burst
    .venv/bin/python bench/after_heavy.py --only 3 --log-dir /tmp/heavy

A heavy run that fails is reported and the burst after it still runs: the question is the burst.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

HEAVY: list[tuple[str, list[str]]] = [
    ("e2e threads, 10,000 rows", [PY, "bench/e2e.py", "--rows", "10000", "--pool", "threads", "--concurrency", "16",
                                  "--no-baseline", "--light-rows", "0"]),
    ("faults: lossy Mobilgroup", [PY, "bench/faults.py", "--only", "lossy", "--lossy-rows", "1000"]),
    ("throttle, 8 processes", [PY, "bench/throttle_bench.py"]),
    ("fleet rate", [PY, "bench/fleet_rate.py"]),
    ("SMPP window", [PY, "bench/smpp_window.py", "--messages", "1500"]),
    ("Celery floor", [PY, "bench/celery_floor.py", "--tasks", "5000"]),
    ("dispatch tick, 200,000 filler", [PY, "bench/e2e.py", "--tick-only", "--filler", "200000"]),
    ("retention", [PY, "bench/retention.py", "--kept", "100000"]),
    ("metrics scrape, 200,000 rows", [PY, "bench/metrics_scrape.py", "--rows", "200000"]),
    ("campaign day", [PY, "bench/campaign_day.py", "--first", "1000", "--second", "500", "--second-after", "10"]),
    ("faults: deploy", [PY, "bench/faults.py", "--only", "deploy", "--rows", "200"]),
    ("faults: crash", [PY, "bench/faults.py", "--only", "crash", "--rows", "200"]),
    ("e2e prefork, 200 ms answers", [PY, "bench/e2e.py", "--rows", "3000", "--latency", "0.2", "--no-baseline",
                                     "--light-rows", "0"]),
    ("suite: the spine", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_spine.py"]),
    ("faults: Redis restart", [PY, "bench/faults.py", "--only", "redis", "--rows", "200"]),
]

SHAPES = [["--plain"], ["--pool", "threads", "--concurrency", "64"]]
PROGRESS = re.compile(r"burst \+\s*(\d+) s: sent\s+(\d+); open: (.*)")
RATE = re.compile(r"burst done: ([\d.]+) msg/s")
CAUSES = {
    "stale broker connection": "dropping stale connection",
    "lost task queued again": "had no task started within",
    "lease ran out": "stopped before their answer came",
    "unknown outcome": "outcome unknown at",
}


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listening socket's backlog was full (Linux)."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
                 if line.startswith("TcpExt:")]
        return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def longest_stall(progress: list[tuple[int, int, str]]) -> int:
    """The longest stretch, in seconds, of e2e's progress lines (seconds into the burst, rows sent, open rows)
    with rows open and the sent count unchanged, once sending began (before, see `first_sent`)."""
    longest, since = 0, None
    for (t, sent, open_rows), (t_next, sent_next, _) in zip(progress, progress[1:]):
        if sent_next == sent and open_rows != "none" and sent > 0:
            since = t if since is None else since
            longest = max(longest, t_next - since)
        else:
            since = None
    return longest


def first_sent(progress: list[tuple[int, int, str]]) -> int | None:
    """Seconds into the burst of the first progress line with a row sent: a tick that did not come shows
    here (the rows fall due at once; the first tick after is at most `--dispatch-interval` later)."""
    return next((t for t, sent, _ in progress if sent > 0), None)


def burst(shape: list[str], rows: int, log_dir: Path, timeout_s: float) -> dict:
    """One e2e burst; its figures and the cause lines counted in its logs."""
    started, overflows = time.monotonic(), listen_overflows()
    run = subprocess.run([PY, "bench/e2e.py", "--rows", str(rows), "--workers", "2", "--latency", "0", "--no-baseline",
                          "--light-rows", "0", "--loglevel", "info", "--log-dir", str(log_dir), *shape],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    progress = [(int(m[1]), int(m[2]), m[3]) for m in PROGRESS.finditer(run.stdout)]
    rate = RATE.search(run.stdout)
    logs = "\n".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
    return {"ok": run.returncode == 0 and rate is not None, "rate": float(rate[1]) if rate else 0.0,
            "burst_s": progress[-1][0] if progress else 0, "stall_s": longest_stall(progress),
            "first_s": first_sent(progress),
            "wall_s": time.monotonic() - started, "tail": run.stdout[-2000:] + run.stderr[-2000:],
            "overflows": None if overflows is None else listen_overflows() - overflows,
            **{cause: len(re.findall(pattern, logs)) for cause, pattern in CAUSES.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, action="append", help="run only these heavy runs (1-based)")
    p.add_argument("--rows", type=int, default=4000, help="rows of each burst")
    p.add_argument("--log-dir", help="keep each burst's Celery logs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on one run after this long")
    args = p.parse_args(argv)
    base = Path(args.log_dir or tempfile.mkdtemp(prefix="sms-after-heavy-"))
    chosen = [(k, HEAVY[k - 1]) for k in (args.only or range(1, len(HEAVY) + 1))]
    results = []
    for n, (k, (name, command)) in enumerate(chosen):
        started = time.monotonic()
        try:
            heavy = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            heavy_ok = heavy.returncode == 0
        except subprocess.TimeoutExpired:
            heavy_ok = False
        heavy_s = time.monotonic() - started
        shape = SHAPES[n % len(SHAPES)]
        result = burst(shape, args.rows, base / f"burst{k:02d}", args.timeout)
        results.append((k, name, heavy_ok, heavy_s, " ".join(shape), result))
        print(f"{k:2d} after {name} ({'ok' if heavy_ok else 'FAILED'}, {heavy_s:.0f} s): {' '.join(shape)}: "
              f"{result['rate']:.0f} msg/s, burst {result['burst_s']} s, first sent at {result['first_s']} s, "
              f"longest stall {result['stall_s']} s",
              flush=True)
        if not result["ok"]:
            print(result["tail"], flush=True)
    print(f"\n{'':2} {'after':32} {'worker':30} {'msg/s':>6} {'burst s':>8} {'first s':>8} {'stall s':>8} "
          + " ".join(f"{c:>24}" for c in CAUSES) + f" {'listen overflows':>17}")
    for k, name, heavy_ok, _, shape, r in results:
        print(f"{k:2d} {name + ('' if heavy_ok else ' (failed)'):32} {shape:30} {r['rate']:6.0f} {r['burst_s']:8d} "
              f"{r['first_s']!s:>8} "
              f"{r['stall_s']:8d} " + " ".join(f"{r[c]:24d}" for c in CAUSES) + f" {r['overflows']!s:>17}")
    print(f"logs: {base}")
    return 0 if all(r["ok"] for *_, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
