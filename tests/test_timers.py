"""Timers: order, equal deadlines, cancel (before, inside, after, from another timer,
from another thread), run_every count / no drift / catch-up, bad and extreme delays,
heap compaction, and the thread the callbacks run on."""

from __future__ import annotations

import math
import sys
import threading
import time
import tracemalloc
import weakref
from typing import Any, Callable

import pytest

from conftest import call_in_loop, wait_for
from cppnp import EventLoop, EventLoopThread, IRun0, Task

# -- helpers ------------------------------------------------------------------------------


def run_loop(loop: EventLoop, timeout: float = 10.0) -> None:
    """Run *loop* until the test quits it; fail (instead of hanging) after *timeout* s."""
    hit = []

    def guard() -> None:
        hit.append(True)
        loop.quit()

    safety = loop.run_after(timeout, guard)
    try:
        loop.loop()
    finally:
        loop.cancel_timer(safety)
    assert not hit, "loop was not quit within %s s" % timeout


def timer_count(loop: EventLoop) -> int:
    return int(call_in_loop(loop, lambda: loop.timer_count))


class Callback:
    """A timer callback whose lifetime a test can watch: the loop holds a reference to it
    while its timer is in the timer heap (a cancelled timer stays there until the heap
    drops dead entries)."""

    def __call__(self) -> None:
        pass


def still_held(refs: list[weakref.ref[Callback]]) -> int:
    """How many of the callbacks behind *refs* are still alive (held by the loop)."""
    return sum(r() is not None for r in refs)


def cancelled_callbacks(loop: EventLoop, n: int, delay: float) -> list[weakref.ref[Callback]]:
    """Add and cancel *n* timers, one at a time; weak references to their callbacks."""
    refs = []
    for _ in range(n):
        cb = Callback()
        refs.append(weakref.ref(cb))
        loop.cancel_timer(loop.run_after(delay, cb))
    return refs


# -- order ------------------------------------------------------------------------------------


def test_timers_fire_in_deadline_order(loop: EventLoop) -> None:
    fired: list[str] = []
    base = loop.time()
    loop.run_at(base + 0.03, lambda: fired.append("c"))
    loop.run_at(base + 0.01, lambda: fired.append("a"))
    loop.run_after(0.02, lambda: fired.append("b"))
    loop.run_at(base + 0.04, loop.quit)
    assert loop.timer_count == 4
    run_loop(loop)
    assert fired == ["a", "b", "c"]
    assert loop.timer_count == 0


def test_equal_deadlines_fire_in_insertion_order(loop: EventLoop) -> None:
    fired: list[int] = []
    when = loop.time() + 0.05
    for i in range(1000):
        loop.run_at(when, lambda i=i: fired.append(i))
    loop.run_at(when, loop.quit)
    assert loop.timer_count == 1001
    run_loop(loop)
    assert fired == list(range(1000))
    assert loop.timer_count == 0


def test_random_deadlines_with_mass_cancel_fire_sorted(loop: EventLoop) -> None:
    """Cancelling most timers (which compacts the heap) keeps the survivors in order."""
    import random

    rng = random.Random(1234)
    base = loop.time() + 0.02
    fired: list[tuple[float, int]] = []
    ids = []
    for i in range(1000):
        when = base + rng.randrange(50) * 0.001
        ids.append((loop.run_at(when, lambda w=when, i=i: fired.append((w, i))), when, i))
    rng.shuffle(ids)
    cancelled = ids[:700]
    for tid, _, _ in cancelled:
        loop.cancel_timer(tid)
    assert loop.timer_count == 300
    loop.run_at(base + 0.1, loop.quit)
    run_loop(loop)
    expect = sorted((w, i) for _, w, i in ids[700:])
    assert fired == expect
    assert loop.timer_count == 0


def test_timer_callback_kinds(loop: EventLoop) -> None:
    fired: list[str] = []

    class Job(IRun0):
        def run0(self) -> None:
            fired.append("irun0")

    loop.run_after(0, Job())
    loop.run_after(0, Task(fired.append, "task"))
    loop.run_after(0, lambda: fired.append("lambda"))
    loop.run_after(0.001, loop.quit)
    run_loop(loop)
    assert fired == ["irun0", "task", "lambda"]
    assert loop.timer_count == 0


@pytest.mark.parametrize("bad", [None, 5, "cb", object()])
def test_non_callable_timer_callback_is_type_error(loop: EventLoop, bad: Any) -> None:
    with pytest.raises(TypeError):
        loop.run_after(0, bad)
    with pytest.raises(TypeError):
        loop.run_at(0, bad)
    with pytest.raises(TypeError):
        loop.run_every(1, bad)
    assert loop.timer_count == 0


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_before_firing(loop: EventLoop) -> None:
    fired: list[str] = []
    tid = loop.run_after(0.01, lambda: fired.append("cancelled"))
    loop.run_after(0.01, lambda: fired.append("kept"))
    assert loop.timer_count == 2
    loop.cancel_timer(tid)
    assert loop.timer_count == 1
    loop.cancel_timer(tid)  # twice: no-op
    assert loop.timer_count == 1
    loop.run_after(0.03, loop.quit)
    run_loop(loop)
    assert fired == ["kept"]
    assert loop.timer_count == 0


def test_cancel_after_firing_and_unknown_ids_are_noops(loop: EventLoop) -> None:
    fired: list[int] = []
    first = loop.run_after(0, lambda: fired.append(0))
    loop.run_after(0.001, loop.quit)
    run_loop(loop)
    assert fired == [0]
    loop.cancel_timer(first)
    loop.cancel_timer(first)
    loop.cancel_timer(10**12)
    loop.cancel_timer(-5)
    # Ids are never reused: cancelling the old id after many new timers hits none of them.
    new_ids = [loop.run_after(0.001, lambda i=i: fired.append(i)) for i in range(1, 101)]
    assert first not in new_ids
    assert len(set(new_ids)) == 100
    loop.cancel_timer(first)
    assert loop.timer_count == 100
    loop.run_after(0.01, loop.quit)
    run_loop(loop)
    assert fired == list(range(101))
    assert loop.timer_count == 0


def test_one_shot_cancels_itself_inside_callback(loop: EventLoop) -> None:
    fired: list[int] = []
    box: dict[str, int] = {}

    def cb() -> None:
        fired.append(1)
        loop.cancel_timer(box["id"])  # already running: a no-op
        loop.quit()

    box["id"] = loop.run_after(0, cb)
    run_loop(loop)
    assert fired == [1]
    assert loop.timer_count == 0


def test_run_every_cancelled_inside_own_callback_stops(loop: EventLoop) -> None:
    interval = 0.005
    calls: list[float] = []
    box: dict[str, int] = {}

    def tick() -> None:
        calls.append(loop.time())
        if len(calls) == 3:
            loop.cancel_timer(box["id"])
            assert loop.timer_count == 1  # only the quit timer below is left
            loop.run_after(interval * 10, loop.quit)  # give it ten more chances

    box["id"] = loop.run_every(interval, tick)
    run_loop(loop)
    assert len(calls) == 3
    assert loop.timer_count == 0


def test_timer_cancels_another_due_in_same_tick(loop: EventLoop) -> None:
    fired: list[str] = []
    when = loop.time() + 0.01
    ids: dict[str, int] = {}

    def first() -> None:
        fired.append("first")
        loop.cancel_timer(ids["second"])  # due now, later in this pass: must not run
        loop.cancel_timer(ids["every"])  # repeating, due now or a hair later
        loop.cancel_timer(ids["later"])  # due later

    ids["first"] = loop.run_at(when, first)
    ids["second"] = loop.run_at(when, lambda: fired.append("second"))
    # Its first deadline is now + 0.01 >= when, and its id is larger: it comes after first.
    ids["every"] = loop.run_every(0.01, lambda: fired.append("every"))
    ids["later"] = loop.run_at(when + 0.01, lambda: fired.append("later"))
    loop.run_at(when, lambda: fired.append("third"))
    loop.run_at(when + 0.03, loop.quit)
    run_loop(loop)
    assert fired == ["first", "third"]
    assert loop.timer_count == 0


def test_timer_cancelling_an_already_run_timer_in_same_tick(loop: EventLoop) -> None:
    fired: list[str] = []
    when = loop.time() + 0.01
    ids: dict[str, int] = {}
    ids["a"] = loop.run_at(when, lambda: fired.append("a"))
    ids["b"] = loop.run_at(when, lambda: (fired.append("b"), loop.cancel_timer(ids["a"])))
    loop.run_at(when, loop.quit)
    run_loop(loop)
    assert fired == ["a", "b"]
    assert loop.timer_count == 0


# -- run_every ------------------------------------------------------------------------------


def test_run_every_fires_repeatedly_until_cancelled(loop: EventLoop) -> None:
    interval = 0.005
    calls: list[float] = []
    start = loop.time()
    box: dict[str, int] = {}

    def tick() -> None:
        calls.append(loop.time())
        if len(calls) == 5:
            loop.cancel_timer(box["id"])
            loop.quit()

    box["id"] = loop.run_every(interval, tick)
    assert loop.timer_count == 1
    run_loop(loop)
    assert len(calls) == 5
    # Never early: the k-th run is at or after start + k * interval.
    for k, t in enumerate(calls, 1):
        assert t >= start + k * interval - 1e-6
    assert loop.timer_count == 0


def test_run_every_does_not_drift(loop: EventLoop) -> None:
    """Deadlines are computed from the previous deadline, not from when the callback ran
    or finished: a callback that sleeps half the interval adds no cumulative lateness.

    A timer re-armed relative to "now" after the callback would be 20 * 25 ms = 0.5 s
    late by the 20th run; here lateness stays bounded (generous tolerance for a loaded
    machine: the last three runs may not all be 4 intervals late)."""
    interval, periods = 0.05, 20
    calls: list[float] = []
    box: dict[str, int] = {}

    def tick() -> None:
        calls.append(loop.time())
        if len(calls) == periods:
            loop.cancel_timer(box["id"])
            loop.quit()
            return
        time.sleep(interval / 2)

    start = loop.time()
    box["id"] = loop.run_every(interval, tick)
    run_loop(loop, timeout=30)
    assert len(calls) == periods
    lateness = [t - (start + k * interval) for k, t in enumerate(calls, 1)]
    assert min(lateness) >= -1e-6, "a run_every timer fired before its deadline"
    assert min(lateness[-3:]) < 4 * interval, "cumulative drift: %r" % lateness
    assert loop.timer_count == 0


def test_run_every_after_a_stall_fires_once_then_resumes_on_grid(loop: EventLoop) -> None:
    """A callback that stalls the loop for 5 periods: one catch-up run, not a burst of
    five; the following runs are on the original grid, one interval apart.

    Only lower bounds on time are asserted (a timer is never early), which load cannot
    break: with a burst, the six runs after the stall would all happen at once."""
    interval = 0.02
    calls: list[float] = []
    box: dict[str, float] = {}

    def tick() -> None:
        calls.append(loop.time())
        if len(calls) == 1:
            time.sleep(5 * interval)
            box["stall_end"] = loop.time()
        elif len(calls) == 7:
            loop.cancel_timer(int(box["id"]))
            loop.quit()

    box["id"] = loop.run_every(interval, tick)
    run_loop(loop)
    assert len(calls) == 7
    after = calls[1:]
    assert after[-1] - box["stall_end"] > 4 * interval - 1e-6, calls
    assert loop.timer_count == 0


# -- bad and extreme values --------------------------------------------------------------------


def test_nan_is_value_error(loop: EventLoop) -> None:
    nan = float("nan")
    with pytest.raises(ValueError):
        loop.run_at(nan, lambda: None)
    with pytest.raises(ValueError):
        loop.run_after(nan, lambda: None)
    with pytest.raises(ValueError):
        loop.run_every(nan, lambda: None)
    assert loop.timer_count == 0


@pytest.mark.parametrize("interval", [0, 0.0, -1, -1e-9, math.inf, -math.inf])
def test_run_every_needs_positive_finite_interval(loop: EventLoop, interval: float) -> None:
    with pytest.raises(ValueError):
        loop.run_every(interval, lambda: None)
    assert loop.timer_count == 0


@pytest.mark.parametrize("bad", ["1", None, [1]])
def test_non_number_delay_is_type_error(loop: EventLoop, bad: Any) -> None:
    with pytest.raises(TypeError):
        loop.run_after(bad, lambda: None)
    with pytest.raises(TypeError):
        loop.run_at(bad, lambda: None)
    assert loop.timer_count == 0


def test_bad_timer_args_from_another_thread(loop_thread: EventLoop) -> None:
    errors: list[type[BaseException]] = []

    def worker() -> None:
        for call in (
            lambda: loop_thread.run_after(float("nan"), print),
            lambda: loop_thread.run_every(0, print),
            lambda: loop_thread.run_at(0, 7),
        ):
            try:
                call()
            except BaseException as exc:  # collected and checked below
                errors.append(type(exc))

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert errors == [ValueError, ValueError, TypeError]
    assert timer_count(loop_thread) == 0


@pytest.mark.parametrize("when", ["run_after_inf", "run_at_inf"])
def test_infinite_deadline_never_fires_but_is_cancellable(loop: EventLoop, when: str) -> None:
    fired: list[int] = []
    if when == "run_after_inf":
        tid = loop.run_after(math.inf, lambda: fired.append(1))
    else:
        tid = loop.run_at(math.inf, lambda: fired.append(1))
    assert loop.timer_count == 1
    for _ in range(3):
        loop.run_once(timeout=0)
    loop.run_after(0.01, loop.quit)
    run_loop(loop)
    assert fired == []
    assert loop.timer_count == 1
    loop.cancel_timer(tid)
    assert loop.timer_count == 0


@pytest.mark.parametrize("delay", [1e9, float(sys.maxsize), float(2**55), 1e300, math.inf])
def test_huge_delay_is_accepted_and_idle_loop_still_wakes(delay: float) -> None:
    """A far-future timer must not overflow the epoll timeout: the loop blocks, and a
    quit() from another thread still ends it."""
    box: dict[str, int] = {}
    lt = EventLoopThread(lambda lp: box.update(id=lp.run_after(delay, lambda: None)))
    lp = lt.start()
    try:
        assert timer_count(lp) == 1
        ran = threading.Event()
        lp.queue_in_loop(ran.set)  # the wakeup works with the far timer armed
        assert ran.wait(10)
        call_in_loop(lp, lambda: lp.cancel_timer(box["id"]))
        assert timer_count(lp) == 0
    finally:
        lt.stop()  # raises TimeoutError if quit() did not wake the loop
    assert lp.closed


@pytest.mark.parametrize(
    "how", ["after_-1", "after_0", "after_-1e9", "after_-inf", "at_past", "at_zero", "at_-inf"]
)
def test_past_deadline_runs_in_next_iteration(loop_thread: EventLoop, how: str) -> None:
    """A deadline in the past (or now) runs in the next iteration, even on an idle loop
    that would otherwise block in epoll."""
    fired = threading.Event()
    kind, _, arg = how.partition("_")
    value = {"past": -1.0, "zero": 0.0}.get(arg)

    def add() -> None:
        if kind == "after":
            loop_thread.run_after(float(arg), fired.set)
        elif value is not None:
            loop_thread.run_at(loop_thread.time() - 100 if arg == "past" else value, fired.set)
        else:
            loop_thread.run_at(float(arg), fired.set)

    call_in_loop(loop_thread, add)
    assert fired.wait(3), "a past deadline did not run on the idle loop"
    assert timer_count(loop_thread) == 0


def test_negative_delay_runs_after_one_iteration(loop: EventLoop) -> None:
    fired: list[int] = []
    loop.run_after(-1, lambda: fired.append(1))
    loop.run_after(0, lambda: fired.append(2))
    loop.run_at(loop.time() - 10, lambda: fired.append(3))
    # If the timers were not due, run_once would wait 5 s for nothing and return with
    # nothing fired.
    loop.run_once(timeout=5)
    assert sorted(fired) == [1, 2, 3]
    assert loop.timer_count == 0


def test_timers_of_a_closed_loop() -> None:
    lp = EventLoop()
    lp.run_after(100, lambda: None)
    lp.run_every(100, lambda: None)
    lp.close()
    assert lp.timer_count == 0
    lp.cancel_timer(1)  # no-op
    with pytest.raises(RuntimeError):
        lp.run_after(0, lambda: None)
    with pytest.raises(RuntimeError):
        lp.run_every(1, lambda: None)


# -- heap compaction ----------------------------------------------------------------------------


def test_cancelled_timers_do_not_pile_up(loop: EventLoop) -> None:
    live = [loop.run_after(1000 + i, lambda: None) for i in range(200)]

    def churn(n: int) -> None:
        for _ in range(n):
            loop.cancel_timer(loop.run_after(500, lambda: None))

    churn(20000)  # warm up
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        churn(100000)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loop.timer_count == len(live)
    assert loop.stats()["timers"] == len(live)
    # 100 000 dead 16-byte heap entries would be >= 1.6 MB.
    assert after - before < 256 * 1024, "timer heap grows with cancelled timers"
    # Cancelled entries leave the heap (and release their callbacks) by compaction: no
    # more dead entries than live ones, plus the compaction threshold.
    held = still_held(cancelled_callbacks(loop, 2000, 500))
    assert held <= len(live) + 130, "heap holds %d cancelled timers next to %d live ones" % (
        held,
        len(live),
    )
    for tid in live:
        loop.cancel_timer(tid)
    assert loop.timer_count == 0


def test_mass_cancel_keeps_loop_usable(loop: EventLoop) -> None:
    callbacks = [Callback() for _ in range(20000)]
    refs = [weakref.ref(cb) for cb in callbacks]
    ids = [loop.run_after(0.001 * (i % 50), cb) for i, cb in enumerate(callbacks)]
    del callbacks
    for tid in ids:
        loop.cancel_timer(tid)
    assert loop.timer_count == 0
    assert still_held(refs) <= 130, "the heap keeps cancelled timers"
    before = loop.stats()["iterations"]
    fired: list[int] = []
    loop.run_after(0.06, lambda: (fired.append(1), loop.quit()))
    run_loop(loop)
    assert fired == [1]
    # Dead entries never wake the loop: a handful of iterations, not one per entry.
    assert loop.stats()["iterations"] - before < 50


def test_cancelled_timers_do_not_wake_an_idle_loop(loop_thread: EventLoop) -> None:
    def add_and_cancel() -> None:
        for i in range(100):
            loop_thread.cancel_timer(loop_thread.run_after(0.01 + i * 0.001, lambda: None))

    call_in_loop(loop_thread, add_and_cancel)
    before = loop_thread.stats()["iterations"]
    time.sleep(0.25)  # all the cancelled deadlines pass while we wait
    assert loop_thread.stats()["iterations"] == before, "woken up for cancelled timers"
    assert timer_count(loop_thread) == 0


# -- threads ----------------------------------------------------------------------------------


def test_timer_added_from_other_thread_fires_on_loop_thread(loop_thread: EventLoop) -> None:
    where: list[int] = []
    in_loop: list[bool] = []
    done = threading.Event()

    def cb() -> None:
        where.append(threading.get_ident())
        in_loop.append(loop_thread.is_in_loop_thread())
        done.set()

    tid = loop_thread.run_after(0.01, cb)
    assert isinstance(tid, int)
    assert done.wait(10)
    assert where == [loop_thread.thread_id]
    assert in_loop == [True]
    assert timer_count(loop_thread) == 0


def test_cancel_from_other_thread(loop_thread: EventLoop) -> None:
    fired: list[int] = []
    tid = loop_thread.run_after(5, lambda: fired.append(1))
    assert timer_count(loop_thread) == 1
    loop_thread.cancel_timer(tid)
    wait_for(lambda: timer_count(loop_thread) == 0)
    assert fired == []


def test_add_and_cancel_from_many_threads(loop_thread: EventLoop) -> None:
    """4 threads each add 250 short timers and 250 long ones, and cancel the long ones:
    exactly the short ones run, on the loop thread."""
    lock = threading.Lock()
    fired: list[tuple[int, int]] = []
    wrong_thread: list[int] = []
    barrier = threading.Barrier(4)

    def worker(w: int) -> None:
        barrier.wait(10)
        for i in range(250):

            def cb(w: int = w, i: int = i) -> None:
                if not loop_thread.is_in_loop_thread():
                    wrong_thread.append(i)
                with lock:
                    fired.append((w, i))

            loop_thread.run_after(0.001 * (i % 7), cb)
            long_id = loop_thread.run_after(60, lambda: fired.append((-1, -1)))
            loop_thread.cancel_timer(long_id)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_for(lambda: len(fired) >= 1000)
    wait_for(lambda: timer_count(loop_thread) == 0)
    assert sorted(fired) == [(w, i) for w in range(4) for i in range(250)]
    assert wrong_thread == []


def test_cross_thread_cancel_racing_the_fire_runs_at_most_once(loop_thread: EventLoop) -> None:
    counts = [0] * 300

    def make(i: int) -> Callable[[], None]:
        def cb() -> None:
            counts[i] += 1

        return cb

    for i in range(300):
        tid = loop_thread.run_after(0, make(i))
        loop_thread.cancel_timer(tid)
        if i % 3 == 0:
            loop_thread.cancel_timer(tid)
    wait_for(lambda: timer_count(loop_thread) == 0)
    call_in_loop(loop_thread, lambda: None)  # one more pass: nothing left to run
    assert max(counts) <= 1


def test_timers_added_from_timer_callbacks(loop: EventLoop) -> None:
    fired: list[int] = []

    def chain(n: int) -> None:
        fired.append(n)
        if n < 50:
            loop.run_after(0, lambda: chain(n + 1))
        else:
            loop.quit()

    loop.run_after(0, lambda: chain(1))
    run_loop(loop)
    assert fired == list(range(1, 51))
    assert loop.timer_count == 0
