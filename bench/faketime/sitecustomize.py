"""Loaded (on `PYTHONPATH`) by processes run under libfaketime with `FAKETIME_DONT_FAKE_MONOTONIC=1`
(`bench.fault_scenarios.skewed_worker`): `time.sleep` sleeps with `select` instead.

libfaketime 0.9.10 (Debian 12) either hangs Python's lock and event timeouts, which wait on the monotonic
clock through `sem_clockwait` (when it fakes that clock), or fails `time.sleep` with EINVAL, which
`clock_nanosleep`s to an absolute monotonic deadline (when it does not). Keeping the monotonic clock true
and sleeping with `select` gives a process whose wall clock alone is off, as on a host without NTP."""
import select
import time


def _sleep(seconds: float) -> None:
    select.select([], [], [], seconds)


time.sleep = _sleep
