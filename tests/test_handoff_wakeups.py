"""How the pool's workers are woken (issue 12): lazily from a loop thread, eagerly from
other threads, parked one by one on their own futex word (BlockingQueue).

From a loop thread the pool wakes one worker for a pass's tasks (with the GIL released,
just before the loop polls) and one more only when the queue stays non-empty for
WAKE_STALL (1 ms): the loop rechecks, without the GIL, every WAKE_RECHECK_MS while tasks
wait and a worker is idle.  These tests pin the guarantees that rule must keep: no task
waits behind a slow one while a worker is idle, no wakeup is lost (from loops and from
plain threads, one task at a time and in bursts), a loop that stops still wakes the
workers for what it queued, and stop() wakes parked workers.  Counts and orders only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from conftest import call_in_loop, wait_for
from cppnp import EventLoop, EventLoopThread, ThreadPool

TIMEOUT = 20.0


def test_a_pass_of_instant_tasks_wakes_one_worker_unless_the_queue_stalls(
    make_pool: Any,
) -> None:
    """64 tasks queued by the loop in one pass, 4 parked workers: the loop wakes one; the
    others only through a stall (the queue stayed non-empty for 1 ms) -- never one per
    task or one per idle worker up front."""
    pool = make_pool(4)
    done = threading.Semaphore(0)
    with EventLoopThread() as loop:

        def queue_all() -> None:
            for _ in range(64):
                pool.add_task(done.release, key=False)

        for _ in range(5):
            wait_for(lambda: pool.running == 0 and pool.queued == 0, TIMEOUT)
            wait_for(lambda: pool.stats()["idle_workers"] == 4, TIMEOUT)
            before = pool.stats()
            call_in_loop(loop, queue_all)
            for _ in range(64):
                assert done.acquire(timeout=TIMEOUT)
            after = pool.stats()
            sent = after["wakeups_sent"] - before["wakeups_sent"]
            stalls = after["stall_wakeups"] - before["stall_wakeups"]
            assert sent == 1 or stalls >= 1
            assert sent <= 4


def test_a_slow_task_gets_a_second_worker_woken_for_the_tasks_behind_it() -> None:
    """One task blocks (on a gate) and 20 more are queued behind it by the loop in the
    same pass: the lazily woken worker takes the slow one, and the stall rule wakes the
    other, which runs all 20 while the slow one still blocks."""
    pool = ThreadPool(2, name="stall")
    pool.start()
    gate = threading.Event()
    fast_done: list[int] = []
    with EventLoopThread() as loop:

        def queue_all() -> None:
            pool.add_task(gate.wait, 3 * TIMEOUT)
            for i in range(20):
                pool.add_task(fast_done.append, i)

        try:
            for _ in range(3):
                gate.clear()
                fast_done.clear()
                wait_for(lambda: pool.running == 0 and pool.queued == 0, TIMEOUT)
                before = pool.stats()["stall_wakeups"]
                call_in_loop(loop, queue_all)
                wait_for(lambda: len(fast_done) == 20, TIMEOUT)
                assert not gate.is_set()
                # The first worker took the slow task (queued first) and blocks: only the
                # stall rule can have woken the one that ran the 20.
                assert pool.stats()["stall_wakeups"] >= before + 1
                assert sorted(fast_done) == list(range(20))
                gate.set()
        finally:
            gate.set()
            assert pool.stop(timeout=TIMEOUT)
    assert (pool.completed, pool.failed) == (63, 0)


def test_no_lost_wakeup_one_task_at_a_time_from_a_loop_and_from_a_thread(
    make_pool: Any,
) -> None:
    """Ping-pong: each task is added only after the previous one ran, so every one finds
    the workers parked and needs its own wakeup -- 1,000 from a loop thread (lazy path),
    then 1,000 from a plain thread (a push that wakes)."""
    pool = make_pool(2)
    box = threading.Semaphore(0)
    with EventLoopThread() as loop:
        for _ in range(1000):
            loop.queue_in_loop(lambda: pool.add_task(box.release, key=False))
            assert box.acquire(timeout=TIMEOUT), "a task queued by the loop never ran"
    for _ in range(1000):
        pool.add_task(box.release, key=False)
        assert box.acquire(timeout=TIMEOUT), "a task queued by a thread never ran"
    assert pool.completed == 2000


def test_no_lost_wakeup_under_bursts_from_loops_and_threads_at_once(make_pool: Any) -> None:
    """Two loops and four plain threads add 3,000 tasks each, in bursts, to one 3-worker
    pool at the same time: every task runs exactly once."""
    pool = make_pool(3)
    counts = [0] * 6
    lock = threading.Lock()
    per = 3000

    def bump(i: int) -> None:
        with lock:
            counts[i] += 1

    def from_thread(i: int) -> None:
        for k in range(per):
            pool.add_task(bump, i, key=False)
            if k % 97 == 0:
                time.sleep(0)  # let the workers park now and then

    with EventLoopThread() as l1, EventLoopThread() as l2:

        def from_loop(loop: EventLoop, i: int) -> None:
            def burst(n: int) -> None:
                for _ in range(n):
                    pool.add_task(bump, i, key=False)

            left = per
            while left:
                n = min(left, 1 + left % 50)
                loop.queue_in_loop(lambda n=n: burst(n))
                left -= n

        threads = [threading.Thread(target=from_thread, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        from_loop(l1, 4)
        from_loop(l2, 5)
        for t in threads:
            t.join(TIMEOUT)
        wait_for(lambda: sum(counts) == 6 * per, TIMEOUT)
    assert counts == [per] * 6
    assert pool.completed == 6 * per


@pytest.mark.parametrize("leave", ["quit", "raise"])
def test_a_loop_left_right_after_queueing_still_wakes_the_workers(
    make_pool: Any, leave: str
) -> None:
    """Tasks queued by the loop's last pass -- the loop quits, or a callback raises
    KeyboardInterrupt out of loop(), before it would poll: the loop's exit path wakes the
    workers for them (the fallback of the wakeup hook)."""
    pool = make_pool(2)
    done = threading.Semaphore(0)
    loop = EventLoop()
    try:
        for _ in range(20):

            def last_pass() -> None:
                for _ in range(5):
                    pool.add_task(done.release, key=False)
                if leave == "raise":
                    raise KeyboardInterrupt
                loop.quit()

            loop.queue_in_loop(last_pass)
            if leave == "raise":
                with pytest.raises(KeyboardInterrupt):
                    loop.loop()
            else:
                loop.loop()
            for _ in range(5):
                assert done.acquire(timeout=TIMEOUT), "tasks of a loop it left never ran"
    finally:
        loop.close()


def test_stop_wakes_parked_workers_and_joins_them() -> None:
    """Workers parked on an empty queue are woken by stop() and exit, every time."""
    for _ in range(20):
        pool = ThreadPool(4, name="park")
        pool.start()
        wait_for(lambda p=pool: p.stats()["idle_workers"] == 4, TIMEOUT)
        assert pool.stop(timeout=TIMEOUT)
        assert not any(t.is_alive() for t in pool.threads)
