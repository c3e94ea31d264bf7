"""Fault suite, checklist section D (timers), in a serving loop with a pool: D1/D2/D4
timers cancelled from their own callback, from another timer due in the same tick and
from another thread (a pool worker; the loop thread itself in single-thread mode), D3 an
old timer id never cancels a new timer, D4 cross-thread cancels racing the deadline.
D5 and D6 are covered in test_timers.py (tests/README.md).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, wait_for
from cppnp import (
    Buffer,
    EventLoop,
    EventLoopThread,
    ICppnpUsr,
    IRun2,
    Task,
    TcpConnection,
    ThreadPool,
)
from faults_support import POOL_IDS, POOL_SIZES, TIMEOUT, recv_exact

Serve = Callable[..., ServerThread]


class TimerUser(ICppnpUsr, IRun2):
    """``arm`` starts three timer cases on the loop thread; ``stop`` is a pool task that
    cancels the third (from a worker, or inline on the loop thread)."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.self_cancel = 0
        self.same_tick: list[str] = []
        self.remote = 0
        self.remote_at_cancel = -1
        self.remote_id = -1
        self.loop: EventLoop | None = None

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        cmd = buf.retrieve_all()
        loop = conn.loop
        self.loop = loop
        if cmd == b"arm":
            box: dict[str, int] = {}

            def every() -> None:
                self.self_cancel += 1
                if self.self_cancel == 3:
                    loop.cancel_timer(box["id"])  # inside its own callback
                    loop.cancel_timer(box["id"])  # twice: no-op

            box["id"] = loop.run_every(0.002, every)
            when = loop.time() + 0.005
            ids: dict[str, int] = {}

            def a() -> None:
                self.same_tick.append("a")
                loop.cancel_timer(ids["b"])  # due in this same tick

            ids["a"] = loop.run_at(when, a)
            ids["b"] = loop.run_at(when, lambda: self.same_tick.append("b"))
            self.remote_id = loop.run_every(0.001, self._remote_tick)
            conn.send(b"armed")
        elif cmd == b"stop":
            self.pool.add_task(Task(self, cmd, conn))

    def _remote_tick(self) -> None:
        self.remote += 1

    def run2(self, cmd: bytes, conn: TcpConnection) -> None:
        assert self.loop is not None
        self.remote_at_cancel = self.remote
        self.loop.cancel_timer(self.remote_id)
        conn.send(b"stopped")


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
def test_timers_cancelled_from_own_callback_same_tick_and_another_thread(
    serve: Serve, ledger: Any, nthreads: int
) -> None:
    pool = ledger.pool(nthreads)
    h = TimerUser(pool)
    st = ledger.server(serve(h))
    with st.connect() as s:
        s.sendall(b"arm")
        assert recv_exact(s, 5) == b"armed"
        wait_for(lambda: h.remote >= 3 and h.self_cancel >= 3 and h.same_tick, TIMEOUT)
        s.sendall(b"stop")
        assert recv_exact(s, 7) == b"stopped"
    call_in_loop(st.loop, lambda: None)  # a queued cancel has run by now
    remote_final = h.remote
    time.sleep(0.02)  # 20 periods of the 1 ms timer
    for _ in range(3):
        call_in_loop(st.loop, lambda: None)
    assert h.remote == remote_final, "the timer fired after its cancel was handled"
    if nthreads == 0:
        assert remote_final == h.remote_at_cancel  # same thread: immediate
    else:
        assert remote_final - h.remote_at_cancel <= 1  # queued: at most one more
    assert h.self_cancel == 3
    assert h.same_tick == ["a"]
    assert call_in_loop(st.loop, lambda: st.loop.timer_count) == 0


def test_old_timer_id_never_cancels_a_new_timer(ledger: Any) -> None:
    lp = ledger.loop(EventLoop())
    try:
        fired: list[int] = []
        t1 = lp.run_after(0, lambda: fired.append(1))
        lp.run_once(0)
        assert fired == [1] and lp.timer_count == 0
        ids = [lp.run_after(60, lambda: None) for _ in range(10_000)]
        assert t1 not in ids and len(set(ids)) == len(ids)
        lp.cancel_timer(t1)  # stale: must hit nothing
        lp.cancel_timer(t1)
        assert lp.timer_count == 10_000
        for tid in ids:
            lp.cancel_timer(tid)
        assert lp.timer_count == 0
    finally:
        lp.close()


def test_cross_thread_cancel_racing_the_deadline(ledger: Any) -> None:
    """A thread cancels each timer right at its deadline (spinning on the loop clock):
    every callback runs at most once, and the loop ends with no timer left."""
    lt = EventLoopThread(name="race-loop")
    lp = ledger.loop(lt.start())
    try:
        n, step = 1500, 0.0002
        counts = [0] * n
        t0 = lp.time() + 0.05
        ids: list[int] = []

        def make(i: int) -> Callable[[], None]:
            def cb() -> None:
                counts[i] += 1

            return cb

        def arm() -> None:
            for i in range(n):
                ids.append(lp.run_at(t0 + i * step, make(i)))

        call_in_loop(lp, arm)
        barrier = threading.Barrier(2)

        def canceller() -> None:
            barrier.wait(TIMEOUT)
            for i in range(n):
                deadline = t0 + i * step + (i % 3 - 1) * 0.0001
                while lp.time() < deadline:
                    pass
                lp.cancel_timer(ids[i])

        t = threading.Thread(target=canceller)
        t.start()
        barrier.wait(TIMEOUT)
        t.join(TIMEOUT)
        assert not t.is_alive()
        wait_for(lambda: call_in_loop(lp, lambda: lp.timer_count) == 0, TIMEOUT)
        call_in_loop(lp, lambda: None)
        assert max(counts) <= 1
    finally:
        lt.stop()
