"""Local stand-ins for the four providers (`smsctl simulate NAME`, the demo, the tests and benchmarks), and
`proxy`, a TCP proxy that cuts or blackholes a connection on loopback."""
from __future__ import annotations

import importlib

NAMES = ("mobilgroup", "accolades", "ozeki", "smsc")
HTTP_NAMES = ("mobilgroup", "accolades", "ozeki")
"""The stand-ins that answer over HTTP: they can fail a share of requests and answer late."""


def serve(name: str, host: str, port: int, *, fail_rate: float = 0.0, latency_s: float = 0.0) -> None:
    """Serve the stand-in `name` on `host:port` until interrupted; `fail_rate` and `latency_s` apply to the
    HTTP stand-ins."""
    options = {"fail_rate": fail_rate, "latency_s": latency_s} if name in HTTP_NAMES else {}
    importlib.import_module(f"simulators.{name}").serve(host=host, port=port, **options)
