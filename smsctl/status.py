"""`smsctl status [--watch]`: one screen, a line per provider: available or why not, sent / failed / error in
the last hour, rows waiting and why, the oldest waiting row's age, rate limit and use, and what the rows
sent in the last hour and day cost by the providers' reports, with their parts per message; then a line per
campaign in progress (batch, creby, sent / waiting / failed / error) and how many numbers opted out.

The numbers are `smsctl.overview.read()`'s, the same the metrics serve. On a terminal the screen is a
`rich` table (`--watch` redraws it in place); otherwise plain lines, one per provider, for scripts and logs.
"""
from __future__ import annotations

import time

from rich.console import Group
from rich.table import Table
from rich.text import Text

from db.stats import Campaign
from smsctl.overview import Overview, ProviderView

WAIT_ORDER = ("queued", "sending", "room", "quiet", "throttled", "retry", "unknown", "paused", "busy", "probe")


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _waiting(p: ProviderView) -> str:
    order = {reason: k for k, reason in enumerate(WAIT_ORDER)}
    shown = [f"{reason} {n}" for reason, n in sorted(p.waiting.items(), key=lambda kv: order.get(kv[0], 99)) if n]
    return ", ".join(shown) or "none"


def _availability(p: ProviderView) -> str:
    if p.available:
        return "available" + (f" (failing {p.failing_for_s} s)" if p.failing_for_s is not None else "")
    fallback = f"; rows go to {' or '.join(p.fallbacks)}" if p.fallbacks else ""
    return f"unavailable: {p.why_not}{fallback}"


def _rate(p: ProviderView) -> str:
    if p.rate is None:
        return "-"
    return f"{p.sent_per_s:.1f} of {p.rate:g}/s ({100 * p.sent_per_s / p.rate:.0f}%)"


def _cost(p: ProviderView) -> str:
    """The last hour's and day's cost by the providers' reports, `-` where no report gave one."""
    return " / ".join(f"{spent.cost:.4f}" if spent.priced else "-"
                      for spent in (p.spend.get(window) for window in ("1h", "1d")) if spent is not None)


def _parts(p: ProviderView) -> str:
    """Parts per message of the last day's rows."""
    spent = p.spend.get("1d")
    return f"{spent.parts / spent.messages:.2f}" if spent is not None and spent.messages else "-"


def _footer(view: Overview) -> str:
    tick = ("no dispatch tick has finished yet" if view.dispatch_age_s is None
            else f"last dispatch tick {_age(max(view.dispatch_age_s, 0))} ago")
    return (f"{tick}; {view.optouts} numbers opted out of campaigns; "
            f"read at {time.strftime('%H:%M:%S', time.localtime(view.read_at))}")


def _progress(c: Campaign) -> str:
    return ", ".join(f"{what} {c.rows[what]}" for what in ("sent", "waiting", "failed", "error"))


def screen(view: Overview):
    """The status screen as a `rich` renderable."""
    table = Table(title="SMS providers", title_justify="left", expand=False)
    for column, justify in (("provider", "left"), ("status", "left"), ("sent 1 h", "right"),
                            ("failed 1 h", "right"), ("error 1 h", "right"), ("waiting", "left"),
                            ("oldest waiting", "right"), ("rate use", "right"), ("throttled", "right"),
                            ("cost 1 h / 1 d", "right"), ("parts/msg", "right")):
        table.add_column(column, justify=justify)
    for p in view.providers:
        status = Text(_availability(p), style="green" if p.available else "bold red")
        table.add_row(p.name, status, str(p.last_hour["sent"]), str(p.last_hour["failed"]),
                      str(p.last_hour["error"]), _waiting(p), _age(p.oldest_waiting_s), _rate(p),
                      "-" if p.throttled is None else str(p.throttled), _cost(p), _parts(p))
    if not view.campaigns:
        return Group(table, Text("no campaign in progress"), Text(_footer(view), style="dim"))
    campaigns = Table(title="Campaigns in progress", title_justify="left", expand=False)
    for column, justify in (("batch", "right"), ("creby", "left"), ("sent", "right"), ("waiting", "right"),
                            ("failed", "right"), ("error", "right")):
        campaigns.add_column(column, justify=justify)
    for c in view.campaigns:
        campaigns.add_row(str(c.batch), c.creby, *(str(c.rows[what]) for what in ("sent", "waiting", "failed", "error")))
    return Group(table, campaigns, Text(_footer(view), style="dim"))


def plain(view: Overview) -> str:
    """The status screen as plain lines."""
    lines = [f"{p.name}: {_availability(p)}; last hour sent {p.last_hour['sent']}, failed {p.last_hour['failed']}, "
             f"error {p.last_hour['error']}; waiting: {_waiting(p)}; oldest waiting {_age(p.oldest_waiting_s)}; "
             f"rate {_rate(p)}; throttled {'-' if p.throttled is None else p.throttled}; "
             f"cost 1 h / 1 d {_cost(p)}; parts/msg {_parts(p)}"
             for p in view.providers]
    lines += [f"campaign batch {c.batch} by {c.creby or '-'}: {_progress(c)}" for c in view.campaigns] \
        or ["no campaign in progress"]
    return "\n".join(lines + [_footer(view)])


def run(settings, watch: bool, interval_s: float) -> None:
    """Print the screen once, or with `watch` redraw it every `interval_s` until interrupted."""
    from rich.console import Console
    from rich.live import Live

    from db.engine import engine_for
    from smsctl.overview import read
    from workflow.throttle import make_throttle

    engine, throttle = engine_for(settings.database_url), make_throttle(settings)
    console = Console()
    if not watch:
        view = read(settings, engine, throttle)
        if console.is_terminal:
            console.print(screen(view))
        else:
            print(plain(view), flush=True)
        return
    try:
        if not console.is_terminal:
            while True:
                print(plain(read(settings, engine, throttle)) + "\n", flush=True)
                time.sleep(interval_s)
        with Live(screen(read(settings, engine, throttle)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(screen(read(settings, engine, throttle)), refresh=True)
    except KeyboardInterrupt:
        pass
