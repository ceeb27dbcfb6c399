"""Celery processes started as children: `celery -A tasks worker|beat|flower` in their own process group,
logging to a file, stopped cleanly (SIGTERM, then SIGKILL) with everything they forked.

Used by `smsctl demo`, the integration tests and the benchmarks, which all run the real processes a
deployment runs rather than an in-process imitation.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class CeleryProcess:
    """`celery -A <app> <args>` (the dispatcher's `tasks` unless told) with environment `env`, output to
    `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, app: str = "tasks"):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", app, *args], env=env,
                                     cwd=PROJECT_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker and every pool child, mid-task."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """Ask the process group to stop (a warm shutdown: running tasks finish)."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 20) -> None:
        """Terminate, wait up to `timeout_s`, then kill; close the log."""
        self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_all(processes: list[CeleryProcess]) -> None:
    """Stop several processes, asking all of them first so that they shut down in parallel."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


def pool_option(pool: str) -> str:
    """The `celery worker -P` value that selects `pool`. Celery takes `-P prefork` for "no choice" and then
    runs the pool `celeryconfig` names (threads), so prefork is asked for by its other name."""
    return "processes" if pool == "prefork" else pool
