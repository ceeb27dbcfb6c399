"""Watching the dispatcher in Flower: tasks appear by their readable names, their arguments are row ids
only, and no phone number or message text reaches Flower (or the broker it reads); the API needs the
password."""
from __future__ import annotations

import json

import pytest
import requests

from simulators.mobilgroup import MobilgroupSimulator
from tests.conftest import (
    app_env,
    free_port,
    insert_rows,
    rows_by_id,
    started,
    wait_until,
)

pytestmark = pytest.mark.integration

NUMBERS = ["+7 916 411-22-30", "+7 916 411-22-31", "+7 916 411-22-32"]
TEXT = "Secret appointment note for the patient"


def test_flower_shows_tasks_by_name_with_row_ids_only(db, mariadb_url, redis_url, celery):
    port = free_port()
    with started(MobilgroupSimulator()) as sim:
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup",
                      SMS_MOBILGROUP_URL=sim.api_url, SMS_MOBILGROUP_USER_ID=sim.user_id,
                      SMS_MOBILGROUP_USER=sim.user, SMS_MOBILGROUP_PASSWORD="p4ss-w0rd-secret",
                      SMS_DISPATCH_INTERVAL_S=1)
        sim.password = "p4ss-w0rd-secret"
        celery("worker", env, "-c", "2")
        celery("flower", env, f"--port={port}", "--address=127.0.0.1", "--basic-auth=ops:letmein")
        api = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: _get(f"{api}/workers", ("ops", "letmein")) is not None, 60, what="Flower to start")
        assert requests.get(f"{api}/tasks", timeout=5).status_code == 401, "Flower's API must need the password"
        ids = insert_rows(db, [(n, TEXT) for n in NUMBERS])
        celery("beat", env)
        wait_until(lambda: all(r["status"] == "success" for r in rows_by_id(db).values()), 60,
                   what="the rows to be sent")

        def send_tasks():
            # A row may have had more than one task (one that found its provider's threads busy gave the row
            # back, and the next tick queued it again): every row's is there.
            tasks = _get(f"{api}/tasks", ("ops", "letmein")) or {}
            found = {_row_id(t) for t in tasks.values() if t.get("name") == "sms.send" and t.get("state") == "SUCCESS"}
            return tasks if found == set(ids) else None

        tasks = wait_until(send_tasks, 30, what="Flower to show every send")

    sends = [t for t in tasks.values() if t["name"] == "sms.send"]
    assert {_row_id(t) for t in sends} == set(ids)
    assert {t["name"] for t in tasks.values()} >= {"sms.send", "sms.dispatch"}
    seen = json.dumps(tasks)
    for secret in [TEXT, "p4ss-w0rd-secret", *(n.replace(" ", "").replace("-", "").lstrip("+") for n in NUMBERS),
                   "411-22-3", "41122"]:
        assert secret not in seen, f"{secret!r} reached Flower"


def _get(url: str, auth):
    try:
        response = requests.get(url, auth=auth, timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def _row_id(task: dict) -> int:
    """The one argument of a send task as Flower shows it: `(123,)`."""
    return json.loads(task["args"].replace("(", "[").replace(",)", "]").replace(")", "]"))[0]
