"""`make demo` on a machine with no services: the embedded default (SQLite, Celery's filesystem broker),
real Celery processes and the simulators. A newcomer sees progress, the status screen and the summary,
not the processes' logs, which go to files it names."""
from __future__ import annotations

import os
import re
import subprocess
import sys


def test_the_demo_finishes_with_its_summary_and_keeps_the_logs_in_named_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "CELERY_"))}
    done = subprocess.run([sys.executable, "-m", "smsctl.cli", "demo", "--timeout", "150"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert not re.search(r"\b(INFO|WARNING|DEBUG)\b", out), "log lines on the screen"
    assert "\x1b[" not in out, "terminal codes when the output is not a terminal"
    assert re.search(r"^mobilgroup: available; last hour sent \d+", out, re.M), "the status screen at the end"
    assert "asterCC statuses: failed 8, success 32" in out
    named = re.search(r"^logs: (.*)$", out, re.M).group(1)
    demo = tmp_path / "var" / "demo"
    for name, sign in (("worker.log", "sms.send"), ("beat.log", "beat: Starting"), ("demo.log", "alembic")):
        assert f"var/demo/{name}" in named
        assert sign in (demo / name).read_text(), f"{name} lacks its process's log"
