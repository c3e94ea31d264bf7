"""Timer demo: run_after, run_every, cancel_timer, and a worker adding a timer."""

from __future__ import annotations

import threading

from cppnp import EventLoop, ThreadPool


def run(loop: EventLoop, ticks: int = 5, interval: float = 0.05) -> list[str]:
    """Tick *ticks* times, then quit; returns what happened, in order (loop thread)."""
    events: list[str] = []
    count = 0
    start = loop.time()

    def tick() -> None:
        nonlocal count
        count += 1
        events.append("tick %d at +%.0f ms" % (count, (loop.time() - start) * 1000))
        if count == ticks:
            loop.cancel_timer(every)   # cancel from inside its own callback
            loop.run_after(0, loop.quit)

    def from_worker() -> None:
        # A worker never touches the timer heap: the add is queued to the loop thread.
        loop.run_after(interval / 2, lambda: events.append(
            "worker timer ran on the loop thread: %s" % loop.is_in_loop_thread()))

    every = loop.run_every(interval, tick)
    cancelled = loop.run_after(interval, lambda: events.append("never"))
    loop.cancel_timer(cancelled)
    with ThreadPool(1, name="timer-demo") as pool:
        pool.add_task(from_worker)
        loop.loop()
    events.append("main thread %s" % (threading.current_thread().name,))
    return events
