"""Attacks on the lazy worker wakeup (issue 12 review): the paths that make a task takeable
under stress, the release hooks' limits, and signals while the loop polls in slices.

- Ctrl-C reaches a main-thread loop whose pool has tasks waiting (the release hooks run in
  the poll's nogil section, where a caught signal does not interrupt epoll_wait);
- stop() while two loops and three plain threads keep adding keyed and unkeyed tasks:
  every accepted task is run or discarded, every worker exits;
- tasks that only finish together (a barrier) queued by a loop in one pass: the stall rule
  must wake every worker, keyed or not, round after round;
- more pools used from one loop pass than the loop has release-hook slots;
- timers still fire (never early) while the loop polls in recheck slices, and run_once()
  with a timeout returns.
A loop left by an exception right after queueing is in test_handoff_wakeups.py (with the
loop that quits).

Counts and orders only; every wait is bounded.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import pytest

from conftest import call_in_loop, wait_for
from cppnp import EventLoop, EventLoopThread, ThreadPool
from faults_support import run_child

TIMEOUT = 20.0

_CTRL_C_CHILD = r"""
import os, signal, sys, threading, time
from cppnp import EventLoop, ThreadPool

trials = int(sys.argv[1])
pool = ThreadPool(2, name="sig")
pool.start()
loop = EventLoop()
gate = threading.Event()
result = "ok %d" % trials
for trial in range(trials):
    gate.clear()
    started = threading.Event()

    def queue():
        # One task that blocks and three behind it: the loop wakes one worker, then polls
        # in recheck slices and wakes the other from its nogil section (the stall rule,
        # 1 ms later: the signal is sent 0 to 4 ms after this pass, often right then).
        started.set()
        pool.add_task(gate.wait, 60.0, key=False)
        for _ in range(3):
            pool.add_task(int, key=False)

    loop.queue_in_loop(queue)
    delay = (trial % 40) * 0.0001
    done = threading.Event()
    rescued = []

    def kill():
        started.wait()
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGINT)     # process-directed, as a terminal's Ctrl-C
        if not done.wait(5.0):
            # loop() did not raise: note it, then wake the loop (a no-op functor) so the
            # test reports instead of hanging.
            rescued.append(1)
            loop.queue_in_loop(int)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        loop.loop()
        result = "trial %d: loop() returned" % trial
    except KeyboardInterrupt:
        if rescued:
            result = "trial %d: the SIGINT waited until the loop was woken" % trial
    done.set()
    killer.join()
    gate.set()
    while pool.queued or pool.running:
        time.sleep(0.001)
    if not result.startswith("ok"):
        break
print(result, flush=True)
pool.stop()
loop.close()
"""


def test_ctrl_c_interrupts_a_main_loop_whose_pool_tasks_wait() -> None:
    """SIGINT to a process whose main-thread loop has tasks queued for a pool (one blocks,
    three wait behind it: the loop runs its release hooks and rechecks in slices, waking
    workers with the GIL released).  Every time, loop() raises KeyboardInterrupt without
    needing anything else to wake the loop -- a signal caught while the hooks ran (not
    inside epoll_wait, so no EINTR) must not leave the loop blocked until the next event."""
    proc = run_child(_CTRL_C_CHILD, "300", timeout=120.0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == "ok 300\n"


def _storm_round(drain: bool) -> None:
    pool = ThreadPool(3, name="storm")
    pool.start()
    accepted = [0] * 5
    ran = [0] * 5
    lock = threading.Lock()
    halt = threading.Event()

    def bump(i: int) -> None:
        with lock:
            ran[i] += 1

    def add(i: int, k: int) -> bool:
        try:
            if k % 3 == 0:
                pool.add_task(bump, i, key=(i, k % 7))  # strands
            else:
                pool.add_task(bump, i, key=False)
        except RuntimeError:
            return False
        accepted[i] += 1
        return True

    def from_thread(i: int) -> None:
        k = 0
        while not halt.is_set() and add(i, k):
            k += 1
            if k % 50 == 0:
                time.sleep(0)

    with EventLoopThread() as l1, EventLoopThread() as l2:
        loops = {3: l1, 4: l2}

        def burst(i: int) -> None:
            # One loop pass: a burst of tasks, then the next pass queues another.
            for k in range(1 + accepted[i] % 40):
                if not add(i, k):
                    return
            if not halt.is_set():
                loops[i].queue_in_loop(lambda: burst(i))

        threads = [threading.Thread(target=from_thread, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for i, lp in loops.items():
            lp.queue_in_loop(functools.partial(burst, i))
        wait_for(lambda: pool.completed > 2000, TIMEOUT)
        assert pool.stop(drain=drain, timeout=TIMEOUT), "a worker did not exit"
        halt.set()
        for t in threads:
            t.join(TIMEOUT)
        for lp in loops.values():
            call_in_loop(lp, lambda: None)  # its last burst is over
    assert not any(t.is_alive() for t in pool.threads)
    assert (pool.queued, pool.running, pool.failed) == (0, 0, 0)
    assert pool.completed + pool.discarded == sum(accepted)
    assert sum(ran) == pool.completed
    if drain:
        assert ran == accepted


def test_stop_while_loops_and_threads_keep_adding_tasks() -> None:
    """Two loops and three plain threads add keyed and unkeyed tasks to one 3-worker pool
    until it refuses them; stop() runs meanwhile.  Every accepted task ran (drain) or was
    discarded, nothing is left queued or running, and every worker exited -- round after
    round, drain and no drain."""
    for rnd in range(6):
        _storm_round(drain=rnd % 2 == 0)


def _reached(pool: ThreadPool, n: int) -> bool:
    return pool.completed >= n


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_tasks_that_only_finish_together_get_every_worker(keyed: bool) -> None:
    """Four tasks that wait for each other (a barrier) queued by a loop in one pass, on a
    4-worker pool: the loop wakes one worker, the stall rule must wake the other three (the
    first one blocks), every round -- a lost wakeup breaks the barrier."""
    pool = ThreadPool(4, name="barrier")
    pool.start()
    try:
        with EventLoopThread() as loop:
            for rnd in range(30):
                barrier = threading.Barrier(4)
                wait_for(lambda: pool.stats()["idle_workers"] == 4, TIMEOUT)

                def queue_all(barrier: threading.Barrier = barrier, rnd: int = rnd) -> None:
                    for i in range(4):
                        pool.add_task(barrier.wait, TIMEOUT, key=(rnd, i) if keyed else False)

                call_in_loop(loop, queue_all)
                wait_for(functools.partial(_reached, pool, 4 * (rnd + 1)), 2 * TIMEOUT)
                assert pool.failed == 0, "a barrier broke: a task waited for a worker"
    finally:
        assert pool.stop(timeout=TIMEOUT)
    assert pool.stats()["stall_wakeups"] >= 1


def test_more_pools_in_one_pass_than_release_hook_slots() -> None:
    """20 pools (the loop runs 16 release hooks per pass; the rest get their eager
    fallback) each get a blocking task and a quick one behind it in one loop pass: every
    quick task runs while every blocking one still blocks (a second worker was woken for
    it, lazily or eagerly), and every pool drains once the gate opens."""
    pools = [ThreadPool(2, name="many%d" % i) for i in range(20)]
    for p in pools:
        p.start()
    gate = threading.Event()
    quick: list[int] = []
    try:
        with EventLoopThread() as loop:
            for _rnd in range(3):
                gate.clear()
                quick.clear()

                def queue_all() -> None:
                    for i, p in enumerate(pools):
                        p.add_task(gate.wait, 3 * TIMEOUT, key=False)
                        p.add_task(quick.append, i, key=False)

                call_in_loop(loop, queue_all)
                wait_for(lambda: len(quick) == len(pools), TIMEOUT)
                assert not gate.is_set()
                assert sorted(quick) == list(range(len(pools)))
                assert all(p.running == 1 for p in pools)
                gate.set()
                wait_for(lambda: all(p.running == 0 and p.queued == 0 for p in pools), TIMEOUT)
    finally:
        gate.set()
        for p in pools:
            assert p.stop(timeout=TIMEOUT)
    assert all(p.completed == 6 and p.failed == 0 for p in pools)


def _timer_while_rechecking(loop: EventLoop, pool: ThreadPool, gate: threading.Event) -> None:
    fired: list[float] = []
    due: list[float] = []

    def queue() -> None:
        pool.add_task(gate.wait, 3 * TIMEOUT, key=False)
        pool.add_task(gate.wait, 3 * TIMEOUT, key=False)
        for _ in range(5):
            pool.add_task(int, key=False)
        due.append(time.monotonic() + 0.02)
        loop.run_after(0.02, lambda: fired.append(time.monotonic()))

    loop.queue_in_loop(queue)
    while not fired:
        loop.run_once(TIMEOUT)
    assert fired[0] >= due[0]
    loop.run_once(0.005)  # two workers block on the gate: run_once(timeout) returns


def test_timers_fire_and_run_once_returns_while_the_loop_rechecks(make_pool: Any) -> None:
    """While a loop polls in recheck slices (its pool's queued tasks wait behind blocked
    workers with another idle), a timer fires -- never before it is due -- and
    run_once(timeout) returns."""
    pool = make_pool(3)
    gate = threading.Event()
    loop = EventLoop()
    try:
        for _ in range(10):
            gate.clear()
            _timer_while_rechecking(loop, pool, gate)
            gate.set()
            wait_for(lambda: pool.running == 0 and pool.queued == 0, TIMEOUT)
    finally:
        gate.set()
        loop.close()
