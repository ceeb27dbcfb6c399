"""CPU figures the benchmarks share: this process's CPU time and the Redis server's."""
from __future__ import annotations

import psutil
import redis


def self_cpu() -> float:
    """CPU seconds (user + system) this process has used so far, all its threads together."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used since it started (`INFO cpu`); every client of that server
    counts, not only the benchmark's."""
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]
