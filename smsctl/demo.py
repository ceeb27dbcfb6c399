"""`make demo`: the whole job on the embedded default, with no services to install.

It makes a fresh SQLite database under `var/demo/`, creates asterCC's tables and ours, seeds sample asterCC
rows (most due now, some scheduled a little later, some invalid, some to numbers the simulators will report
undeliverable), starts the four provider simulators, the webhook app and the SMPP receiver in this process,
and a Celery beat and a Celery worker on the filesystem broker. On a terminal it draws the `smsctl status`
screen live; otherwise (CI) it prints a progress line a second and the screen once at the end. Every
process's log goes to a file under `var/demo/`, named at the end. It exits 0 with a summary once every row
reached a final status (1 if it did not within the time limit).

Routing: Russian numbers (+7) go to Mobilgroup (the default), Romanian (+40) to Accolades, British (+44)
to Ozeki, German (+49) to smsc.ru over SMPP.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text
from sqlalchemy import text

from smsctl.processes import CeleryProcess, stop_all

DEMO_DIR = Path("var/demo").resolve()
FINAL = ("success", "failed", "error")
OPEN_DISPATCH = ("queued", "sending", "waiting", "accepted")
LOGS = {"worker.log": "Celery worker", "beat.log": "Celery beat",
        "demo.log": "simulators, webhook app, SMPP receiver, migrations"}


def _sample_rows(n: int) -> list[tuple[str, str, str, str]]:
    """(target, text, schedule, what it shows): mostly good rows, then the cases an operator meets."""
    special = [
        ("+7 903 555-00-13", "Your order has shipped.", "now", "undeliverable (reported by the poll)"),
        ("+40 721 555 013", "Comanda dvs. a fost expediată.", "now", "Accolades, undeliverable (webhook)"),
        ("+44 7400 900013", "Your parcel is delayed.", "now", "Ozeki, undeliverable (webhook)"),
        ("+49 1512 3456013", "Ihr Termin ist morgen.", "now", "smsc.ru, undeliverable (SMPP receipt)"),
        ("12", "Hello", "now", "not a phone number"),
        ("+7 903 555-01-01", "", "now", "empty text"),
        ("+7 903 555-01-02", None, "now", "missing archive row"),
        ("+7 903 555-01-03", "x" * 200, "now", "too long for the provider"),
        ("8 (903) 555-01-04", "Reminder: your appointment is tomorrow at 10:00.", "later", "scheduled later"),
        ("+7 903 555 01 05", "Ваш код: 4711", "later", "scheduled later, Cyrillic"),
    ]
    # One template per route; ending in 2 keeps ordinary numbers clear of the simulators' "undeliverable" 13.
    countries = ["+7 903 {:03d}-{:02d}-12", "+40 721 {:03d} {:02d}2", "+44 7400 {:03d}{:02d}2",
                 "+49 1512 3{:03d}{:02d}2"]
    rows = [(countries[i % 4].format(i, i % 100), f"Demo message {i}: thank you for calling.", "now", "due now")
            for i in range(max(n - len(special), 0))]
    return rows + special


def _seed(engine, rows) -> None:
    with engine.begin() as conn:
        for target, body, schedule, _ in rows:
            archive_id = 999_999
            if body is not None:
                archive_id = conn.execute(
                    text("INSERT INTO cc10_batchcontact_archives (archivetype, content) VALUES ('sms', :c)"),
                    {"c": body}).lastrowid
            # A zero date (asterCC's "now") stays text in SQLite, which reads it back as no date at all.
            when = ("datetime('now', 'localtime')" if schedule == "now"
                    else "datetime('now', 'localtime', '+8 seconds')")
            conn.execute(text(
                "INSERT INTO cc10_batchcontacts (batchcontact_archive_id, target, status, schedulertime, creby,"
                f" error_msg, responsenote) VALUES (:a, :t, 'new', {when}, 'demo', '', '')"),
                {"a": archive_id, "t": target})


def _snapshot(engine) -> tuple[Counter, Counter]:
    with engine.connect() as conn:
        statuses = Counter(dict(conn.execute(text(
            "SELECT status, COUNT(*) FROM cc10_batchcontacts GROUP BY status")).all()))
        states = Counter(dict(conn.execute(text(
            "SELECT state, COUNT(*) FROM sms_dispatch GROUP BY state")).all()))
    return statuses, states


def _finished(statuses: Counter, states: Counter, total: int) -> bool:
    return sum(statuses[s] for s in FINAL) == total and not any(states[s] for s in OPEN_DISPATCH)


class StandIns:
    """The four provider simulators, the webhook app and the SMPP receiver, run in this process."""

    def __init__(self):
        from simulators.accolades import AccoladesSimulator
        from simulators.mobilgroup import MobilgroupSimulator
        from simulators.ozeki import OzekiSimulator
        from simulators.smsc import SmscSimulator

        self.mobilgroup = MobilgroupSimulator(fail_rate=0.15, seed=7).start()
        self.accolades = AccoladesSimulator(report_delay_s=1.0).start()
        self.ozeki = OzekiSimulator(report_delay_s=1.0).start()
        self.smsc = SmscSimulator(receipt_delay_s=1.0)
        self.smsc.start()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.public_url = ""

    def env(self) -> dict[str, str]:
        # The webhook app's port is taken now so that the workers can be told the callback URL.
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.public_url = f"http://127.0.0.1:{port}"
        m, a, o = self.mobilgroup, self.accolades, self.ozeki
        return {
            "SMS_DEFAULT_PROVIDER": "mobilgroup",
            "SMS_ROUTES": "40=accolades,44=ozeki,49=smsc",
            "SMS_PUBLIC_URL": self.public_url,
            "SMS_WEBHOOK_SECRET": secrets.token_hex(16),
            "SMS_MOBILGROUP_URL": m.api_url, "SMS_MOBILGROUP_USER_ID": m.user_id,
            "SMS_MOBILGROUP_USER": m.user, "SMS_MOBILGROUP_PASSWORD": m.password,
            "SMS_ACCOLADES_URL": a.url, "SMS_ACCOLADES_ACCOUNT": a.account, "SMS_ACCOLADES_PASSWORD": a.password,
            "SMS_OZEKI_URL": o.url + "/api", "SMS_OZEKI_USERNAME": o.username, "SMS_OZEKI_PASSWORD": o.password,
            "SMS_SMSC_HOST": "127.0.0.1", "SMS_SMSC_PORT": str(self.smsc.port),
            "SMS_SMSC_SYSTEM_ID": self.smsc.system_id, "SMS_SMSC_PASSWORD": self.smsc.password,
        }

    def start_receivers(self) -> None:
        """The webhook app and the SMPP receiver; they write to the database, so they start after it exists."""
        from settings import get_settings
        from workflow.smpp_receiver import run_receiver
        from webhooks.app import create_app, make_server

        port = int(self.public_url.rsplit(":", 1)[1])
        web = make_server(create_app(), "127.0.0.1", port)
        self._threads = [
            threading.Thread(target=web.run_until, args=(self._stop,), daemon=True),
            threading.Thread(target=run_receiver, args=(get_settings(), self._stop), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for simulator in (self.mobilgroup, self.accolades, self.ozeki, self.smsc):
            simulator.stop()


def _log_to_file(path: Path) -> None:
    """Everything this process logs (Alembic, the webhook app's access log, the SMPP receiver) goes to
    `path`, not the screen."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _progress(statuses: Counter, states: Counter, elapsed_s: float) -> str:
    line = "  ".join(f"{s}={statuses[s]}" for s in ("new", "pending", "success", "failed", "error"))
    return f"[{elapsed_s:5.1f}s] {line}  (awaiting status poll: {states['accepted']})"


def run_demo(rows: int = 40, timeout_s: int = 180) -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    _log_to_file(DEMO_DIR / "demo.log")
    console = Console()
    stand_ins = StandIns()
    env = {
        **os.environ,
        **stand_ins.env(),
        "SMS_VAR_DIR": str(DEMO_DIR),
        "SMS_DATABASE_URL": f"sqlite:///{DEMO_DIR / 'sms.db'}",
        "CELERY_BROKER_URL": "filesystem://",
        # The simulator's messages "expire" at once, so the demo can show the status poll.
        "SMS_MOBILGROUP_POLL_AFTER_S": "3",
        "SMS_MOBILGROUP_POLL_INTERVAL_S": "1",
        "SMS_MOBILGROUP_RATE": "50",
        # A retry of a message is an identical request too; the production default of 60 s would make a
        # message hit by one of the simulator's 503s wait a minute, which is right but slow to watch.
        "SMS_MOBILGROUP_IDENTICAL_S": "5",
        "SMS_DISPATCH_INTERVAL_S": "1",
        "SMS_RETRY_BASE_S": "0.5",
        "SMS_RETRY_MAX_S": "2",
    }
    os.environ.update(env)  # this process reads the same database
    from db import schema
    from db.engine import engine_for
    from settings import get_settings
    from smsctl import overview, status
    from workflow.throttle import LocalThrottle

    engine = engine_for(env["SMS_DATABASE_URL"])
    schema.upgrade(env["SMS_DATABASE_URL"])
    schema.create_astercc(engine)
    sample = _sample_rows(rows)
    _seed(engine, sample)
    stand_ins.start_receivers()
    print(f"seeded {len(sample)} asterCC rows into {_shown(DEMO_DIR / 'sms.db')}; routes: {env['SMS_ROUTES']}, "
          "the rest to mobilgroup, whose simulator answers 15% of requests with HTTP 503", flush=True)

    procs = [
        CeleryProcess(["worker", "-l", "info", "-c", "4", "-n", "demo@%h",
                       "-Q", "dispatch,send.mobilgroup,send.accolades,send.ozeki,send.smsc"],
                      env, DEMO_DIR / "worker.log"),
        CeleryProcess(["beat", "-l", "info"], env, DEMO_DIR / "beat.log"),
    ]
    settings, throttle = get_settings(), LocalThrottle(DEMO_DIR / "throttle.sqlite3")

    def screen(progress: str):
        return Group(Text(progress), status.screen(overview.read(settings, engine, throttle)))

    started = time.monotonic()
    code = 1
    live = console.is_terminal
    try:
        with Live(Text("starting…"), console=console, auto_refresh=False) if live else nullcontext() as shown:
            while time.monotonic() - started < timeout_s:
                time.sleep(1)
                statuses, states = _snapshot(engine)
                progress = _progress(statuses, states, time.monotonic() - started)
                if live:
                    shown.update(screen(progress), refresh=True)
                else:
                    print(progress, flush=True)
                if not all(p.running() for p in procs):
                    print("a Celery process stopped unexpectedly; see its log below", file=sys.stderr)
                    break
                if _finished(statuses, states, len(sample)):
                    code = 0
                    break
            else:
                print(f"not every row reached a final status within {timeout_s} s", file=sys.stderr)
        if not live:
            print("\n" + status.plain(overview.read(settings, engine, throttle)), flush=True)
    finally:
        stop_all(procs)
        stand_ins.stop()
        throttle.close()
    _summary(engine, sample, stand_ins)
    print("\nlogs: " + "; ".join(f"{_shown(DEMO_DIR / name)} ({what})" for name, what in LOGS.items()))
    return code


def _shown(path: Path) -> str:
    """`path` relative to the working directory where it is inside it (as an operator would type it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _summary(engine, sample, stand_ins: StandIns) -> None:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT b.id, b.status, b.error_msg, d.state, d.failures, d.provider FROM cc10_batchcontacts b "
            "LEFT JOIN sms_dispatch d ON d.batchcontact_id = b.id ORDER BY b.id")).all()
    sends = Counter(e["outcome"] for e in stand_ins.mobilgroup.events("send"))
    shown = [(row, what) for row, (_, _, _, what) in zip(rows, sample)]
    ordinary = [pair for pair in shown if pair[1] == "due now"]
    print("\n  id  what it shows                            provider    status   failures  error_msg")
    print("  --  ---------------------------------------  ----------  -------  --------  ---------")
    for row, what in ordinary[:4] + [pair for pair in shown if pair[1] != "due now"]:
        print(f"  {row.id:>2}  {what:<39}  {row.provider or '-':<10}  {row.status:<7}  {row.failures or 0:>8}"
              f"  {row.error_msg}")
    print(f"  (and {len(ordinary) - 4} more 'due now' rows)")
    totals = Counter(r.status for r in rows)
    print("\nasterCC statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    print("by provider: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.provider or "none (invalid number)"
                                                                           for r in rows).items())))
    print(f"the Mobilgroup simulator took {sends['accepted']} messages, refused {sends['duplicate']} resends "
          f"as already sent, and answered {len(stand_ins.mobilgroup.events('fault'))} requests with HTTP 503")
