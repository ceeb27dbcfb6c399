"""What an operator meets when deploying: settings validated at start-up with the variable named, the
commands of the command-line contract, and a docker-compose.yml that Compose accepts and whose workers
consume every queue."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from sqlalchemy import inspect

import celeryconfig
from db.engine import engine_for
from settings import ConfigError, load_settings
from tests.conftest import ROOT, WORKER_COMMAND, app_env, compose_services, compose_worker, free_port


def test_a_bad_value_names_its_variable(monkeypatch):
    monkeypatch.setenv("SMS_DISPATCH_BATCH", "lots")
    with pytest.raises(ConfigError, match="SMS_DISPATCH_BATCH"):
        load_settings()


@pytest.mark.parametrize("variable, value, says", [
    ("SMS_DEFAULT_REGION", "RUS", "not a region code"),
    ("SMS_REDIS_URL", "localhost:6379", "redis://"),
    ("SMS_ACCOLADES_URL", "client.voipit.ro", "http:// or https://"),
    ("SMS_OZEKI_URL", "ozeki.local:9509/api", "http:// or https://"),
    ("SMS_PUBLIC_URL", "sms.example.com/hooks", "http:// or https://"),
])
def test_a_value_that_would_fail_every_message_stops_the_start(monkeypatch, variable, value, says):
    """Caught at start-up, not message by message: a region the phone-number library does not know would
    fail every number typed without a country code, a Redis URL it cannot read every send's rate limit, a
    provider URL without a scheme every request, a public URL without one every delivery report."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}.*{says}"):
        load_settings()


def test_a_region_code_is_read_in_either_case(monkeypatch):
    monkeypatch.setenv("SMS_DEFAULT_REGION", "ro")
    assert load_settings().default_region == "RO"


def test_a_bad_route_names_the_variable_and_the_expected_form(monkeypatch):
    monkeypatch.setenv("SMS_ROUTES", "7=mobilgroup,40=twilio")
    with pytest.raises(ConfigError, match=r"SMS_ROUTES.*'40=twilio' must look like DIGITS=PROVIDER"):
        load_settings()


def test_missing_credentials_of_a_routed_provider_are_named(monkeypatch):
    monkeypatch.setenv("SMS_DEFAULT_PROVIDER", "mobilgroup")
    monkeypatch.setenv("SMS_ROUTES", "40=accolades")
    monkeypatch.setenv("SMS_MOBILGROUP_USER_ID", "1")
    monkeypatch.setenv("SMS_MOBILGROUP_USER", "u")
    monkeypatch.setenv("SMS_MOBILGROUP_PASSWORD", "p")
    with pytest.raises(ConfigError) as error:
        load_settings().require_sending()
    assert "SMS_ACCOLADES_ACCOUNT" in str(error.value) and "SMS_ACCOLADES_PASSWORD" in str(error.value)


def test_secrets_never_appear_in_the_settings_repr(monkeypatch):
    monkeypatch.setenv("SMS_MOBILGROUP_PASSWORD", "hunter2-secret")
    assert "hunter2-secret" not in repr(load_settings())


@pytest.mark.parametrize("settings, says", [
    ({}, "set SMS_DEFAULT_PROVIDER"),
    ({"SMS_DEFAULT_PROVIDER": "mobilgroup", "SMS_MOBILGROUP_USER_ID": "1", "SMS_MOBILGROUP_USER": "u",
      "SMS_MOBILGROUP_PASSWORD": "p", "SMS_MOBILGROUP_SENDER": "FarTooLongSender"},
     "mobilgroup: Mobilgroup sender must be at most 9"),
], ids=["no provider", "bad sender"])
def test_a_worker_with_bad_settings_refuses_to_start_and_says_why(settings, says, mariadb_url, redis_url):
    env = app_env(mariadb_url, redis_url, **settings)
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert says in result.stdout + result.stderr


def test_smsctl_creates_both_sets_of_tables_and_upgrading_twice_is_harmless(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = app_env(url, "filesystem://", SMS_VAR_DIR=str(tmp_path))
    for args in (["db", "create-astercc"], ["db", "upgrade"], ["db", "upgrade"]):
        subprocess.run([sys.executable, "-m", "smsctl.cli", *args], env=env, cwd=ROOT, check=True,
                       capture_output=True, timeout=60)
    assert {"cc10_batchcontacts", "cc10_batchcontact_archives", "sms_dispatch", "sms_message_ids"} <= set(
        inspect(engine_for(url)).get_table_names())


@contextmanager
def forwarding(port: int, to_port: int):
    """From now on, 127.0.0.1:`port` answers as 127.0.0.1:`to_port` does: a database that has come up."""
    listener = socket.create_server(("127.0.0.1", port))
    sockets = [listener]

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", to_port), timeout=10)
            sockets.extend((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=pipe, args=(source, sink), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield
    finally:
        for sock in sockets:
            sock.close()
        acceptor.join(timeout=5)


def upgrade_command(url: str, wait_s: int, tmp_path) -> dict:
    return dict(args=[sys.executable, "-m", "smsctl.cli", "db", "upgrade", "--wait", str(wait_s)],
                env=app_env(url, "filesystem://", SMS_VAR_DIR=str(tmp_path)), cwd=ROOT, text=True)


def test_the_migration_waits_for_a_database_that_is_still_starting(mariadb_url, tmp_path):
    """The compose `migrate` service starts beside the bundled MariaDB: it keeps trying until the database
    accepts connections, then migrates."""
    port, real_port = free_port(), urlsplit(mariadb_url).port
    url = mariadb_url.replace(f"127.0.0.1:{real_port}", f"127.0.0.1:{port}")
    migration = subprocess.Popen(**upgrade_command(url, 60, tmp_path), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    try:
        # Printed after the first refusal; the loop ends at end of output if the command died instead.
        said = ""
        while "waiting for the database" not in said and (line := migration.stderr.readline()):
            said = line
        assert said.startswith("waiting for the database: OperationalError"), "it never waited"
        with forwarding(port, real_port):
            out, err = migration.communicate(timeout=60)
    finally:
        migration.kill()
        migration.wait(timeout=10)
    assert migration.returncode == 0, err
    assert "our tables are up to date" in out


def test_the_migration_gives_up_on_a_database_that_never_comes(mariadb_url, tmp_path):
    url = mariadb_url.replace(f"127.0.0.1:{urlsplit(mariadb_url).port}", f"127.0.0.1:{free_port()}")
    result = subprocess.run(**upgrade_command(url, 3, tmp_path), capture_output=True, timeout=60)
    assert result.returncode != 0
    assert "the database did not accept a connection within 3 s" in result.stderr


def test_compose_accepts_the_compose_file(tmp_path):
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is missing: `make deps` installs it"
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")  # the README's first deployment step
    result = subprocess.run([compose, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_compose_workers_consume_every_queue():
    """A queue that no worker consumes is a provider whose messages wait for ever (with every profile on:
    smsc.ru's worker comes with `--profile smsc`, like its receiver)."""
    services = compose_services()
    workers = [name for name, service in services.items() if service.get("command", [])[:4] == WORKER_COMMAND]
    consumed = set()
    for name in workers:
        options = compose_worker(name)
        assert "-Q" in options, f"{name} should name its queues"
        consumed |= set(options[options.index("-Q") + 1].split(","))
    assert consumed == {queue.name for queue in celeryconfig.task_queues}
    assert services["worker-smsc"]["profiles"] == services["smpp-receiver"]["profiles"]
