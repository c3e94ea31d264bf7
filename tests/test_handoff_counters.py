"""The hand-off counters (issue 12) and the guarantees around the wakeups they count.

ThreadPool.stats(): handoffs, wakeups_sent/skipped, batches, batch_tasks, batch_max.
EventLoop.stats(): pending_wakeups/_skipped, pending_batches, pending_batch_items/_max.
The loop writes its eventfd only while it polls (PendingFunctors.begin_poll/end_poll):
stress tests check that no functor queued from another thread is left waiting (no lost
wakeup) and that per-connection order survives the batching.  Counts and orders only, no
timed assertions.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from conftest import call_in_loop, recv_exact, wait_for
from cppnp import EventLoopThread, ICppnpUsr, IRun2, Task, ThreadPool

TIMEOUT = 20.0
MAX_BATCH = 16  # includes/consts.pxd


def test_pool_counters_move_with_the_work(make_pool: Any) -> None:
    """Tasks added from a plain thread: every one is a hand-off, each batch ran at least
    one and at most MAX_BATCH, and the batches add up to the tasks that ran."""
    pool = make_pool(2)
    before = pool.stats()
    assert before["handoffs"] == before["batches"] == before["batch_tasks"] == 0
    done = threading.Semaphore(0)
    n = 500
    for _ in range(n):
        pool.add_task(done.release, key=False)
    for _ in range(n):
        assert done.acquire(timeout=TIMEOUT)
    wait_for(lambda: pool.stats()["batch_tasks"] == n, TIMEOUT)
    st = pool.stats()
    assert st["handoffs"] == n
    assert st["completed"] == n
    assert 1 <= st["batches"] <= n
    assert 1 <= st["batch_max"] <= MAX_BATCH
    assert st["wakeups_sent"] >= 1
    # Every push with a wakeup either woke a sleeping worker or found none to wake.
    assert st["wakeups_sent"] + st["wakeups_skipped"] >= 1
    assert st["wakeups_sent"] <= n


def test_loop_hands_a_batch_with_one_notify(make_pool: Any) -> None:
    """Tasks queued by a loop thread in one pass are handed over with one notify before
    the loop polls: at most one wakeup per worker, and the 64 tasks all run."""
    pool = make_pool(2)
    done = threading.Semaphore(0)
    with EventLoopThread() as loop:

        def queue_all() -> None:
            for _ in range(64):
                pool.add_task(done.release, key=False)

        for rnd in range(1, 6):
            wait_for(lambda: pool.running == 0 and pool.queued == 0, TIMEOUT)
            sent = pool.stats()["wakeups_sent"]
            call_in_loop(loop, queue_all)
            for _ in range(64):
                assert done.acquire(timeout=TIMEOUT)
            assert pool.stats()["wakeups_sent"] - sent <= 2  # one notify, two workers
            assert pool.stats()["handoffs"] == 64 * rnd


def test_no_lost_wakeup_for_functors_from_many_threads() -> None:
    """8 threads queue 2,000 functors each into a loop that mostly sleeps in epoll_wait:
    every functor runs (none waits for an unrelated wakeup), and each one was either
    announced by an eventfd write or found by the loop without one."""
    nthreads, per = 8, 2000
    ran = [0]
    all_ran = threading.Event()
    with EventLoopThread() as loop:
        base = loop.stats()

        def bump() -> None:
            ran[0] += 1  # loop thread only
            if ran[0] == nthreads * per:
                all_ran.set()

        def producer() -> None:
            for _ in range(per):
                loop.queue_in_loop(bump)

        threads = [threading.Thread(target=producer) for _ in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert all_ran.wait(TIMEOUT), "functors left waiting: %d of %d ran" % (
            ran[0],
            nthreads * per,
        )
        st = call_in_loop(loop, loop.stats)
    written = st["pending_wakeups"] - base["pending_wakeups"]
    skipped = st["pending_wakeups_skipped"] - base["pending_wakeups_skipped"]
    # (+1: the call_in_loop that read the stats was queued from this thread)
    assert nthreads * per <= written + skipped <= nthreads * per + 1
    assert written >= 1
    items = st["pending_batch_items"] - base["pending_batch_items"]
    assert items >= nthreads * per
    assert 1 <= st["pending_batch_max"] <= items


def test_no_lost_wakeup_one_functor_at_a_time() -> None:
    """Ping-pong: another thread queues one functor, waits for it, queues the next -- the
    case where the loop is asleep every time and each functor needs its own wakeup."""
    with EventLoopThread() as loop:
        box = threading.Semaphore(0)
        for _ in range(2000):
            loop.queue_in_loop(box.release)
            assert box.acquire(timeout=TIMEOUT), "a functor was never run"
        assert loop.stats()["pending_wakeups"] >= 1


class OrderedReplies(ICppnpUsr, IRun2):
    """Each line becomes Task(self, line, conn): replies must come back in order."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def on_message(self, conn: Any, buf: Any) -> None:
        while (i := buf.find_eol()) >= 0:
            self.pool.add_task(Task(self, buf.retrieve_as_bytes(i + 1), conn))

    def run2(self, msg: bytes, param: Any) -> None:
        param.send(msg)


def test_order_and_counts_under_batching(serve: Any, make_pool: Any) -> None:
    """8 clients pipeline 400 numbered lines each through a 4-worker pool: every client
    gets its lines back in order, and the loop ran the replies in batches."""
    pool = make_pool(4)
    srv = serve(OrderedReplies(pool))
    nclients, per = 8, 400
    socks = [srv.connect() for _ in range(nclients)]
    expected = []
    for c in range(nclients):
        payload = b"".join(b"%d:%06d\n" % (c, i) for i in range(per))
        expected.append(payload)
    errors: list[BaseException] = []

    def client(s: socket.socket, payload: bytes) -> None:
        try:
            s.sendall(payload)
            assert recv_exact(s, len(payload)) == payload
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s, p)) for s, p in zip(socks, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for s in socks:
        s.close()
    assert not errors, errors
    wait_for(lambda: pool.stats()["completed"] == nclients * per, TIMEOUT)
    ps = pool.stats()
    assert ps["batch_tasks"] == nclients * per
    assert ps["batches"] >= 1
    st = srv.stats()
    assert st["pending_batch_items"] >= nclients * per
