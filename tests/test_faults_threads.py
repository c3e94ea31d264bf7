"""Fault suite, checklist section C (threads and hand-off): C1 lost wakeups (functors
queued while the loop is inside its pending-functor pass, posts to an idle loop, a
barrier-aligned flood), C3 the thread-safe API hammered from workers, C5/C6 user
exceptions in every kind of callback (and a broken log filter), C5 BaseException in a
task, C7 quit() before loop() and start/stop races, C8 functors pending when the loop
quits.  C2 and C4 are covered elsewhere; C9 does not apply here (tests/README.md).
"""

from __future__ import annotations

import logging
import random
import socket
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
    TcpServer,
    ThreadPool,
)
from faults_support import (
    TIMEOUT,
    recv_exact,
    recv_until_eof,
    run_child,
    small_rcvbuf_client,
)

Serve = Callable[..., ServerThread]


@pytest.fixture
def idle_loop(ledger: Any) -> Any:
    """A loop in its own thread with no fd and no timer: only a wakeup can move it."""
    lt = EventLoopThread(name="idle-loop")
    lp = ledger.loop(lt.start())
    yield lp
    lt.stop()


# -- C1: lost wakeups -------------------------------------------------------------------------


def test_functor_queued_during_the_pending_pass_runs(idle_loop: EventLoop) -> None:
    """Another thread queues G while the loop runs functor F (after the queue was swapped
    and the wakeup consumed).  With no timer and no fd the loop would sleep forever if
    that enqueue did not write the eventfd (muduo #260)."""
    for i in range(300):
        in_pass, queued, ran = threading.Event(), threading.Event(), threading.Event()

        def f(in_pass: threading.Event = in_pass, queued: threading.Event = queued) -> None:
            in_pass.set()
            queued.wait(TIMEOUT)
            if random.random() < 0.5:
                time.sleep(0)

        idle_loop.queue_in_loop(f)
        assert in_pass.wait(TIMEOUT)
        idle_loop.queue_in_loop(ran.set)
        queued.set()
        assert ran.wait(TIMEOUT), "round %d: a functor queued during the pass was lost" % i
    assert idle_loop.stats()["timers"] == 0


def test_posts_to_an_idle_loop_and_a_barrier_aligned_flood(idle_loop: EventLoop) -> None:
    # (a) each post lands on a loop that is (most likely) asleep in epoll_wait.
    for i in range(500):
        done = threading.Event()
        idle_loop.queue_in_loop(done.set)
        assert done.wait(TIMEOUT), "post %d was not handled: lost wakeup" % i
        if i % 50 == 0:
            time.sleep(0.001)
    # (b) 8 threads released together, 20 000 posts each.
    counter = [0]
    nthreads, per = 8, 20_000
    barrier = threading.Barrier(nthreads)

    def inc() -> None:
        counter[0] += 1  # loop thread only

    def poster() -> None:
        barrier.wait(TIMEOUT)
        for _ in range(per):
            idle_loop.queue_in_loop(inc)

    threads = [threading.Thread(target=poster) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wait_for(lambda: call_in_loop(idle_loop, lambda: counter[0]) == nthreads * per, TIMEOUT)


# -- C3: the thread-safe API from workers -------------------------------------------------------


class Hammer(ICppnpUsr, IRun2):
    """One message starts a task that calls every thread-safe method of the loop and of
    its connection many times, with random tiny gaps."""

    def __init__(self, pool: ThreadPool, rounds: int) -> None:
        self.pool = pool
        self.rounds = rounds
        self.fired = 0
        self.short_kept = 0  # short timers not cancelled: each fires once
        self.short_total = 0
        self.long_kept: list[int] = []  # 30 s timers not cancelled (the test cancels)
        self.errors: list[BaseException] = []
        self.done = threading.Event()

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))

    def _tick(self) -> None:
        self.fired += 1

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        loop = conn.loop
        rng = random.Random(7)
        try:
            for i in range(self.rounds):
                delay = rng.choice([0.0, 0.0005, 30.0])
                tid = loop.run_after(delay, self._tick)
                cancel = rng.random() < 0.7
                if cancel:
                    loop.cancel_timer(tid)
                if delay < 1:
                    self.short_total += 1
                    self.short_kept += not cancel
                elif not cancel:
                    self.long_kept.append(tid)
                every = loop.run_every(0.0005, self._tick)
                loop.cancel_timer(every)
                self.short_total += 1
                conn.send(b"%06d\n" % i)
                if i % 7 == 0:
                    conn.stop_reading()
                    conn.start_reading()
                if i % 11 == 0:
                    conn.set_tcp_no_delay(i % 2 == 0)
                    conn.set_keep_alive(i % 3 == 0)
                if rng.random() < 0.01:
                    time.sleep(rng.random() / 1000)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
        finally:
            self.done.set()


def test_thread_safe_api_hammered_from_workers(serve: Serve, ledger: Any, nthreads: int) -> None:
    pool = ledger.pool(nthreads)
    rounds = 2500
    h = Hammer(pool, rounds)
    st = ledger.server(serve(h))
    with st.connect() as s:
        s.sendall(b"go")
        got = recv_exact(s, rounds * 7)
        assert h.done.wait(TIMEOUT)
        assert h.errors == []
        assert got == b"".join(b"%06d\n" % i for i in range(rounds))
    wait_for(
        lambda: call_in_loop(st.loop, lambda: st.loop.timer_count) == len(h.long_kept), TIMEOUT
    )
    # From another thread a cancel is queued, so a timer due then may still run once.
    assert h.short_kept <= h.fired <= h.short_total

    def cancel_rest() -> None:
        for tid in h.long_kept:
            st.loop.cancel_timer(tid)

    call_in_loop(st.loop, cancel_rest)
    assert call_in_loop(st.loop, lambda: st.loop.timer_count) == 0


# -- C5/C6: exceptions in every kind of callback ------------------------------------------------


class Boom(Exception):
    pass


class Faulty(ICppnpUsr, IRun2):
    """Each callback raises once (a distinct message), then behaves: the connection and
    the loop go on serving."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.raised: set[str] = set()
        self.closed = 0
        self.lock = threading.Lock()

    def _once(self, what: str) -> None:
        with self.lock:
            if what in self.raised:
                return
            self.raised.add(what)
        raise Boom("boom in %s" % what)

    def on_connection(self, conn: TcpConnection) -> None:
        conn.set_high_water_mark(1)  # every buffered send crosses it
        conn.loop.run_after(0, lambda: self._once("timer"))
        conn.loop.queue_in_loop(lambda: self._once("functor"))
        self._once("on_connection")

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        data = buf.retrieve_all()
        self.pool.add_task(Task(self, data, conn))
        self._once("on_message")

    def run2(self, data: bytes, conn: TcpConnection) -> None:
        if data == b"big":
            conn.send(b"B" * (8 << 20))  # buffered: high water mark, write complete
        else:
            conn.send(data)
        self._once("task")

    def on_write_complete(self, conn: TcpConnection) -> None:
        self._once("on_write_complete")

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        self._once("on_high_water_mark")

    def on_close(self, conn: TcpConnection) -> None:
        self.closed += 1
        self._once("on_close")


KINDS = [
    "on_connection",
    "on_message",
    "on_write_complete",
    "on_high_water_mark",
    "on_close",
    "timer",
    "functor",
    "task",
]


def test_exception_in_every_kind_of_callback(serve: Serve, ledger: Any, nthreads: int) -> None:
    pool = ledger.pool(nthreads)
    h = Faulty(pool)
    st = ledger.server(serve(h))
    for kind in KINDS:
        ledger.expect("Boom: boom in %s$" % kind, 1)
    with small_rcvbuf_client(st.address) as s:
        s.sendall(b"one")
        assert recv_exact(s, 3) == b"one"  # on_message and the task raised: still served
        s.sendall(b"big")
        assert recv_exact(s, 8 << 20) == b"B" * (8 << 20)
        s.sendall(b"two")
        assert recv_exact(s, 3) == b"two"
    wait_for(lambda: h.closed == 1, TIMEOUT)
    with st.connect() as s:  # the next connection: nothing raises now
        s.sendall(b"three")
        assert recv_exact(s, 5) == b"three"
    wait_for(lambda: h.closed == 2, TIMEOUT)
    assert h.raised == set(KINDS)
    wait_for(lambda: len(ledger.matching("Boom")) == len(KINDS), TIMEOUT)
    assert st.stats()["callback_errors"] == len(KINDS) - 1  # all but the task
    assert pool.failed == 1


def test_broken_log_filter_does_not_stop_the_loop(ledger: Any) -> None:
    """The loop reports callback errors on the ``cppnp`` logger; a logging filter or
    handler that itself raises must not take the loop down (uvloop
    test_set_exc_handler_broken: the loop keeps running)."""

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("broken log filter")

    logger = logging.getLogger("cppnp")
    broken = Broken()
    ran: list[str] = []
    lp = ledger.loop(EventLoop())
    ledger.expect("ZeroDivisionError: callback error")
    logger.addFilter(broken)
    try:

        def bad() -> None:
            raise ZeroDivisionError("callback error")

        lp.run_after(0, bad)
        lp.queue_in_loop(bad)
        lp.run_after(0.01, lambda: (ran.append("later"), lp.quit()))
        safety = lp.run_after(5, lp.quit)
        try:
            lp.loop()
            escaped = None
        except Exception as exc:  # checked below
            escaped = exc
        lp.cancel_timer(safety)
        # Drain whatever an escaped exception left behind, with the filter removed.
        logger.removeFilter(broken)
        if escaped is not None:
            lp.run_after(0.02, lp.quit)
            lp.loop()
    finally:
        logger.removeFilter(broken)
        lp.close()
    assert escaped is None, "loop() raised %r from a broken log filter" % (escaped,)
    assert ran == ["later"]
    assert lp.callback_errors == 2


# -- C5: BaseException in a task ------------------------------------------------------------------


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit], ids=["KI", "SystemExit"])
def test_base_exception_in_a_task(ledger: Any, nthreads: int, exc: type[BaseException]) -> None:
    """Pool mode: a worker cannot be interrupted by a signal, so the pool's policy is to
    log and count the task as failed; the worker lives on.  Single-thread mode: the task
    runs on the loop thread (where Ctrl-C lands); like a functor or timer raising it
    (test_event_loop::test_base_exception_in_functor_propagates_and_keeps_the_rest), the
    exception must come out of loop(), which then runs again."""
    pool = ledger.pool(nthreads)
    lp = ledger.loop(EventLoop())
    ran: list[str] = []

    def task() -> None:
        raise exc()

    try:
        lp.queue_in_loop(lambda: pool.add_task(task))
        lp.queue_in_loop(lambda: ran.append("after"))
        lp.run_after(0.05, lp.quit)
        if nthreads:
            ledger.expect("Exception in task.*%s" % exc.__name__, 1)
            lp.loop()
            wait_for(lambda: pool.failed == 1, TIMEOUT)
            done = threading.Event()
            pool.add_task(done.set)
            assert done.wait(TIMEOUT), "the worker died"
            assert all(t.is_alive() for t in pool.threads)
        else:
            with pytest.raises(exc):
                lp.loop()
            lp.loop()  # usable again; the next functor was kept
        assert ran == ["after"]
    finally:
        lp.close()


# -- C7: quit() before loop(), start/stop races ---------------------------------------------------


def test_quit_before_loop_from_another_thread_is_not_lost(ledger: Any) -> None:
    for _ in range(100):
        made, quitted = threading.Event(), threading.Event()
        box: dict[str, Any] = {}

        def main(
            made: threading.Event = made,
            quitted: threading.Event = quitted,
            box: dict[str, Any] = box,
        ) -> None:
            lp = EventLoop()
            box["loop"] = lp
            made.set()
            quitted.wait(TIMEOUT)
            try:
                lp.loop()  # must return: the quit came first
                box["returned"] = True
            finally:
                lp.close()

        t = threading.Thread(target=main)
        t.start()
        assert made.wait(TIMEOUT)
        box["loop"].quit()
        quitted.set()
        t.join(TIMEOUT)
        assert not t.is_alive() and box.get("returned")


def test_start_then_stop_at_once_many_times(ledger: Any) -> None:
    for i in range(200):
        lt = EventLoopThread(name="race-%d" % i)
        lp = lt.start()
        if i % 2:
            lp.quit()  # possibly before loop() started
        lt.stop(timeout=TIMEOUT)
        assert lp.closed


_START_STOP_CHILD = r"""
import socket, sys
from handlers import Echo, serve_in_thread

for i in range(10):
    lt, lp, server = serve_in_thread(Echo())
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    lp.queue_in_loop(server.stop)
    lt.stop(timeout=5)
    assert lp.closed
print("ok")
"""


def test_start_serve_stop_ten_times_in_a_subprocess() -> None:
    proc = run_child(_START_STOP_CHILD, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n" and proc.stderr == ""


# -- C8: functors pending when the loop quits -----------------------------------------------------


class Quitter(ICppnpUsr):
    def __init__(self) -> None:
        self.closes = 0

    def on_close(self, conn: TcpConnection) -> None:
        self.closes += 1


def test_functors_pending_at_quit_are_dropped_and_the_connection_released(ledger: Any) -> None:
    """A functor force-closes connection B and quits: B's close is queued behind the
    quit, so it is still pending when loop() returns; A's peer closes meanwhile and its
    EOF is never polled.  close() then releases both connections (without callbacks, as
    documented), drops and counts the pending functor, and leaves no fd or object."""
    h = Quitter()
    box: dict[str, Any] = {}
    ready, stopped, finish = (threading.Event() for _ in range(3))

    def main() -> None:
        lp = EventLoop()
        server = TcpServer(lp, ("127.0.0.1", 0), h)
        server.start()
        box["loop"], box["server"] = lp, server
        ready.set()
        try:
            lp.loop()  # until the functor below quits it
            box["pending_at_exit"] = lp.pending_functors
            box["connections_at_exit"] = server.connection_count
            stopped.set()
            finish.wait(TIMEOUT)
        finally:
            lp.close()
            box["dropped"] = lp.dropped_functors
            box["connections_after_close"] = server.connection_count

    t = threading.Thread(target=main, name="c8-loop")
    t.start()
    assert ready.wait(TIMEOUT)
    lp, server = box["loop"], box["server"]
    a = socket.create_connection(server.address, timeout=TIMEOUT)
    b = socket.create_connection(server.address, timeout=TIMEOUT)
    wait_for(lambda: call_in_loop(lp, lambda: server.connection_count) == 2, TIMEOUT)
    b_port = b.getsockname()[1]

    def destroy_and_quit() -> None:
        a.close()  # a FIN the loop will never poll
        time.sleep(0.02)
        for conn in server.connections():
            if conn.peer_address[1] == b_port:
                conn.force_close()  # queued: runs in the next functor pass
        lp.quit()

    lp.queue_in_loop(destroy_and_quit)
    try:
        assert stopped.wait(TIMEOUT)
        pending = box["pending_at_exit"]
        finish.set()
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert box["connections_at_exit"] == 2 and pending >= 1
        assert box["dropped"] >= pending
        assert box["connections_after_close"] == 0
        assert h.closes == 0  # close() releases without callbacks
        assert recv_until_eof(b) == b""
    finally:
        finish.set()
        b.close()
