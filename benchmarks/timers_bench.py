"""Timer micro-benchmark: cppnp ``run_after`` vs asyncio/uvloop ``call_later``.

Two tests on one loop, in one process (run it pinned to one core):

1. schedule N one-shot timers with delays spread uniformly over 0-10 ms, then run
   the loop until the last one fired: ``timers_per_s = N / (schedule + fire time)``.
2. schedule N timers and cancel them all, then let the loop run once so it can
   drop the cancelled entries: ``cancel_ops_per_s = 2N / (schedule + cancel + drain)``
   (an op is one schedule or one cancel).

Prints one JSON line.  cppnp API: ``EventLoop().run_after(delay_s, cb) -> id``,
``cancel_timer(id)``, ``queue_in_loop(cb)``, ``quit()``, ``loop()``, ``close()``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import benchlib


class Bench:
    """The few loop operations the tests need, bound once per implementation."""

    schedule: Callable[[float, Callable[[], None]], Any]
    cancel_all: Callable[[list[Any]], None]
    run: Callable[[], None]
    stop: Callable[[], None]
    drain: Callable[[], None]
    close: Callable[[], None]


def make_bench(impl: str) -> Bench:
    """Bind the loop operations for *impl* (cppnp, asyncio or uvloop)."""
    b = Bench()
    if impl == "cppnp":
        from cppnp import EventLoop

        loop = EventLoop()
        b.schedule = loop.run_after
        cancel = loop.cancel_timer

        def cancel_all(ids: list[Any]) -> None:
            for tid in ids:
                cancel(tid)

        def drain() -> None:
            loop.queue_in_loop(loop.quit)
            loop.loop()

        b.cancel_all, b.run, b.stop, b.drain, b.close = (
            cancel_all,
            loop.loop,
            loop.quit,
            drain,
            loop.close,
        )
        return b

    import asyncio

    aloop: asyncio.AbstractEventLoop
    if impl == "uvloop":
        import uvloop

        aloop = uvloop.new_event_loop()
    elif impl == "asyncio":
        aloop = asyncio.new_event_loop()
    else:
        raise SystemExit(f"unknown --impl {impl!r}")

    def cancel_handles(handles: list[Any]) -> None:
        for handle in handles:
            handle.cancel()

    def adrain() -> None:
        aloop.call_soon(aloop.stop)
        aloop.run_forever()

    b.schedule = aloop.call_later
    b.cancel_all, b.run, b.stop, b.drain, b.close = (
        cancel_handles,
        aloop.run_forever,
        aloop.stop,
        adrain,
        aloop.close,
    )
    return b


def fire_test(b: Bench, delays: list[float]) -> dict[str, float]:
    """Schedule every delay, run until the last timer fired."""
    n = len(delays)
    fired = 0
    stop = b.stop

    def cb() -> None:
        nonlocal fired
        fired += 1
        if fired == n:
            stop()

    schedule = b.schedule
    gc.collect()
    t0 = time.perf_counter()
    for d in delays:
        schedule(d, cb)
    t1 = time.perf_counter()
    b.run()
    t2 = time.perf_counter()
    if fired != n:
        raise RuntimeError(f"only {fired} of {n} timers fired")
    return {
        "timers_per_s": round(n / (t2 - t0)),
        "schedule_s": round(t1 - t0, 4),
        "fire_s": round(t2 - t1, 4),
    }


def cancel_test(b: Bench, delays: list[float]) -> dict[str, float]:
    """Schedule every delay, cancel all, let the loop run once."""
    n = len(delays)
    fired = 0

    def cb() -> None:
        nonlocal fired
        fired += 1

    schedule = b.schedule
    gc.collect()
    t0 = time.perf_counter()
    ids = [schedule(d, cb) for d in delays]
    t1 = time.perf_counter()
    b.cancel_all(ids)
    t2 = time.perf_counter()
    b.drain()
    t3 = time.perf_counter()
    if fired:
        raise RuntimeError(f"{fired} cancelled timers fired")
    return {
        "cancel_ops_per_s": round(2 * n / (t3 - t0)),
        "cancel_schedule_s": round(t1 - t0, 4),
        "cancel_s": round(t2 - t1, 4),
        "drain_s": round(t3 - t2, 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both tests and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("cppnp", "asyncio", "uvloop"), required=True)
    p.add_argument("--n", type=int, default=1_000_000, help="timers per test")
    p.add_argument("--max-delay", type=float, default=0.010, help="seconds (default 10 ms)")
    args = p.parse_args(argv)
    rng = random.Random(42)
    delays = [rng.random() * args.max_delay for _ in range(args.n)]
    out: dict[str, Any] = {
        "bench": "timers",
        "impl": args.impl,
        "n": args.n,
        "python": platform.python_version(),
    }

    def measure() -> dict[str, Any]:
        b = make_bench(args.impl)
        try:
            return {**fire_test(b, delays), **cancel_test(b, delays)}
        finally:
            b.close()

    return benchlib.print_result(out, measure)


if __name__ == "__main__":
    sys.exit(main())
