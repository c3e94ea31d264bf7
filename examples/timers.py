"""Timers: run_after, run_every, cancel_timer, and a timer added from a worker thread.

Usage: python examples/timers.py      (prints what happened, then exits)
"""

from cppnp import EventLoop, ThreadPool


def main(ticks: int = 5, interval: float = 0.05) -> None:
    with EventLoop() as loop, ThreadPool(1) as pool:
        start = loop.time()
        count = 0

        def tick() -> None:
            nonlocal count
            count += 1
            print("tick %d at +%.0f ms" % (count, (loop.time() - start) * 1000))
            if count == ticks:
                loop.cancel_timer(every)  # cancelling from inside its own callback is fine
                loop.quit()

        def report() -> None:
            print("worker's timer ran on the loop thread: %s" % loop.is_in_loop_thread())

        def from_worker() -> None:
            # A worker never touches the timer heap: the add is queued to the loop thread.
            loop.run_after(interval / 2, report)

        every = loop.run_every(interval, tick)
        loop.cancel_timer(loop.run_after(interval, lambda: print("never printed")))
        pool.add_task(from_worker)
        loop.loop()


if __name__ == "__main__":
    main()
