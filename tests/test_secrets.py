"""Secrets stay secret: no password of any URL in a repr of the settings or the runtime; start-up refuses the
example Flower login and weak webhook keys; a plain-http public URL outside loopback is warned about."""
from __future__ import annotations

import subprocess
import sys

import pytest

from settings import EXAMPLE_FLOWER_LOGIN, ConfigError, load_settings
from workflow.runtime import Runtime
from tests.conftest import ROOT, app_env, compose_services, free_port

URLS = {
    "database_url": "mysql+mysqldb://sms:db-pa55word@db.example:3306/astercc?charset=utf8mb4",
    "broker_url": "redis://:broker-pa55word@redis.example:6379/0",
    "redis_url": "rediss://limits:redis-pa55word@redis2.example:6380/1",
}
PASSWORDS = ("db-pa55word", "broker-pa55word", "redis-pa55word")


def test_no_url_password_in_any_repr_of_settings_or_runtime():
    settings = load_settings(**URLS, webhook_secret="w" * 40, mobilgroup_password="mg-pa55word")
    shown = [repr(settings), str(settings), repr(Runtime(settings)), str(Runtime(settings))]
    for text in shown:
        for secret in PASSWORDS + ("w" * 40, "mg-pa55word"):
            assert secret not in text
    # What is masked is only the password: an operator still sees where each URL points.
    assert "mysql+mysqldb://sms:***@db.example:3306/astercc?charset=utf8mb4" in shown[0]
    assert "redis://:***@redis.example:6379/0" in shown[0] and "rediss://limits:***@redis2.example" in shown[0]
    assert settings.database_url == URLS["database_url"], "the value itself is left whole"


def test_the_broker_password_is_masked_where_redis_defaults_to_it():
    settings = load_settings(broker_url=URLS["broker_url"])
    assert settings.redis_url == URLS["broker_url"] and "broker-pa55word" not in repr(settings)


@pytest.mark.parametrize("login", [EXAMPLE_FLOWER_LOGIN, "ops:short", "ops:", ":long-enough-password",
                                   f"ops:a-long-and-fine-password,{EXAMPLE_FLOWER_LOGIN}"])
def test_a_weak_or_example_flower_login_is_refused(monkeypatch, login):
    monkeypatch.setenv("FLOWER_BASIC_AUTH", login)
    with pytest.raises(ConfigError, match="FLOWER_BASIC_AUTH") as refused:
        load_settings()
    assert login not in str(refused.value)


def test_a_good_flower_login_and_webhook_keys_are_accepted(monkeypatch):
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:a-long-and-fine-password")
    monkeypatch.setenv("SMS_WEBHOOK_SECRET", " " + "n" * 32 + " , " + "o" * 32 + ",")
    assert load_settings().webhook_keys == ["n" * 32, "o" * 32]


@pytest.mark.parametrize("login", [EXAMPLE_FLOWER_LOGIN, ""], ids=["the example login", "no login"])
def test_compose_s_flower_will_not_start_with_the_example_login_or_none(mariadb_url, login):
    """The command docker-compose.yml runs, as its shell runs it (on 127.0.0.1 and a free port)."""
    sh, option, script = compose_services()["flower"]["command"]
    script = script.replace("$$", "$").replace("--port=5555", f"--port={free_port()} --address=127.0.0.1")
    script = script.replace("celery ", f"{sys.executable} -m celery ", 1)
    env = app_env(mariadb_url, "filesystem://", FLOWER_BASIC_AUTH=login)
    result = subprocess.run([sh, option, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr and "change-me" not in result.stderr


@pytest.mark.parametrize("url, warned", [
    ("http://sms.example.com", True),
    ("http://203.0.113.5:8080", True),
    ("https://sms.example.com", False),
    ("http://127.0.0.1:8080", False),
    ("http://localhost:8080", False),
    ("http://[::1]:8080", False),
    (None, False),
])
def test_a_plain_http_public_url_outside_loopback_is_warned_about(url, warned):
    warnings = load_settings(public_url=url).startup_warnings()
    assert any("SMS_PUBLIC_URL" in w for w in warnings) == warned


def test_the_token_ttl_must_outlast_the_report_timeout():
    assert load_settings(report_timeout_s=7200).token_ttl_s == 7200 + 86_400
    with pytest.raises(ConfigError, match="SMS_WEBHOOK_TOKEN_TTL_S"):
        load_settings(report_timeout_s=7200, webhook_token_ttl_s=7200)
