"""What `celeryconfig` makes of the environment: the broker transport, and when the dispatch tick runs.

Each case imports `celeryconfig` in a fresh interpreter, because it reads the environment once, on import.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

def configured(script: str, **env: str):
    """`result` as `script` (run after `import celeryconfig`) leaves it under `env`, through JSON."""
    code = f"import json, celeryconfig\n{textwrap.dedent(script)}\nprint(json.dumps(result))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PATH": "", **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("url, expected", [("redis://127.0.0.1:6379/0", "celery_ext.redis_transport:Transport"),
                                           ("rediss://127.0.0.1:6380/0", None)])
def test_our_redis_transport_serves_plain_redis_only(url, expected):
    assert configured("result = getattr(celeryconfig, 'broker_transport', None)", CELERY_BROKER_URL=url) == expected


NEXT_TICK = """
    import datetime as dt
    tick = celeryconfig.beat_schedule["dispatch-due-rows"]["schedule"]
    last = dt.datetime(2026, 12, 1, 14, 0, 0, 437000, tzinfo=dt.timezone.utc)
    now = last + dt.timedelta(seconds=0.1)
    tick.nowfun = lambda: now
    result = (now + tick.remaining_estimate(last)).strftime("%H:%M:%S.%f")[:12]
"""


@pytest.mark.parametrize("interval, next_tick", [("2", "14:00:02.000"), ("1", "14:00:01.000"),
                                                 ("5", "14:00:05.000"), ("0.5", "14:00:00.937")])
def test_dispatch_ticks_fall_on_whole_seconds_when_the_interval_allows(interval, next_tick):
    """asterCC's rows fall due on whole seconds: after a tick at 14:00:00.437 the next one runs at
    14:00:02.000 (interval 2 s), not at 14:00:02.437. Sub-second intervals are kept as they are."""
    assert configured(NEXT_TICK, SMS_DISPATCH_INTERVAL_S=interval) == next_tick
