"""Cross-thread hand-off micro-benchmark: cppnp ``queue_in_loop`` vs ``call_soon_threadsafe``.

The loop runs in the main thread; a producer thread submits N no-op callbacks
(cppnp ``loop.queue_in_loop(cb)``, asyncio/uvloop ``loop.call_soon_threadsafe(cb)``).
The clock starts just before the first submit and stops when the loop has run the
N-th callback: ``calls_per_s = N / elapsed``.  The producer is started from inside
the running loop, so the loop is already waiting when submits begin.  Run it pinned
to one core (both threads then share it, as they share the GIL anyway).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import benchlib

Submit = Callable[[Callable[[], None]], Any]


def handoff(
    submit: Submit, start_in_loop: Submit, run: Callable[[], None], stop: Callable[[], None], n: int
) -> dict[str, float]:
    """Submit *n* callbacks from another thread; time until the loop ran them all."""
    ran = 0
    t_first = 0.0
    t_last = 0.0
    t_submitted = 0.0

    def cb() -> None:
        nonlocal ran, t_last
        ran += 1
        if ran == n:
            t_last = time.perf_counter()
            stop()

    def producer() -> None:
        nonlocal t_first, t_submitted
        t_first = time.perf_counter()
        for _ in range(n):
            submit(cb)
        t_submitted = time.perf_counter()

    thread = threading.Thread(target=producer, name="producer")
    start_in_loop(thread.start)
    run()
    thread.join()
    if ran != n:
        raise RuntimeError(f"only {ran} of {n} callbacks ran")
    return {
        "calls_per_s": round(n / (t_last - t_first)),
        "elapsed_s": round(t_last - t_first, 4),
        "submit_s": round(t_submitted - t_first, 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the hand-off test for ``--impl`` and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("cppnp", "asyncio", "uvloop"), required=True)
    p.add_argument("--n", type=int, default=1_000_000, help="callbacks to hand off")
    args = p.parse_args(argv)
    out: dict[str, Any] = {
        "bench": "handoff",
        "impl": args.impl,
        "n": args.n,
        "python": platform.python_version(),
        "switch_interval_s": sys.getswitchinterval(),
    }

    def measure() -> dict[str, float]:
        if args.impl == "cppnp":
            from cppnp import EventLoop

            loop = EventLoop()
            try:
                return handoff(loop.queue_in_loop, loop.queue_in_loop, loop.loop, loop.quit, args.n)
            finally:
                loop.close()
        import asyncio

        aloop: asyncio.AbstractEventLoop
        if args.impl == "uvloop":
            import uvloop

            aloop = uvloop.new_event_loop()
        else:
            aloop = asyncio.new_event_loop()
        try:
            return handoff(
                aloop.call_soon_threadsafe, aloop.call_soon, aloop.run_forever, aloop.stop, args.n
            )
        finally:
            aloop.close()

    return benchlib.print_result(out, measure)


if __name__ == "__main__":
    sys.exit(main())
