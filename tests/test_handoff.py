"""The hand-off from workers to the loop thread: a worker's send() only queues and the
loop thread writes; write-complete callbacks and timers added or cancelled from workers
run on the loop thread; replies from one worker keep their order.

Every behaviour is checked in single-thread mode (``ThreadPool(0)``) and pool mode.  No
timed assertions: counts, idents and orders only.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from typing import Any, Callable

from conftest import call_in_loop, recv_exact, recv_to_eof, wait_for
from cppnp import ICppnpUsr, IRun0, IRun2, Task, ThreadPool

TIMEOUT = 20.0


class LineWorker(ICppnpUsr, IRun2):
    """Each line received becomes Task(self, line, conn); *action(line, conn)* runs in
    the pool.  Records the thread of every loop-side callback."""

    def __init__(self, pool: ThreadPool, action: Callable[[bytes, Any], None]) -> None:
        self.pool = pool
        self.action = action
        self.lock = threading.Lock()
        self.task_threads: list[int] = []
        self.write_complete_threads: list[int] = []
        self.close_threads: list[int] = []
        self.closed = threading.Event()

    def on_message(self, conn: Any, buf: Any) -> None:
        while (i := buf.find_eol()) >= 0:
            self.pool.add_task(Task(self, buf.retrieve_as_bytes(i + 1), conn))

    def run2(self, msg: bytes, param: Any) -> None:
        with self.lock:
            self.task_threads.append(threading.get_ident())
        self.action(msg, param)

    def on_write_complete(self, conn: Any) -> None:
        self.write_complete_threads.append(threading.get_ident())

    def on_close(self, conn: Any) -> None:
        self.close_threads.append(threading.get_ident())
        self.closed.set()


def test_send_from_a_worker_is_written_by_the_loop_thread(
    serve: Any, make_pool: Any, nthreads: int
) -> None:
    """A worker's send() only queues: while the loop thread is held, nothing is written;
    the bytes go out (and on_write_complete runs) on the loop thread."""
    pool = make_pool(nthreads)
    observed: dict[str, Any] = {}
    loop_box: list[Any] = []

    def action(msg: bytes, conn: Any) -> None:
        loop = loop_box[0]
        if loop.is_in_loop_thread():  # single-thread mode: coalesced, written before the poll
            conn.send(b"x" * 1000)
            observed["bytes_sent_after_send"] = conn.bytes_sent
            return
        parked, release = threading.Event(), threading.Event()

        def park() -> None:
            parked.set()
            release.wait(TIMEOUT)

        loop.queue_in_loop(park)
        parked.wait(TIMEOUT)
        conn.send(b"x" * 1000)
        observed["bytes_sent_after_send"] = conn.bytes_sent
        observed["pending_functors"] = loop.pending_functors
        release.set()

    handler = LineWorker(pool, action)
    st = serve(handler)
    loop_box.append(st.loop)
    with st.connect() as c:
        c.sendall(b"go\n")
        assert recv_exact(c, 1000) == b"x" * 1000
        wait_for(lambda: handler.write_complete_threads, TIMEOUT)
    wait_for(handler.closed.is_set, TIMEOUT)
    if nthreads:
        assert observed["bytes_sent_after_send"] == 0
        assert observed["pending_functors"] >= 1
        assert set(handler.task_threads) <= {t.ident for t in pool.threads}
    else:
        # Write coalescing: a loop-thread send is written with the iteration's other
        # sends, before the loop polls again (not inside send()).
        assert observed["bytes_sent_after_send"] == 0
        assert handler.task_threads == [st.loop.thread_id]
    assert set(handler.write_complete_threads) == {st.loop.thread_id}
    assert handler.close_threads == [st.loop.thread_id]


def test_timers_and_write_complete_from_workers_run_on_the_loop_thread(
    serve: Any, make_pool: Any, nthreads: int
) -> None:
    pool = make_pool(nthreads)
    lock = threading.Lock()
    calls: dict[str, list[int]] = defaultdict(list)
    loop_box: list[Any] = []
    timer_ids: dict[str, int] = {}

    def record(name: str) -> Callable[[], None]:
        def cb() -> None:
            with lock:
                calls[name].append(threading.get_ident())

        return cb

    class Tick(IRun0):
        def run0(self) -> None:
            record("every")()

    def action(msg: bytes, conn: Any) -> None:
        loop = loop_box[0]
        cmd = msg.strip()
        if cmd == b"start":
            loop.run_after(0.001, record("after"))
            loop.runAfter(0.0, Task(record("after-task")))
            loop.run_at(loop.time() + 0.002, record("at"))
            timer_ids["every"] = loop.run_every(0.002, Tick())
            doomed = loop.run_after(3600, record("never"))
            loop.cancel_timer(doomed)  # cancelled before it can fire
        elif cmd == b"stop":
            loop.cancel_timer(timer_ids["every"])
        conn.send(b"ok:" + cmd + b"\n")

    handler = LineWorker(pool, action)
    st = serve(handler)
    loop = st.loop
    loop_box.append(loop)
    with st.connect() as c:
        c.sendall(b"start\n")
        assert recv_exact(c, 9) == b"ok:start\n"
        wait_for(
            lambda: (
                len(calls["every"]) >= 3 and calls["after"] and calls["at"] and calls["after-task"]
            ),
            TIMEOUT,
        )
        c.sendall(b"stop\n")
        assert recv_exact(c, 8) == b"ok:stop\n"
        # The cancel from the worker is queued to the loop; once it ran no timer is left.
        wait_for(lambda: call_in_loop(loop, lambda: loop.timer_count) == 0, TIMEOUT)
        fired = len(calls["every"])
        sentinel = threading.Event()
        loop.run_after(0.03, sentinel.set)  # 15 periods of the dead timer
        assert sentinel.wait(TIMEOUT)
        assert len(calls["every"]) == fired
        wait_for(lambda: len(handler.write_complete_threads) >= 2, TIMEOUT)
    wait_for(handler.closed.is_set, TIMEOUT)
    assert calls["never"] == []
    for name in ("after", "after-task", "at", "every"):
        assert set(calls[name]) == {loop.thread_id}, name
    assert set(handler.write_complete_threads) == {loop.thread_id}
    if nthreads:
        assert set(handler.task_threads) <= {t.ident for t in pool.threads}
        assert loop.thread_id not in handler.task_threads
    else:
        assert set(handler.task_threads) == {loop.thread_id}
    assert st.stats()["callback_errors"] == 0


def test_replies_from_one_worker_keep_their_order(
    serve: Any, make_pool: Any, nthreads: int
) -> None:
    """One task sends 400 replies of mixed types and sizes: they arrive in order, and a
    bytearray mutated after send() arrives as it was when sent (send copies)."""
    pool = make_pool(nthreads)
    expected = bytearray()
    rng = random.Random(99)
    sizes = [rng.choice([1, 7, 100, 3000]) for _ in range(400)]
    for i, size in enumerate(sizes):
        head = b"%05d|" % i
        expected += (head * (size // len(head) + 1))[: max(size, len(head))]

    def action(msg: bytes, conn: Any) -> None:
        for i, size in enumerate(sizes):
            head = b"%05d|" % i
            body = (head * (size // len(head) + 1))[: max(size, len(head))]
            kind = i % 4
            if kind == 0:
                conn.send(body)
            elif kind == 1:
                conn.send(body.decode())
            elif kind == 2:
                conn.send(memoryview(body))
            else:
                scratch = bytearray(body)
                conn.send(scratch)
                scratch[:] = b"#" * len(scratch)  # must not change what is sent

    handler = LineWorker(pool, action)
    st = serve(handler)
    with st.connect() as c:
        c.sendall(b"go\n")
        c.shutdown(1)  # SHUT_WR: reply, then close
        got = recv_to_eof(c)
    assert got == bytes(expected)
    wait_for(handler.closed.is_set, TIMEOUT)
    assert st.stats()["dropped_sends"] == 0
