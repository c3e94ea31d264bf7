"""``cppnp timers``: run_after, run_every, cancel_timer, and a worker adding a timer."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from cppnp import EventLoop, ThreadPool


def run_timers(loop: EventLoop, ticks: int = 5, interval: float = 0.05) -> list[str]:
    """Tick *ticks* times, then quit; returns what happened, in order.  Loop thread only."""
    events: list[str] = []
    count = 0
    start = loop.time()

    def tick() -> None:
        nonlocal count
        count += 1
        events.append("tick %d at +%.0f ms" % (count, (loop.time() - start) * 1000))
        if count == ticks:
            loop.cancel_timer(every)  # cancel from inside its own callback
            loop.run_after(0, loop.quit)

    def from_worker() -> None:
        # A worker never touches the timer heap: the add is queued to the loop thread.
        loop.run_after(
            interval / 2,
            lambda: events.append(
                "worker timer ran on the loop thread: %s" % loop.is_in_loop_thread()
            ),
        )

    every = loop.run_every(interval, tick)
    cancelled = loop.run_after(interval, lambda: events.append("never"))
    loop.cancel_timer(cancelled)
    with ThreadPool(1, name="timer-demo") as pool:
        pool.add_task(from_worker)
        loop.loop()
    events.append(
        "loop() returned in %s, the thread that owns the loop; every callback "
        "above ran there" % threading.current_thread().name
    )
    return events


def run(args: argparse.Namespace) -> int:
    with EventLoop() as loop:
        for line in run_timers(loop, args.ticks, args.interval):
            print(line)
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``timers``."""
    from cppnp.cli.common import int_range, positive_float

    p = sub.add_parser(
        "timers",
        help="timer demo: run_after, run_every, cancel_timer",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
    )
    p.add_argument(
        "--ticks",
        type=int_range("ticks", 1, 1000),
        default=5,
        metavar="N",
        help="how many run_every ticks (default: %(default)s)",
    )
    p.add_argument(
        "--interval",
        type=positive_float("interval"),
        default=0.05,
        metavar="SECONDS",
        help="seconds between ticks (default: %(default)s)",
    )
    p.set_defaults(func=run)
