"""Campaign days: fair turns between batches when waiting rows are released, how a campaign row is told from
a single message, and (with real workers and the Mobilgroup simulator) that an agent's message never waits
behind a campaign while two campaigns share the provider's rate.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import bindparam, select, text, update

import workflow
from bench import campaign_day
from db import store
from db.models import Dispatch
from providers.base import DeliveryReport
from settings import ConfigError, load_settings
from prometheus_client import generate_latest
from simulators.mobilgroup import MobilgroupSimulator
from smsctl import metrics, overview, status
from tests.conftest import REDIS_PREFIX, ROOT, app_env, insert_campaign, rows_by_id, started, wait_until
from tests.test_workflow import due_now, runtime, sim  # noqa: F401 - fixtures
from workflow.campaigns import main_zone, optout_word, quiet_left_s, recipient_zone
from workflow.reports import apply_report
from workflow.routing import normalise
from workflow.runtime import Runtime


def normalised(target: str) -> str:
    return normalise(target, load_settings())


@pytest.fixture(params=["db", "sqlite_db"])
def engine(request):
    return request.getfixturevalue(request.param)


def ago(seconds: float) -> datetime:
    return datetime.now().replace(microsecond=0) - timedelta(seconds=seconds)


def number(i: int) -> str:
    return f"+7 916 {200 + i // 10_000:03d}-{(i // 100) % 100:02d}-{i % 100:02d}"


def quiet_hours_now_in(zone: str) -> str:
    """An `SMS_QUIET_HOURS` window from an hour ago to an hour from now on `zone`'s clocks."""
    now = datetime.now(ZoneInfo(zone))
    return f"{now - timedelta(hours=1):%H:%M}-{now + timedelta(hours=1):%H:%M}"


def claim_and_route(engine, provider: str = "mobilgroup") -> list[store.Claimed]:
    """Claim every due row and route it to `provider`, as a dispatch tick does."""
    claimed = store.claim_due(engine, 1000)
    store.assign_routes(engine, {row.id: (provider, f"7916{row.id:07d}") for row in claimed})
    return claimed


def test_release_takes_turns_between_batches_each_oldest_due_first(engine):
    first = insert_campaign(engine, [number(i) for i in range(10)], "Sale", due=ago(30))
    second = insert_campaign(engine, [number(100 + i) for i in range(5)], "Other sale", due=ago(20))
    # An agent's message with the campaign's creby: still a batch of its own.
    single = insert_campaign(engine, [number(900)], "Your courier comes at 14:00", due=ago(1))
    claim_and_route(engine)

    released = store.release_waiting(engine, "mobilgroup", 4, 30)
    assert [r.id for r in released] == [first[0], second[0], single[0], first[1]]
    assert {r.batch for r in released} == {r.batch for r in released[:3]}
    rest = [r.id for r in store.release_waiting(engine, "mobilgroup", 100, 30)]
    assert rest == [first[2], second[1], first[3], second[2], first[4], second[3], first[5], second[4]] + first[6:], \
        "each turn takes every batch's next row, the older batch first"


def test_a_campaign_row_is_one_whose_batch_has_more_than_one_row(engine):
    campaign = insert_campaign(engine, [number(i) for i in range(3)], "Sale", due=ago(5))
    single = insert_campaign(engine, [number(50)], "Your code is 1234", due=ago(5))
    # A campaign whose rows fall due at different times: its first row is claimed alone, yet is a campaign's.
    staggered = insert_campaign(engine, [number(60), number(61)], "Reminder", due=ago(5))
    with engine.begin() as conn:
        conn.execute(text("UPDATE cc10_batchcontacts SET schedulertime = :t WHERE id = :i"),
                     {"t": "2099-01-01 00:00:00", "i": staggered[1]})

    claimed = {row.id: row.campaign for row in claim_and_route(engine)}
    assert claimed == {campaign[0]: True, campaign[1]: True, campaign[2]: True, single[0]: False,
                       staggered[0]: True}
    with engine.connect() as conn:
        recorded = dict(conn.execute(select(Dispatch.batchcontact_id, Dispatch.campaign)).all())
        batches = set(conn.scalars(select(Dispatch.batch_id)))
    assert recorded == {k: bool(v) for k, v in claimed.items()}
    assert len(batches) == 3


@pytest.mark.integration
def test_singles_go_within_seconds_beside_campaigns_which_share_the_rate(db, mariadb_url, redis_url, celery):
    """Shortened from the issue's figures (3,000 + 1,500 rows, a 20 s window: `bench/campaign_day.py`): 800
    rows at T, 400 at T+8 s, singles every 2 s, at 40 msg/s with a 1 s tick."""
    rate = 40
    sim = MobilgroupSimulator()
    with started(sim):
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url,
                      SMS_MOBILGROUP_USER_ID=sim.user_id, SMS_MOBILGROUP_USER=sim.user,
                      SMS_MOBILGROUP_PASSWORD=sim.password, SMS_MOBILGROUP_RATE=rate, SMS_DISPATCH_INTERVAL_S=1)
        celery("worker", env)
        celery("beat", env)
        [warm] = insert_campaign(db, [number(9999)], "warming up")
        wait_until(lambda: any(int(e["id"]) == warm for e in sim.events("send")), 60, what="the worker to start")
        figures = campaign_day.play(db, sim, rate=rate, first=800, second=400, second_after_s=8, window_s=10,
                                    singles_every_s=2, timeout_s=120)

    assert figures.twice == 0, "a message reached the provider twice"
    assert figures.sent == figures.rows
    assert max(figures.singles_s) <= 6, f"a single waited too long: {sorted(figures.singles_s)}"
    assert 0.35 <= figures.second_share <= 0.65, figures.second_share
    assert figures.used >= 0.85, figures.used


# --- opt-out by reply ---------------------------------------------------------------------------------

WORDS = ["STOP", "СТОП", "ОТПИСАТЬСЯ", "UNSUBSCRIBE"]


@pytest.mark.parametrize("reply, word", [
    ("STOP", "STOP"), ("stop", "STOP"), (" Stop! ", "STOP"), ("\u00abстоп\u00bb.", "СТОП"), ("Стоп", "СТОП"),
    ("отписаться", "ОТПИСАТЬСЯ"), ("ОТПИСАТЬСЯ!!!", "ОТПИСАТЬСЯ"), ("Unsubscribe.", "UNSUBSCRIBE"),
    ("stop it", None), ("don't stop", None), ("STOPS", None), ("", None), ("!!!", None),
])
def test_a_reply_opts_out_when_it_is_one_of_the_words_whatever_its_case_and_punctuation(reply, word):
    assert optout_word(reply, WORDS) == word


def test_optout_words_come_from_the_setting_and_a_bad_one_names_the_variable():
    assert load_settings().optout_word_list == WORDS
    assert load_settings(optout_words="STOP, arrêt ").optout_word_list == ["STOP", "arrêt"]
    with pytest.raises(ConfigError, match="SMS_OPTOUT_WORDS"):
        load_settings(optout_words="x" * 33)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smsctl.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.integration
def test_campaigns_skip_numbers_that_replied_stop_until_an_operator_removes_them(db, mariadb_url, redis_url,
                                                                                 celery):
    sim = MobilgroupSimulator()
    targets = ["+7 916 400-00-01", "8 (916) 400-00-02", "+7 916 400-00-03", "+7 916 400-00-04",
               "+7 916 400-00-05", "+7 916 400-00-06"]
    replies = ["stop", " СТОП! ", "Отписаться", "UNSUBSCRIBE.", "stop it"]  # the sixth number says nothing
    with started(sim):
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url,
                      SMS_MOBILGROUP_USER_ID=sim.user_id, SMS_MOBILGROUP_USER=sim.user,
                      SMS_MOBILGROUP_PASSWORD=sim.password, SMS_DISPATCH_INTERVAL_S=1,
                      SMS_MOBILGROUP_IDENTICAL_S=1)
        celery("worker", env)
        celery("beat", env)

        def sent(ids):
            return lambda: all(rows_by_id(db)[i]["status"] in ("success", "failed") for i in ids)

        first = insert_campaign(db, targets, "Spring sale")
        wait_until(sent(first), 60, what="the first campaign")
        for row_id, reply in zip(first, replies):
            assert apply_report(db, "mobilgroup", DeliveryReport("accepted", reply_text=reply,
                                                                 recipient=normalised(targets[first.index(row_id)])),
                                optout_words=WORDS) == "applied"
        assert rows_by_id(db)[first[0]]["responsenote"] == "stop"

        second = insert_campaign(db, targets, "Summer sale")
        single = insert_campaign(db, ["+7 916 400-00-01"], "Your courier arrives at 14:00", creby="campaigns")
        wait_until(sent(second + single), 60, what="the second campaign")
        rows = rows_by_id(db)
        today = datetime.now().strftime("%Y-%m-%d")
        for row_id, word in zip(second, ["STOP", "СТОП", "ОТПИСАТЬСЯ", "UNSUBSCRIBE"]):
            assert (rows[row_id]["status"], rows[row_id]["error_msg"]) == \
                ("failed", f"the recipient opted out by replying {word} on {today}")
        assert [rows[i]["status"] for i in second[4:] + single] == ["success"] * 3, "a single or a number that " \
                                                                                 "did not opt out was held"
        reached = Counter(e["phone"] for e in sim.events("send") if e["outcome"] == "accepted")
        assert reached["79164000001"] == 2 and reached["79164000002"] == 1, "the campaign reached an opted-out number"

        listed = run_cli(env, "optout", "list")
        assert listed.returncode == 0, listed.stderr
        assert "+79*******01" in listed.stdout and "79164000001" not in listed.stdout
        assert len(listed.stdout.splitlines()) == 4
        removed = run_cli(env, "optout", "remove", "8 916 400-00-02")
        assert removed.returncode == 0, removed.stderr
        added = run_cli(env, "optout", "add", "+7 916 400 00 06")
        assert added.returncode == 0, added.stderr

        third = insert_campaign(db, targets[:2] + targets[5:], "Autumn sale")
        wait_until(sent(third), 60, what="the third campaign")
        rows = rows_by_id(db)
        assert [rows[i]["status"] for i in third] == ["failed", "success", "failed"]
        assert rows[third[2]]["error_msg"] == f"the recipient is on the opt-out list (added by an operator on {today})"


# --- quiet hours --------------------------------------------------------------------------------------

NIGHT = (time(21), time(9))


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("zone, now, left_h", [
    ("Europe/Moscow", utc(2026, 12, 7, 19, 0), 11),          # 22:00 there: until 09:00, 11 h
    ("Europe/Moscow", utc(2026, 12, 7, 3, 30), 2.5),         # 06:30 there
    ("Europe/Moscow", utc(2026, 12, 7, 6, 0), None),         # 09:00 there: over
    ("Europe/Moscow", utc(2026, 12, 7, 17, 59), None),       # 20:59 there: not yet
    ("Europe/Bucharest", utc(2026, 12, 7, 18, 59, 59), None),  # 20:59:59 there, 21:59:59 in Moscow
    ("Europe/Bucharest", utc(2026, 12, 7, 19, 0), 12),
    # Clocks go back in London on 25 October 2026: 22:30 BST to 09:00 GMT is 11.5 h, not the wall's 10.5.
    ("Europe/London", utc(2026, 10, 24, 21, 30), 11.5),
    # Clocks go forward in New York on 8 March 2026: 22:00 EST to 09:00 EDT is 10 h, not the wall's 11.
    ("America/New_York", utc(2026, 3, 8, 3, 0), 10),
])
def test_quiet_hours_end_when_the_recipient_s_clocks_show_the_end(zone, now, left_h):
    left = quiet_left_s(zone, NIGHT, now)
    assert (left if left is None else round(left / 3600, 6)) == (left_h if left_h is None else round(left_h, 6))


def test_a_window_within_one_day_and_one_that_ends_in_a_skipped_hour():
    assert quiet_left_s("Europe/Moscow", (time(13), time(14)), utc(2026, 12, 7, 10, 30)) == 1800
    assert quiet_left_s("Europe/Moscow", (time(13), time(14)), utc(2026, 12, 7, 11, 0)) is None
    # 02:30 does not exist in New York on 8 March 2026: read as before the change (EST), 07:30 UTC.
    assert quiet_left_s("America/New_York", (time(22), time(2, 30)), utc(2026, 3, 8, 5, 0)) == 2.5 * 3600


def test_the_recipient_s_zone_is_the_number_s_unless_its_zones_differ():
    plain = load_settings(quiet_hours="21:00-09:00")
    assert recipient_zone("74951234567", plain) == "Europe/Moscow"       # a Moscow landline
    assert recipient_zone("40712000042", plain) == "Europe/Bucharest"
    assert recipient_zone("79161234567", plain) == "Europe/Moscow"       # a mobile: any of eleven zones
    assert recipient_zone("79161234567", load_settings(quiet_hours="21:00-09:00",
                                                        quiet_hours_tz="Asia/Vladivostok")) == "Asia/Vladivostok"
    assert main_zone("RO") == "Europe/Bucharest"


@pytest.mark.parametrize("name, value, message", [
    ("quiet_hours", "21-9", "SMS_QUIET_HOURS: .*21:00-09:00"),
    ("quiet_hours", "09:00-09:00", "SMS_QUIET_HOURS: .*starts when it ends"),
    ("quiet_hours_tz", "Mars/Olympus", "SMS_QUIET_HOURS_TZ: .*not a time zone"),
])
def test_a_bad_quiet_hours_setting_names_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(**{name: value})
    assert load_settings().quiet_window is None


@pytest.mark.integration
def test_campaign_rows_wait_for_the_end_of_quiet_hours_at_the_recipient_s_and_singles_do_not(
        db, mariadb_url, redis_url, celery):
    """Quiet hours that end 12 s from now in UTC, the zone set for Russian mobiles; Bucharest is two hours
    ahead, outside the window."""
    sim = MobilgroupSimulator()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ends = now + timedelta(seconds=12)
    window = f"{(now - timedelta(hours=1)):%H:%M:%S}-{ends:%H:%M:%S}"
    with started(sim):
        env = app_env(mariadb_url, redis_url, SMS_DEFAULT_PROVIDER="mobilgroup", SMS_MOBILGROUP_URL=sim.api_url,
                      SMS_MOBILGROUP_USER_ID=sim.user_id, SMS_MOBILGROUP_USER=sim.user,
                      SMS_MOBILGROUP_PASSWORD=sim.password, SMS_DISPATCH_INTERVAL_S=1,
                      SMS_ALLOWED_COUNTRIES="RU,RO", SMS_QUIET_HOURS=window, SMS_QUIET_HOURS_TZ="UTC")
        celery("worker", env)
        celery("beat", env)
        night = [f"+7 916 500-00-0{i}" for i in range(4)]
        day = ["+40 712 000 042", "+40 712 000 043"]
        campaign = insert_campaign(db, night + day, "Spring sale")
        [single] = insert_campaign(db, [night[0]], "Your courier arrives at 14:00")
        held = campaign[:len(night)]

        wait_until(lambda: all(rows_by_id(db)[i]["status"] == "success" for i in campaign[len(night):] + [single]),
                   20, what="the rows outside quiet hours")
        with db.connect() as conn:
            waits = conn.execute(text("SELECT state, wait_reason, next_attempt_at, claimed_at FROM sms_dispatch"
                                      " WHERE batchcontact_id IN :ids").bindparams(bindparam("ids", expanding=True)),
                                 {"ids": held}).all()
        local_end = ends.astimezone().replace(tzinfo=None)  # our timestamps are the database's local time
        assert {(w.state, w.wait_reason) for w in waits} == {("waiting", "quiet")}
        assert all(abs((w.next_attempt_at - local_end).total_seconds()) <= 1 for w in waits), waits
        assert all(w.claimed_at == w.next_attempt_at for w in waits), "the retry windows count through the night"

        wait_until(lambda: all(rows_by_id(db)[i]["status"] == "success" for i in held), 60,
                   what="the held rows after quiet hours")
    accepted = {int(e["id"]): e["time"] for e in sim.events("send") if e["outcome"] == "accepted"}
    assert min(accepted[i] for i in held) >= ends.timestamp() - 0.01, "a row went during quiet hours"
    assert max(accepted[i] for i in held) <= ends.timestamp() + 10
    assert max(accepted[i] for i in campaign[len(night):] + [single]) < ends.timestamp()


# --- what the operator sees -------------------------------------------------------------------------

def in_process(mariadb_url: str, redis_url: str, **overrides):
    """Settings for dispatch ticks run in this process; the provider is never called."""
    return load_settings(database_url=mariadb_url, redis_url=redis_url, redis_prefix=REDIS_PREFIX,
                         default_provider="mobilgroup", mobilgroup_url="http://127.0.0.1:9/extxml.php",
                         mobilgroup_user_id="1", mobilgroup_user="demo", mobilgroup_password="demo", **overrides)


@pytest.mark.integration
def test_status_metrics_and_the_tick_show_quiet_rows_campaigns_and_opt_outs(db, mariadb_url, redis_url, caplog):
    """Quiet hours now in Bucharest (Romanian numbers), not in Vladivostok, the zone set for Russian mobiles."""
    window = quiet_hours_now_in("Europe/Bucharest")
    settings = in_process(mariadb_url, redis_url, mobilgroup_rate=5, mobilgroup_max_inflight=4,
                          allowed_countries="RU,RO", quiet_hours=window, quiet_hours_tz="Asia/Vladivostok")
    store.add_optout(db, "79164000099", "STOP")
    night = insert_campaign(db, ["+40 712 000 042", "+40 712 000 043", "+40 712 000 044"], "Sale",
                            creby="marketing")
    day = insert_campaign(db, [number(10 + i) for i in range(6)] + ["+7 916 400-00-99"], "Other sale",
                          creby="sales")
    [single] = insert_campaign(db, [number(50)], "Your code is 1234", creby="sales")
    enqueued: list[int] = []
    with caplog.at_level(logging.INFO, logger="workflow.dispatch"):
        workflow.dispatch_due(Runtime(settings), lambda ids, provider: enqueued.extend(ids))

    assert enqueued == [day[0], single, day[1], day[2]], "not one row per batch a turn, the quiet ones held"
    with db.connect() as conn:
        batch = dict(conn.execute(text("SELECT id, batchcontact_archive_id FROM cc10_batchcontacts")).all())
    [tick] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dispatch: mobilgroup:")]
    assert tick == (f"dispatch: mobilgroup: in flight 0 of 4, waiting: quiet 3, room 7; account circuit closed; "
                    f"released 4 (batch {batch[day[0]]}: 3, batch {batch[single]}: 1)")
    logged = [r.getMessage() for r in caplog.records]
    assert "dispatch: 1 campaign rows end failed: their recipients opted out" in logged
    assert f"dispatch: 3 campaign rows wait for the end of quiet hours ({window}) at their recipients' " \
           "(Europe/Bucharest)" in logged

    view = overview.read(settings, db)
    assert {c.creby: (c.batch, c.rows) for c in view.campaigns} == {
        "marketing": (batch[night[0]], {"sent": 0, "waiting": 3, "failed": 0, "error": 0}),
        "sales": (batch[day[0]], {"sent": 0, "waiting": 6, "failed": 1, "error": 0}),
    }, "the single is no campaign"
    assert view.optouts == 1
    [mobilgroup] = [p for p in view.providers if p.name == "mobilgroup"]
    assert mobilgroup.waiting == {"quiet": 3, "queued": 4, "room": 3}
    shown = status.plain(view)
    assert "waiting: queued 4, room 3, quiet 3;" in shown
    assert f"campaign batch {batch[day[0]]} by sales: sent 0, waiting 6, failed 1, error 0" in shown
    assert "1 numbers opted out of campaigns" in shown
    body = generate_latest(metrics.registry(settings, db)).decode()
    assert f'sms_campaign_rows{{batch="{batch[night[0]]}",creby="marketing",progress="waiting"}} 3.0' in body
    assert 'sms_waiting{provider="mobilgroup",reason="quiet"} 3.0' in body
    assert "sms_optouts 1.0" in body


@pytest.mark.integration
def test_a_single_due_behind_a_campaign_still_being_claimed_is_claimed_at_the_next_tick(db, mariadb_url,
                                                                                          redis_url):
    settings = in_process(mariadb_url, redis_url, dispatch_batch=10)
    campaign = insert_campaign(db, [number(i) for i in range(40)], "Sale", due=ago(60))
    [single] = insert_campaign(db, [number(99)], "Your code is 1234", due=ago(1))
    enqueued: list[int] = []
    # No time to claim more than one batch: the tick claims the ten oldest, then the ten latest.
    assert workflow.dispatch_due(Runtime(settings), lambda ids, provider: enqueued.extend(ids), budget_s=0) == 20
    with db.connect() as conn:
        claimed = set(conn.scalars(select(Dispatch.batchcontact_id)))
    assert claimed == set(campaign[:10]) | set(campaign[-9:]) | {single}
    assert single in enqueued


@pytest.mark.integration
def test_campaign_rows_routed_by_another_tick_after_this_one_held_quiet_rows_are_not_released_by_it(
        db, mariadb_url, redis_url, monkeypatch):
    """Two ticks overlap (two housekeeping threads, a claim loop as long as the interval): this tick has held
    the quiet rows, then the other claims and routes a campaign to a recipient in quiet hours, and this tick
    releases. The release must know the quiet zones itself: the new rows wait for the next tick's hold."""
    window = quiet_hours_now_in("Europe/Bucharest")
    rt = Runtime(in_process(mariadb_url, redis_url, allowed_countries="RU,RO", quiet_hours=window))
    hold = workflow.dispatch.hold_quiet
    late: list[int] = []

    def then_another_tick_routes_a_campaign(rt):
        zones = hold(rt)
        late.extend(insert_campaign(db, ["+40 712 000 052", "+40 712 000 053"], "Sale"))
        workflow.dispatch.route_claimed(rt, store.claim_due(rt.engine, 10))
        return zones

    monkeypatch.setattr(workflow.dispatch, "hold_quiet", then_another_tick_routes_a_campaign)
    enqueued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    assert late and enqueued == [], "a campaign row went during its recipient's quiet hours"
    monkeypatch.setattr(workflow.dispatch, "hold_quiet", hold)
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    assert enqueued == [] and {rows_by_id(db)[i]["wait_reason"] for i in late} == {"quiet"}


@pytest.mark.integration
def test_a_campaign_row_released_by_another_tick_the_moment_it_is_routed_already_has_its_zone(
        db, mariadb_url, redis_url, monkeypatch):
    """Routing makes a row releasable: an overlapping tick may release it the next instant, and by then the
    row must carry its recipient's zone, or the release cannot see its quiet hours."""
    window = quiet_hours_now_in("Europe/Bucharest")
    rt = Runtime(in_process(mariadb_url, redis_url, allowed_countries="RU,RO", quiet_hours=window))
    assign, released = store.assign_routes, []

    def then_another_tick_releases(engine, routes):
        assign(engine, routes)
        released.extend(store.release_waiting(engine, "mobilgroup", 10, 30,
                                              quiet=workflow.dispatch.quiet_now(rt)))

    monkeypatch.setattr(store, "assign_routes", then_another_tick_releases)
    night = insert_campaign(db, ["+40 712 000 062", "+40 712 000 063"], "Sale")
    workflow.dispatch_due(rt, lambda ids, provider: None)
    assert released == [] and {rows_by_id(db)[i]["wait_reason"] for i in night} == {"quiet"}


@pytest.mark.integration
def test_a_campaign_row_held_for_quiet_hours_stays_held_when_its_provider_fails_over(db, mariadb_url, redis_url):
    """Quiet hours now at the recipient's (Bucharest); the campaign's provider becomes unavailable and its
    waiting rows move to the fallback. Quiet hours are the recipient's, whichever provider sends: the held
    rows must not go out at night through the fallback, and they go there once the window ends."""
    window = quiet_hours_now_in("Europe/Bucharest")
    settings = in_process(mariadb_url, redis_url, allowed_countries="RU,RO", quiet_hours=window,
                          failover="mobilgroup:accolades", accolades_url="http://127.0.0.1:9",
                          accolades_account="1000", accolades_password="demo")
    night = insert_campaign(db, ["+40 712 000 042", "+40 712 000 043"], "Sale")
    rt = Runtime(settings)
    enqueued: list[tuple[int, str]] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend((i, provider) for i in ids))
    assert enqueued == [], "a row went during quiet hours"

    store.trip_breaker(db, "mobilgroup", 300, "unreachable: test")
    rt.forget_breakers()
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend((i, provider) for i in ids))
    assert enqueued == [], "a held row went through the fallback during quiet hours"
    rows = rows_by_id(db)
    assert {rows[i]["wait_reason"] for i in night} == {"quiet"}

    due_now(db, *night)  # the window has ended at the recipients'
    rt = Runtime(in_process(mariadb_url, redis_url, allowed_countries="RU,RO", failover="mobilgroup:accolades",
                            accolades_url="http://127.0.0.1:9", accolades_account="1000",
                            accolades_password="demo"))
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend((i, provider) for i in ids))
    assert sorted(enqueued) == [(i, "accolades") for i in night]


@pytest.mark.integration
def test_a_campaign_row_waiting_when_its_recipient_opts_out_ends_failed_before_it_is_sent(db, mariadb_url,
                                                                                            redis_url):
    settings = in_process(mariadb_url, redis_url, mobilgroup_max_inflight=1)
    rt = Runtime(settings)
    campaign = insert_campaign(db, [number(i) for i in range(3)], "Sale")
    enqueued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    assert enqueued == campaign[:1]
    store.add_optout(db, normalised(number(2)), "STOP")   # the reply came while its row waited for room

    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    rows = rows_by_id(db)
    assert (rows[campaign[2]]["status"], rows[campaign[2]]["error_msg"]) == \
        ("failed", f"the recipient opted out by replying STOP on {datetime.now():%Y-%m-%d}")
    assert rows[campaign[1]]["state"] == "waiting" and enqueued == campaign[:1]


@pytest.mark.integration
def test_opted_out_rows_beyond_what_one_tick_ends_are_not_released_meanwhile(db, mariadb_url, redis_url,
                                                                           monkeypatch):
    """A tick ends at most `OPTOUTS_PER_TICK` opted-out rows (here 2 of 5); the others must wait for the next
    ticks, not go to the broker in this one: each would reach a recipient who replied STOP. Nor may a row
    routed by another tick after this one's opt-out check be released by it (the release itself checks)."""
    monkeypatch.setattr(workflow.dispatch, "OPTOUTS_PER_TICK", 2)
    rt = Runtime(in_process(mariadb_url, redis_url, mobilgroup_max_inflight=10))
    for i in range(5):
        store.add_optout(db, normalised(number(i)), "STOP")
    campaign = insert_campaign(db, [number(i) for i in range(6)], "Sale")
    enqueued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    assert enqueued == campaign[5:], "a row whose recipient replied STOP went to the broker"
    for _ in range(3):
        workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    rows = rows_by_id(db)
    assert {rows[i]["status"] for i in campaign[:5]} == {"failed"} and enqueued == campaign[5:]


@pytest.mark.integration
def test_a_campaign_whose_dispatch_died_mid_claim_is_still_a_campaign_when_the_reaper_routes_it(
        db, mariadb_url, redis_url):
    """A dispatch recorded its claim and died before the second step, which marks campaign rows: the reaper
    routes the rows later, and they must still be a campaign (opt-outs, quiet hours, the operator's view),
    while a single message claimed with them stays single."""
    rt = Runtime(in_process(mariadb_url, redis_url, mobilgroup_max_inflight=10))
    store.add_optout(db, normalised(number(1)), "STOP")
    campaign = insert_campaign(db, [number(i) for i in range(3)], "Sale")
    [single] = insert_campaign(db, [number(9)], "Your code is 1234")
    assert store._record_claims(db, 10, "a-dispatch-that-died")  # the claim's first step only
    with db.begin() as conn:
        conn.execute(text("UPDATE sms_dispatch SET updated_at = NOW() - INTERVAL 61 SECOND"))
    assert workflow.reap_rows(rt) == 4
    with db.connect() as conn:
        flags = dict(conn.execute(select(Dispatch.batchcontact_id, Dispatch.campaign)).all())
    assert {i: bool(flags[i]) for i in campaign + [single]} == {**dict.fromkeys(campaign, True), single: False}
    enqueued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    assert sorted(enqueued) == sorted([campaign[0], campaign[2], single]), "the opted-out number was sent to"
    assert rows_by_id(db)[campaign[1]]["status"] == "failed"


@pytest.mark.integration
def test_an_opt_out_read_as_its_campaign_row_is_being_sent_leaves_the_send_s_outcome(db, mariadb_url, redis_url,
                                                                                   monkeypatch):
    """The tick reads the waiting rows whose recipients opted out; before it ends them, one is released
    (chosen before the reply came) and its send takes the lease. The row must not end `failed` ("opted
    out") while its message is on its way to the provider: the send's outcome stands, as it would had the
    reply come a second later. The rows still waiting end `failed`."""
    rt = Runtime(in_process(mariadb_url, redis_url, mobilgroup_max_inflight=10))
    campaign = insert_campaign(db, [number(i) for i in range(3)], "Sale")
    workflow.dispatch_due(rt, lambda ids, provider: None)  # claimed and released: all three queued
    with db.begin() as conn:
        conn.execute(update(Dispatch).values(state="waiting", wait_reason="room", next_attempt_at=None))
    for i in range(3):
        store.add_optout(db, normalised(number(i)), "STOP")
    sending: list[store.SendJob] = []
    read = store.opted_out_waiting

    def read_then_a_send_takes_one(*args, **kwargs):
        rows = read(*args, **kwargs)
        # A release that chose the row before the reply came (releases no longer move an opted-out row).
        with db.begin() as conn:
            conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == campaign[0])
                         .values(state="queued", wait_reason=None))
        sending.append(store.begin_send(db, campaign[0], 180))
        return rows

    monkeypatch.setattr(store, "opted_out_waiting", read_then_a_send_takes_one)
    assert workflow.dispatch.refuse_opted_out(rt) == 2
    rows = rows_by_id(db)
    assert rows[campaign[0]]["state"] == "sending", rows[campaign[0]]
    assert store.record_accepted(db, campaign[0], sending[0].token, ["m-1"], 1, None, provider="mobilgroup",
                                 index_ids=False)
    rows = rows_by_id(db)
    assert (rows[campaign[0]]["status"], rows[campaign[0]]["state"]) == ("success", "accepted")
    assert {rows[r]["status"] for r in campaign[1:]} == {"failed"}


@pytest.mark.integration
def test_an_opted_out_row_whose_earlier_answer_was_lost_ends_error_not_failed(db, mariadb_url, redis_url):
    """A campaign send's answer was lost (the message may have arrived), the row waits to be sent again, and
    the recipient replies STOP: it is not sent again, but asterCC must not say `failed` (never sent) either;
    it says `error`, naming the opt-out and the attempt that may have arrived."""
    rt = Runtime(in_process(mariadb_url, redis_url, mobilgroup_max_inflight=10))
    campaign = insert_campaign(db, [number(i) for i in range(2)], "Sale")
    workflow.dispatch_due(rt, lambda ids, provider: None)
    with db.begin() as conn:  # both went; the first one's answer never came
        conn.execute(update(Dispatch).values(state="waiting", wait_reason="room", next_attempt_at=None))
        conn.execute(update(Dispatch).where(Dispatch.batchcontact_id == campaign[0])
                     .values(wait_reason="unknown", unknowns=1))
    for i in range(2):
        store.add_optout(db, normalised(number(i)), "STOP")
    assert workflow.dispatch.refuse_opted_out(rt) == 2
    rows = rows_by_id(db)
    assert rows[campaign[1]]["status"] == "failed"
    assert rows[campaign[0]]["status"] == "error", rows[campaign[0]]
    assert "opted out" in rows[campaign[0]]["error_msg"] and "may have arrived" in rows[campaign[0]]["error_msg"]


def test_quiet_holds_and_opt_outs_work_on_the_embedded_database_too(engine):
    campaign = insert_campaign(engine, [number(i) for i in range(3)], "Sale", due=ago(5))
    claim_and_route(engine)
    store.set_zones(engine, {campaign[0]: "Europe/Moscow", campaign[1]: "Europe/Moscow"})
    store.add_optout(engine, f"7916{campaign[2]:07d}", "STOP")  # the number claim_and_route recorded

    assert store.waiting_zones(engine) == ["Europe/Moscow"]
    assert store.hold_quiet(engine, {"Europe/Moscow": 3600}) == 2
    assert store.hold_quiet(engine, {"Europe/Moscow": 60}) == 0, "a shorter hold cut a longer one"
    assert [(row_id, o.word) for row_id, o in store.opted_out_waiting(engine, ["mobilgroup"])] == \
        [(campaign[2], "STOP")]
    assert store.release_waiting(engine, "mobilgroup", 10, 30) == [], "a held or opted-out row was released"
    assert store.refuse_waiting(engine, {campaign[2]: "opted out"}) == 1
    rows = rows_by_id(engine)
    assert (rows[campaign[2]]["status"], rows[campaign[2]]["error_msg"]) == ("failed", "opted out")


@pytest.mark.integration
@pytest.mark.parametrize("why", ["quiet hours began", "the recipient opted out"])
def test_a_campaign_row_whose_task_comes_late_is_not_sent_into_quiet_hours_or_to_an_opt_out(
        runtime, sim, db, why):
    """Released by day, its task reaches a worker only later (the worker for its queue was down, the broker
    lost the task and the sweep enqueued it again): by then quiet hours began at the recipient's, or the
    recipient replied STOP. The send gives the row back unsent; the next tick holds it, or ends it `failed`."""
    window = quiet_hours_now_in("Europe/Moscow")
    day = runtime()
    night = runtime(quiet_hours=window, quiet_hours_tz="Europe/Moscow")
    rt = night if why == "quiet hours began" else day
    campaign = insert_campaign(db, [number(i) for i in range(2)], "Sale")
    queued: list[int] = []
    workflow.dispatch_due(day, lambda ids, provider: queued.extend(ids))
    assert sorted(queued) == campaign
    store.set_zones(db, {i: "Europe/Moscow" for i in campaign})  # as a claim under SMS_QUIET_HOURS records
    if why == "the recipient opted out":
        store.add_optout(db, normalised(number(0)), "STOP")
        store.add_optout(db, normalised(number(1)), "STOP")

    assert [workflow.send_row(rt, row) for row in campaign] == ["handed back", "handed back"]
    assert sim.events("send") == [], "a campaign message went out " + (
        "at night" if why == "quiet hours began" else "to a number that replied STOP")
    enqueued: list[int] = []
    workflow.dispatch_due(rt, lambda ids, provider: enqueued.extend(ids))
    rows = rows_by_id(db)
    assert enqueued == []
    expected = "quiet" if why == "quiet hours began" else None
    assert {(rows[i]["wait_reason"] if expected else rows[i]["status"]) for i in campaign} == {expected or "failed"}
