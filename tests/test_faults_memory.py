"""Fault suite, checklist section H (memory safety and leaks): H1 interpreter exit with a
live loop, server, pool and connection and no close (exit 0, empty stderr), a loop
dropped without close while a connection is open; H2 thousands of connect/close cycles
with a handler that keeps each connection on itself, in its ``context`` (a cycle) and in
timer closures -- every connection object dies and traced memory stays flat.
"""

from __future__ import annotations

import gc
import socket
import threading
import tracemalloc
import weakref
from typing import Any, Callable

import pytest

from conftest import ServerThread, fd_count, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, IRun2, Task, TcpConnection, TcpServer, ThreadPool
from faults_support import POOL_IDS, POOL_SIZES, TIMEOUT, run_child

Serve = Callable[..., ServerThread]


# -- H1: exit without closing anything --------------------------------------------------------

_EXIT_CHILD = r"""
import socket, sys, threading
from cppnp import EventLoop, EventLoopThread, ICppnpUsr, IRun2, Task, TcpServer, ThreadPool
from handlers import serve_in_thread

where, nthreads = sys.argv[1], int(sys.argv[2])
gate = threading.Event()                       # never set: a task stays in flight

class PoolEcho(ICppnpUsr, IRun2):
    # Not handlers.Echo: echoes from the pool, and a b"hold" task stays in flight at exit.
    def __init__(self, pool):
        self.pool = pool
    def on_message(self, conn, buf):
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))
    def run2(self, msg, conn):
        if msg == b"hold":
            gate.wait()
        conn.send(msg)

pool = ThreadPool(nthreads)
pool.start()
h = PoolEcho(pool)
if where == "thread":
    lt, lp, server = serve_in_thread(h)
    s = socket.create_connection(server.address)
    s.sendall(b"hi")
    assert s.recv(2) == b"hi"
    if nthreads:
        s.sendall(b"hold")
else:
    lp = EventLoop()
    server = TcpServer(lp, ("127.0.0.1", 0), h)
    server.start()
    s = socket.create_connection(server.address)
    s.sendall(b"hi")
    s.setblocking(False)
    got = b""
    while got != b"hi":
        lp.run_once(0.05)
        try:
            got += s.recv(2)
        except BlockingIOError:
            pass
print("exiting", flush=True)
"""


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
@pytest.mark.parametrize("where", ["thread", "main"])
def test_interpreter_exit_with_live_objects_is_clean(where: str, nthreads: int) -> None:
    proc = run_child(_EXIT_CHILD, where, str(nthreads))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n"
    assert proc.stderr == "", proc.stderr


def test_loop_dropped_without_close_with_an_open_connection(ledger: Any) -> None:
    """``del loop`` (no close) while a connection is open and a timer and a functor are
    pending: after gc the fds are closed, every object is gone, and the thread may create
    a new loop."""
    box: dict[str, Any] = {}

    def main() -> None:
        fds = fd_count()
        lp = EventLoop()
        server = TcpServer(lp, ("127.0.0.1", 0), ICppnpUsr())
        server.start()
        client = socket.create_connection(server.address, timeout=TIMEOUT)
        conns: list[TcpConnection] = []
        while not conns:
            lp.run_once(0.05)
            conns = server.connections()
        refs = [weakref.ref(lp), weakref.ref(server), weakref.ref(conns[0])]
        lp.run_after(60, lambda: None)
        lp.queue_in_loop(lambda: None)
        del lp, server, conns
        gc.collect()
        box["alive"] = [r() is not None for r in refs]
        client.close()
        box["fds_left"] = fd_count() - fds
        lp2 = EventLoop()  # the dead loop no longer owns this thread
        lp2.close()
        box["new_loop"] = True

    t = threading.Thread(target=main)
    t.start()
    t.join(TIMEOUT)
    assert box == {"alive": [False, False, False], "fds_left": 0, "new_loop": True}


# -- H2: connect/close cycles with references through callbacks -------------------------------

CYCLES = 2000
WARMUP = 300


class Sticky(ICppnpUsr, IRun2):
    """Keeps each connection on itself, in a context that points back at it and at the
    handler (a cycle), and in a timer closure: a long one cancelled in on_close, or a
    short one that fires (maybe after the close: its send is then dropped)."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.conns: dict[int, TcpConnection] = {}
        self.refs: list[weakref.ref[TcpConnection]] = []
        self.closed = 0
        self.lock = threading.Lock()

    def on_connection(self, conn: TcpConnection) -> None:
        self.conns[conn.id] = conn
        self.refs.append(weakref.ref(conn))
        loop = conn.loop
        if conn.id % 2:
            tid = loop.run_after(60, lambda: conn.send(b"never"))
        else:
            tid = loop.run_after(0.001, lambda: conn.send(b"late"))
        conn.context = {"conn": conn, "handler": self, "timer": tid}

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        conn.send(msg)

    def on_close(self, conn: TcpConnection) -> None:
        conn.loop.cancel_timer(conn.context["timer"])
        del self.conns[conn.id]
        with self.lock:
            self.closed += 1


def _cycle(address: Any) -> None:
    with socket.create_connection(address, timeout=TIMEOUT) as s:
        s.sendall(b"ping")
        got = b""
        while b"ping" not in got:
            chunk = s.recv(64)
            assert chunk, "closed before the echo"
            got += chunk


def _settle(h: Sticky, n: int) -> int:
    """Traced bytes once *n* connections are released, without this file's own
    bookkeeping (the weakref list grows by one entry per cycle)."""
    wait_for(lambda: h.closed == n, TIMEOUT)
    for _ in range(3):
        gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    return sum(stat.size for stat in snap.statistics("filename"))


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
def test_connect_close_cycles_leave_nothing_alive(serve: Serve, ledger: Any, nthreads: int) -> None:
    pool = ledger.pool(nthreads)
    h = Sticky(pool)
    st = ledger.server(serve(h))
    for _ in range(WARMUP):
        _cycle(st.address)
    tracemalloc.start()
    try:
        wait_for(lambda: h.closed == WARMUP, TIMEOUT)
        h.refs.clear()
        before = _settle(h, WARMUP)
        for _ in range(CYCLES - WARMUP):
            _cycle(st.address)
        after = _settle(h, CYCLES)
    finally:
        tracemalloc.stop()
    wait_for(lambda: st.loop.stats()["timers"] == 0, TIMEOUT)  # the short ones fired
    gc.collect()
    alive = sum(1 for r in h.refs if r() is not None)
    assert alive == 0, "%d of %d connections still alive" % (alive, len(h.refs))
    assert h.conns == {}
    growth = after - before
    # Flat-ish: well under one small allocation per cycle.
    assert growth < 64 * 1024, "traced memory grew by %d bytes over %d cycles" % (
        growth,
        CYCLES - WARMUP,
    )
