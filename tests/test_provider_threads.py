"""Each provider's share of a worker's threads (`Runtime.provider_call`, `Settings.threads_for`): a provider
that hangs holds at most its share, and a send that finds the share taken is told at once, without waiting
for a thread, so that the worker's other providers and its beat tasks go on."""
from __future__ import annotations

import threading

from settings import load_settings
from workflow.runtime import Runtime


def worker_runtime(concurrency: int, providers_served: int, **settings) -> Runtime:
    rt = Runtime(load_settings(default_provider="mobilgroup", **settings))
    rt.concurrency, rt.providers_served = concurrency, providers_served
    return rt


def test_a_worker_serving_several_providers_gives_each_half_its_threads():
    rt = worker_runtime(8, 3)
    release = threading.Event()
    held = []

    def hang():
        with rt.provider_call("ozeki") as got:
            held.append(got)
            release.wait(10)

    threads = [threading.Thread(target=hang) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(100):
            if len(held) == 6:
                break
            threading.Event().wait(0.02)
        assert sorted(held) == [False, False, True, True, True, True], "ozeki held more than half the worker"
        with rt.provider_call("mobilgroup") as got:
            assert got, "a hung provider took another provider's threads"
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    with rt.provider_call("ozeki") as got:
        assert got, "a thread's share was not given back"


def test_the_share_follows_the_worker_and_the_setting():
    s = load_settings(default_provider="mobilgroup", ozeki_threads=5)
    assert s.threads_for("mobilgroup", 64, 1) == 62  # one provider: all but the beat tasks' two
    assert s.threads_for("mobilgroup", 64, 3) == 32
    assert s.threads_for("ozeki", 64, 3) == 5
    assert Runtime(s).concurrency == 0  # outside a worker (tests, scripts): no share applies
