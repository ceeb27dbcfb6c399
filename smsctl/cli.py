"""`smsctl`: the operator's command line (database set-up, webhooks, SMPP receiver, metrics, status,
opt-outs, simulators, demo).

The Celery processes themselves are started with `celery -A tasks worker|beat|flower`. Every command reads
the same environment as they do; a bad setting stops it with a message naming the variable.
"""
from __future__ import annotations

import logging
import sys

import click

from settings import ConfigError, get_settings
from simulators import NAMES as simulator_names


def _settings():
    try:
        return get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """Send asterCC's outgoing SMS through Mobilgroup, Accolades, Ozeki and smsc.ru."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group()
def db() -> None:
    """Create or migrate tables."""


@db.command("upgrade")
@click.option("--wait", "wait_s", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for the database to accept connections (a container starting beside us).")
def db_upgrade(wait_s: float) -> None:
    """Create or migrate our own tables (Alembic), beside asterCC's."""
    from sqlalchemy.exc import OperationalError

    from db import schema
    from db.engine import wait_until_reachable

    url = _settings().database_url
    try:
        # The driver's words name the host and the reason, never the URL's password.
        wait_until_reachable(url, wait_s, lambda exc: click.echo(
            f"waiting for the database: {type(exc.orig).__name__}: {exc.orig}", err=True))
    except OperationalError as exc:
        raise click.ClickException(f"the database did not accept a connection within {wait_s:g} s: "
                                   f"{type(exc.orig).__name__}: {exc.orig}") from None
    schema.upgrade(url)
    click.echo("our tables are up to date")


@db.command("create-astercc")
def db_create_astercc() -> None:
    """Create asterCC's two tables, as asterCC has them (development, tests, demo)."""
    from db import schema
    from db.engine import engine_for

    schema.create_astercc(engine_for(_settings().database_url))
    click.echo("asterCC's tables exist")


@db.command("add-astercc-index")
def db_add_astercc_index() -> None:
    """Add our optional index on asterCC's cc10_batchcontacts (status, schedulertime); see README."""
    from db import schema
    from db.engine import engine_for

    added = schema.add_astercc_index(engine_for(_settings().database_url))
    click.echo(f"index {schema.ASTERCC_DUE_INDEX} " + ("added" if added else "already present"))


@db.command("drop-astercc-index")
def db_drop_astercc_index() -> None:
    """Remove the optional index again (before an asterCC upgrade that wants its table untouched)."""
    from db import schema
    from db.engine import engine_for

    dropped = schema.drop_astercc_index(engine_for(_settings().database_url))
    click.echo(f"index {schema.ASTERCC_DUE_INDEX} " + ("dropped" if dropped else "was not there"))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
def webhooks(host: str, port: int) -> None:
    """Serve the delivery-report app (waitress: slow or idle clients hold no thread)."""
    from webhooks.app import serve

    _settings().require("webhook_secret")
    serve(host, port)


@main.command("smpp-receiver")
def smpp_receiver() -> None:
    """Stay bound to smsc.ru as a receiver and apply delivery receipts and replies."""
    from workflow.smpp_receiver import run_receiver

    run_receiver(_settings())  # it checks the receiver's settings first


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9464, show_default=True, type=int)
def metrics(host: str, port: int) -> None:
    """Serve Prometheus /metrics, read from the database and Redis at each scrape."""
    from smsctl.metrics import serve

    serve(_settings(), host, port)


@main.command()
@click.option("--watch", is_flag=True, help="Redraw the screen until interrupted (Ctrl-C).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds between redraws with --watch.")
def status(watch: bool, interval: float) -> None:
    """One screen per provider: available or why not, sent / failed / waiting, oldest waiting row."""
    from smsctl.status import run

    run(_settings(), watch, interval)


@main.group()
def optout() -> None:
    """The numbers that opted out of campaigns (single messages still reach them)."""


def _normalised(number: str) -> str:
    from workflow.routing import InvalidNumber, normalise

    try:
        return normalise(number, _settings())
    except InvalidNumber as exc:
        raise click.ClickException(str(exc)) from None


@optout.command("list")
def optout_list() -> None:
    """Every opted-out number (masked, as the logs mask numbers), its word and when."""
    from db import store
    from db.engine import engine_for
    from providers.text import mask

    rows = store.optouts(engine_for(_settings().database_url))
    for row in rows:
        click.echo(f"{mask('+' + row.number):<16}  {row.word:<12}  {row.opted_at:%Y-%m-%d %H:%M}")
    click.echo(f"{len(rows)} numbers opted out", err=True)


@optout.command("add")
@click.argument("number")
def optout_add(number: str) -> None:
    """Opt NUMBER out of campaigns (as typed: `8 903 …` and `+7903…` are one number)."""
    from db import store
    from db.engine import engine_for
    from workflow.campaigns import OPERATOR

    added = store.add_optout(engine_for(_settings().database_url), _normalised(number), OPERATOR)
    click.echo("opted out" if added else "already opted out")


@optout.command("remove")
@click.argument("number")
def optout_remove(number: str) -> None:
    """Let campaigns reach NUMBER again."""
    from db import store
    from db.engine import engine_for

    removed = store.remove_optout(engine_for(_settings().database_url), _normalised(number))
    if not removed:
        raise click.ClickException("that number has not opted out")
    click.echo("campaigns reach it again")


@main.command()
@click.argument("provider", type=click.Choice(simulator_names))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", required=True, type=int)
@click.option("--fail-rate", default=0.0, show_default=True, type=float, help="Share of requests answered 503.")
@click.option("--latency", default=0.0, show_default=True, type=float, help="Seconds before each answer.")
def simulate(provider: str, host: str, port: int, fail_rate: float, latency: float) -> None:
    """Run a local stand-in for PROVIDER (demo, tests, staging)."""
    from simulators import serve

    click.echo(f"{provider} simulator on {host}:{port}", err=True)
    serve(provider, host, port, fail_rate=fail_rate, latency_s=latency)


@main.command()
@click.option("--rows", default=40, show_default=True, help="How many sample asterCC rows to seed.")
@click.option("--timeout", default=180, show_default=True, help="Give up after this many seconds.")
def demo(rows: int, timeout: int) -> None:
    """Run the whole job on the embedded default: SQLite, Celery's filesystem broker, local simulators."""
    from smsctl.demo import run_demo

    sys.exit(run_demo(rows=rows, timeout_s=timeout))


if __name__ == "__main__":
    main()
