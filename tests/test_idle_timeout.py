"""TcpServer(idle_timeout=...): connections that receive nothing for that long are closed
(a timing wheel per loop, idle_wheel.pyx).  Bounds are generous: the only timing facts
checked are "not before the deadline" (the wheel's timer cannot fire early) and "within
a few seconds after it"."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import Any

import pytest

from conftest import recv_until_eof, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, IRun2, Task, TcpConnection, TcpServer

SLACK = 5.0  # seconds of scheduling slack allowed after the deadline (2 shared cores)


class Tracker(ICppnpUsr, IRun2):
    """Echoes (optionally through a ThreadPool task); records opens and closes."""

    def __init__(self, pool: Any = None) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.conns: dict[int, TcpConnection] = {}
        self.closed: list[tuple[int, float]] = []
        self.gate = threading.Event()
        self.task_started = threading.Event()

    def on_connection(self, conn: TcpConnection) -> None:
        with self.lock:
            self.conns[conn.id] = conn

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        data = buf.retrieve_all()
        if self.pool is None:
            conn.send(data)
        else:
            self.pool.add_task(Task(self, data, conn))

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        self.task_started.set()
        self.gate.wait(30)
        conn.send(msg)

    def on_close(self, conn: TcpConnection) -> None:
        with self.lock:
            self.closed.append((conn.id, time.monotonic()))
            self.conns.pop(conn.id, None)  # no leak: the teardown counts live connections


@pytest.mark.parametrize(
    "value, exc",
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_idle_timeout_is_validated(value: Any, exc: type[Exception]) -> None:
    loop = EventLoop()
    try:
        with pytest.raises(exc, match="idle_timeout"):
            TcpServer(loop, ("127.0.0.1", 0), Tracker(), idle_timeout=value)
        off = TcpServer(loop, ("127.0.0.1", 0), Tracker())
        assert off.idle_timeout is None and off.stats()["idle_closed"] == 0
        on = TcpServer(loop, ("127.0.0.1", 0), Tracker(), idle_timeout=2)
        assert on.idle_timeout == 2.0
    finally:
        loop.close()


@pytest.mark.parametrize("io_threads", [0, 2], ids=["io0", "io2"])
def test_idle_connections_are_closed_after_the_deadline(
    serve: Any, io_threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 0.4
    tracker = Tracker()
    st = serve(tracker, idle_timeout=timeout, io_threads=io_threads)
    caplog.set_level(logging.DEBUG, logger="cppnp")
    socks = [st.connect() for _ in range(4)]
    try:
        starts = []
        for s in socks:
            s.sendall(b"hi")
            assert s.recv(16) == b"hi"
            starts.append(time.monotonic())  # the server received it before this
        for s, start in zip(socks, starts):
            s.settimeout(timeout + SLACK)
            assert recv_until_eof(s) == b""  # the server closed it
            assert time.monotonic() - start >= timeout
        wait_for(lambda: len(tracker.closed) == 4)
        assert st.server.stats()["idle_closed"] == 4
        assert st.server.idle_closed == 4
        # The wheels' timers stop with their last connection.
        wait_for(lambda: all(lp.timer_count == 0 for lp in st.serving_loops))
        assert any("nothing received for" in r.getMessage() for r in caplog.records)
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("io_threads", [0, 2], ids=["io0", "io2"])
def test_active_connections_stay_open(serve: Any, io_threads: int) -> None:
    timeout = 0.6
    tracker = Tracker()
    st = serve(tracker, idle_timeout=timeout, io_threads=io_threads)
    with st.connect() as active, st.connect() as idle:
        idle.sendall(b"x")
        assert idle.recv(1) == b"x"
        end = time.monotonic() + 4 * timeout
        n = 0
        while time.monotonic() < end:
            active.sendall(b"ping%d" % n)
            assert recv_exact_or_fail(active, len(b"ping%d" % n)) == b"ping%d" % n
            n += 1
            time.sleep(timeout / 3)
        idle.settimeout(SLACK)
        assert recv_until_eof(idle) == b""  # the idle one went meanwhile
        # The active one is still served; once it stops sending it goes too.
        active.sendall(b"last")
        assert recv_exact_or_fail(active, 4) == b"last"
        active.settimeout(timeout + SLACK)
        assert recv_until_eof(active) == b""
    wait_for(lambda: len(tracker.closed) == 2)
    assert st.server.idle_closed == 2


def recv_exact_or_fail(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "closed by the server while active"
        data += chunk
    return data


def test_idle_close_waits_for_the_task_in_flight(serve: Any, make_pool: Any) -> None:
    """Receive-idle closes a connection whose task still runs; on_close (the release)
    waits for the task, whose reply is dropped and counted."""
    timeout = 0.3
    pool = make_pool(2)
    tracker = Tracker(pool)
    st = serve(tracker, idle_timeout=timeout)
    with st.connect() as s:
        s.sendall(b"slow")
        assert tracker.task_started.wait(10)
        with tracker.lock:
            held = list(tracker.conns.values())  # cleared at the end: no leak
        s.settimeout(timeout + SLACK)
        assert recv_until_eof(s) == b""  # closed while the task runs
        conn = held[0]
        assert not conn.connected
        assert conn.pending_tasks == 1
        assert tracker.closed == []  # not released: a task refers to it
        tracker.gate.set()
        wait_for(lambda: len(tracker.closed) == 1)
        wait_for(lambda: held[0].dropped_sends == 1)
        assert conn.closed and conn.pending_tasks == 0
        held.clear()
    assert st.server.idle_closed == 1


def test_wheel_restarts_after_it_emptied(serve: Any) -> None:
    """The timer stops with the last connection and starts again with the next one."""
    timeout = 0.3
    tracker = Tracker()
    st = serve(tracker, idle_timeout=timeout, io_threads=0)
    for round_ in range(2):
        with st.connect() as s:
            s.sendall(b"a")
            assert s.recv(1) == b"a"
            s.settimeout(timeout + SLACK)
            assert recv_until_eof(s) == b""
        wait_for(lambda n=round_ + 1: len(tracker.closed) == n)
        wait_for(lambda: st.loop.timer_count == 0)
    assert st.server.idle_closed == 2


def test_no_idle_timeout_by_default(serve: Any) -> None:
    tracker = Tracker()
    st = serve(tracker, io_threads=0)
    with st.connect() as s:
        s.sendall(b"a")
        assert s.recv(1) == b"a"
        assert st.loop.timer_count == 0  # no wheel, no timer
    wait_for(lambda: len(tracker.closed) == 1)
    assert st.server.idle_closed == 0
