"""Fault suite, checklist section A (connection lifecycle): A4 stale events for an fd
closed and reused inside one epoll batch, A5 callbacks closing their own or another
connection, A6 double close from every thread with a write pending, A9 every byte before
the close, A10 pause/resume after close and a hang-up while paused, A11 busy loops.

Rows A1-A3, A7, A8 and A12 are covered elsewhere (see tests/README.md).  Where a pool
applies, each case runs in single-thread mode (ThreadPool(0)) and pool mode
(ThreadPool(4)).  Every test ends with the ``ledger`` check (faults_support.Ledger)
and conftest's ``no_leaks``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, IRun2, Task, TcpConnection, ThreadPool
from faults_support import (
    TIMEOUT,
    iterations_while_idle,
    park_loop,
    recv_exact,
    recv_until_eof,
    rst_close,
    small_rcvbuf_client,
)

Serve = Callable[..., ServerThread]


class Tracked(ICppnpUsr, IRun2):
    """Each message becomes ``Task(self, data, conn)`` in the pool; ``act`` (on a worker,
    or inline on the loop thread in single-thread mode) echoes it unless a subclass says
    otherwise.  Records every callback by connection id and any callback that arrives for
    a connection after its on_close."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.conns: dict[int, TcpConnection] = {}  # open connections (loop thread)
        self.by_port: dict[int, int] = {}
        self.fds: dict[int, int] = {}
        self.iteration: dict[int, int] = {}  # id -> iteration of on_connection
        self.messages: Counter[int] = Counter()
        self.received: Counter[int] = Counter()
        self.closes: Counter[int] = Counter()
        self.received_at_close: dict[int, int] = {}
        self.after_close: list[tuple[str, int]] = []
        self.errors: list[str] = []

    def _alive(self, what: str, conn: TcpConnection) -> None:
        if self.closes[conn.id]:
            self.after_close.append((what, conn.id))

    def on_connection(self, conn: TcpConnection) -> None:
        self._alive("connection", conn)
        self.conns[conn.id] = conn
        self.fds[conn.id] = conn.fileno
        self.iteration[conn.id] = int(conn.loop.stats()["iterations"])
        with self.lock:
            self.by_port[conn.peer_address[1]] = conn.id

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self._alive("message", conn)
        data = buf.retrieve_all()
        self.messages[conn.id] += 1
        self.received[conn.id] += len(data)
        self.handle(conn, data)

    def handle(self, conn: TcpConnection, data: bytes) -> None:
        self.pool.add_task(Task(self, data, conn))

    def run2(self, data: bytes, conn: TcpConnection) -> None:
        self.act(conn, data)

    def act(self, conn: TcpConnection, data: bytes) -> None:
        conn.send(data)

    def on_close(self, conn: TcpConnection) -> None:
        self._alive("close", conn)
        self.closes[conn.id] += 1
        self.received_at_close[conn.id] = self.received[conn.id]
        if conn.pending_tasks:
            self.errors.append("on_close with %d tasks pending" % conn.pending_tasks)
        self.conns.pop(conn.id, None)

    def conn_id(self, sock: socket.socket) -> int:
        port = sock.getsockname()[1]
        return int(wait_for(lambda: self.by_port.get(port), TIMEOUT))

    def wait_closed(self, cid: int) -> None:
        wait_for(lambda: self.closes[cid] >= 1, TIMEOUT)

    def assert_clean(self) -> None:
        assert self.errors == []
        assert self.after_close == [], "callbacks after on_close: %r" % self.after_close
        assert set(self.closes.values()) <= {1}, "on_close ran twice: %r" % self.closes

    def forget(self) -> None:
        self.conns.clear()


# -- A5: a callback closes its own connection ----------------------------------------------


class SelfCloser(Tracked):
    def __init__(self, pool: ThreadPool, how: str) -> None:
        super().__init__(pool)
        self.how = how

    def act(self, conn: TcpConnection, data: bytes) -> None:
        if data != b"bye?":
            conn.send(data)
            return
        conn.send(b"bye")
        if self.how == "force_close":
            conn.force_close()
        else:
            conn.shutdown()


@pytest.mark.parametrize("how", ["force_close", "shutdown"])
def test_callback_closes_its_own_connection(
    serve: Serve, ledger: Any, nthreads: int, how: str
) -> None:
    """The reply sent before the close arrives, then EOF; on_close runs once and no
    callback follows it; the server keeps serving other clients."""
    pool = ledger.pool(nthreads)
    h = SelfCloser(pool, how)
    st = ledger.server(serve(h))
    for _ in range(5):
        with st.connect() as s:
            cid = h.conn_id(s)
            s.sendall(b"hello")
            assert recv_exact(s, 5) == b"hello"
            s.sendall(b"bye?")
            assert recv_until_eof(s) == b"bye"
            if how == "shutdown":
                assert h.closes[cid] == 0  # half-closed: waits for the peer
        h.wait_closed(cid)
    assert sum(h.closes.values()) == 5
    h.assert_clean()
    h.forget()


class ConnectionAborter(Tracked):
    def __init__(self, pool: ThreadPool, what: str) -> None:
        super().__init__(pool)
        self.what = what

    def on_connection(self, conn: TcpConnection) -> None:
        super().on_connection(conn)
        if self.what == "abort":
            conn.force_close()
        else:
            raise ValueError("on_connection raised on purpose")


@pytest.mark.parametrize("what", ["abort", "raise"])
def test_on_connection_aborts_or_raises(
    serve: Serve, ledger: Any, nthreads: int, what: str
) -> None:
    """abort: the connection is closed before any on_message (even though the client
    sent at once); raise: logged and counted, the connection is served as usual."""
    pool = ledger.pool(nthreads)
    h = ConnectionAborter(pool, what)
    st = ledger.server(serve(h))
    if what == "raise":
        ledger.expect("on_connection.*ValueError", 3)
    for _ in range(3):
        with st.connect() as s:
            s.sendall(b"data")
            cid = h.conn_id(s)
            if what == "abort":
                assert recv_until_eof(s) == b""
            else:
                assert recv_exact(s, 4) == b"data"
        h.wait_closed(cid)
        assert h.messages[cid] == (0 if what == "abort" else 1)
    assert st.stats()["callback_errors"] == (3 if what == "raise" else 0)
    h.assert_clean()
    h.forget()


# -- A5: a callback closes another connection of the same batch ------------------------------


class OtherCloser(Tracked):
    def __init__(self, pool: ThreadPool) -> None:
        super().__init__(pool)
        self.deferred: list[bool] = []

    def act(self, conn: TcpConnection, data: bytes) -> None:
        if not data.startswith(b"kill:"):
            conn.send(data)
            return
        other = self.conns[int(data[5:])]
        other.force_close()
        if other.loop.is_in_loop_thread():
            # Destruction is deferred through the functor queue: still usable here.
            self.deferred.append(other.connected)


def test_callback_closes_another_connection_in_the_same_batch(
    serve: Serve, ledger: Any, nthreads: int
) -> None:
    pool = ledger.pool(nthreads)
    h = OtherCloser(pool)
    st = ledger.server(serve(h))
    for _ in range(5):
        a, b = st.connect(), st.connect()
        a_id, b_id = h.conn_id(a), h.conn_id(b)
        release = park_loop(st.loop)
        a.sendall(b"kill:%d" % b_id)
        b.sendall(b"bmsg")
        time.sleep(0.02)  # both readable when the loop polls next
        release()
        assert recv_until_eof(b) in (b"", b"bmsg")
        h.wait_closed(b_id)
        a.sendall(b"ping")  # the closer itself is unaffected
        assert recv_exact(a, 4) == b"ping"
        a.close()
        b.close()
        h.wait_closed(a_id)
    if nthreads == 0:
        assert h.deferred == [True] * 5
    h.assert_clean()
    h.forget()


# -- A4: an fd closed and reused inside one epoll batch ---------------------------------------


class BatchReuse(Tracked):
    """``trigger`` (from A) sends to B, whose peer has reset: the send fails, so B's socket
    is closed right there, in the middle of the batch that also holds B's own reset
    event and the listener's event for a new client C (which gets B's fd number)."""

    def __init__(self, pool: ThreadPool) -> None:
        super().__init__(pool)
        self.gate = threading.Event()
        self.b_id = -1
        self.rounds: list[dict[str, Any]] = []

    def handle(self, conn: TcpConnection, data: bytes) -> None:
        if data == b"trigger":
            b = self.conns[self.b_id]
            before = b.connected
            # Loop thread, above the coalescing size (16 KiB): written (and failing) right
            # now, not at the end of the iteration.
            b.send(b"x" * 65536)
            self.rounds.append(
                {
                    "b_connected_before": before,
                    "b_connected_after": b.connected,
                    "iteration": conn.loop.stats()["iterations"],
                }
            )
            return
        super().handle(conn, data)

    def act(self, conn: TcpConnection, data: bytes) -> None:
        if data == b"hold":
            self.gate.wait(TIMEOUT)  # B's reply, late: must be dropped
        conn.send(data)


def test_fd_reused_within_one_epoll_batch_gets_no_stale_event(
    serve: Serve, ledger: Any, nthreads: int
) -> None:
    pool = ledger.pool(nthreads)
    h = BatchReuse(pool)
    st = ledger.server(serve(h))
    exercised = 0
    for _ in range(6):
        h.gate = threading.Event()
        a, b = st.connect(), st.connect()
        a_id = h.conn_id(a)
        h.b_id = b_id = h.conn_id(b)
        b_fd = h.fds[b_id]
        if nthreads:
            b.sendall(b"hold")  # a task for B in flight across its death
            wait_for(lambda: pool.running == 1, TIMEOUT)
        release = park_loop(st.loop)
        a.sendall(b"trigger")
        time.sleep(0.02)
        rst_close(b)
        time.sleep(0.02)
        c = st.connect()  # completes in the kernel; accepted later
        time.sleep(0.05)
        release()
        c_id = h.conn_id(c)
        wait_for(lambda: len(h.rounds) > 0, TIMEOUT)
        r = h.rounds.pop()
        h.gate.set()
        h.wait_closed(b_id)
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b"hello"  # C's own echo and nothing of B's
        c.close()
        a.close()
        h.wait_closed(c_id)
        h.wait_closed(a_id)
        if (
            r["b_connected_before"]
            and not r["b_connected_after"]
            and h.fds[c_id] == b_fd
            and h.iteration[c_id] == r["iteration"]
        ):
            exercised += 1
        assert h.messages[b_id] == (1 if nthreads else 0)
        assert h.messages[c_id] == 1
    # At least once: B closed mid-batch, and C got B's fd number in that same batch.
    assert exercised >= 1, "the same-batch fd reuse was never provoked"
    h.assert_clean()
    h.forget()


# -- A6: double close, close from other threads, with a write pending -------------------------


BIG = bytes(range(256)) * (8 * 4096)  # 8 MiB


class BigSender(Tracked):
    def __init__(self, pool: ThreadPool) -> None:
        super().__init__(pool)
        self.new_fd = -1
        self.new_fd_ino = 0

    def act(self, conn: TcpConnection, data: bytes) -> None:
        conn.send(BIG if data == b"go" else data)

    def on_close(self, conn: TcpConnection) -> None:
        super().on_close(conn)
        # The fd number just given back is reused at once: a second close(fd) by the
        # library would close this file.
        if self.new_fd >= 0:
            return
        self.new_fd = os.open("/dev/null", os.O_RDONLY)
        self.new_fd_ino = os.fstat(self.new_fd).st_ino


def test_double_close_from_every_thread_with_a_write_pending(
    serve: Serve, ledger: Any, nthreads: int
) -> None:
    pool = ledger.pool(nthreads)
    h = BigSender(pool)
    st = ledger.server(serve(h))
    s = small_rcvbuf_client(st.address)
    try:
        s.sendall(b"go")
        cid = h.conn_id(s)
        conn = h.conns[cid]
        wait_for(lambda: call_in_loop(st.loop, lambda: conn.output_bytes) > 0, TIMEOUT)
        conn.force_close()  # this thread
        conn.force_close()
        pool.add_task(conn.force_close)  # a worker (or inline here)
        call_in_loop(st.loop, conn.force_close)  # the loop thread
        h.wait_closed(cid)
        pool.add_task(conn.force_close)  # after release: no-ops
        call_in_loop(st.loop, conn.force_close)
        call_in_loop(st.loop, conn.shutdown)
        for _ in range(5):
            call_in_loop(st.loop, lambda: None)
        with st.connect() as other:  # more fds come and go
            other.sendall(b"x")
            assert recv_exact(other, 1) == b"x"
    finally:
        s.close()
    assert h.new_fd >= 0
    try:
        assert os.fstat(h.new_fd).st_ino == h.new_fd_ino, "an fd opened after close changed"
    finally:
        os.close(h.new_fd)
    assert conn.closed and conn.fileno == -1 and conn.output_bytes == 0
    assert conn.bytes_sent + conn.dropped_bytes == len(BIG)
    assert conn.dropped_bytes > 0
    h.assert_clean()
    h.forget()
    lp = EventLoop()
    for _ in range(3):
        lp.close()
    assert lp.closed


# -- A9: every byte reaches on_message before the close ---------------------------------------


class Counting(Tracked):
    def __init__(self, pool: ThreadPool, shutdown_first: bool) -> None:
        super().__init__(pool)
        self.shutdown_first = shutdown_first

    def on_connection(self, conn: TcpConnection) -> None:
        super().on_connection(conn)
        if self.shutdown_first:
            conn.shutdown()  # our FIN first: the peer's FIN then means EPOLLHUP

    def act(self, conn: TcpConnection, data: bytes) -> None:
        pass  # count only (the peer is gone by now anyway)


@pytest.mark.parametrize("shutdown_first", [False, True], ids=["rdhup", "hup"])
def test_every_byte_arrives_before_the_close(
    serve: Serve, ledger: Any, nthreads: int, shutdown_first: bool
) -> None:
    """The peer writes more than a socket buffer and closes at once: every byte reaches
    on_message before the single on_close (also when the server had already shut down
    its side, so the last events carry EPOLLHUP together with EPOLLIN)."""
    pool = ledger.pool(nthreads)
    h = Counting(pool, shutdown_first)
    st = ledger.server(serve(h))
    n = (1 << 20) + 1
    for _ in range(3):
        s = st.connect()
        cid = h.conn_id(s)
        if shutdown_first:
            assert recv_until_eof(s) == b""
        s.sendall(b"a" * n)
        s.close()
        h.wait_closed(cid)
        assert h.received_at_close[cid] == n
    h.assert_clean()
    h.forget()


# -- A10: pause/resume after close; a hang-up while reading is stopped ------------------------


def test_pause_resume_are_noops_after_close_and_fin_while_paused_keeps_data(
    serve: Serve, ledger: Any
) -> None:
    class Paused(Tracked):
        def on_connection(self, conn: TcpConnection) -> None:
            super().on_connection(conn)
            conn.stop_reading()
            conn.stop_reading()

        def act(self, conn: TcpConnection, data: bytes) -> None:
            pass

    pool = ledger.pool(0)
    h = Paused(pool)
    st = ledger.server(serve(h))
    payload = 1 << 20
    s = st.connect()
    cid = h.conn_id(s)
    conn = h.conns[cid]
    sender = threading.Thread(
        target=lambda: (s.sendall(b"p" * payload), s.shutdown(socket.SHUT_WR))
    )
    sender.start()
    for _ in range(3):
        call_in_loop(st.loop, lambda: None)
    assert h.received[cid] == 0 and h.closes[cid] == 0
    conn.start_reading()
    conn.start_reading()
    sender.join(TIMEOUT)
    h.wait_closed(cid)
    assert h.received_at_close[cid] == payload
    s.close()
    # After release: every switch is a harmless no-op, from any thread.
    for fn in (conn.stop_reading, conn.start_reading, conn.stop_reading):
        fn()
        call_in_loop(st.loop, fn)
    call_in_loop(st.loop, lambda: None)
    assert conn.closed and h.closes[cid] == 1
    h.assert_clean()
    h.forget()


def test_peer_data_survives_a_hangup_while_reading_is_stopped(serve: Serve, ledger: Any) -> None:
    """Our side is shut down and reading is paused; the peer sends its last bytes and
    closes (a clean FIN, no reset): the kernel reports EPOLLHUP.  The bytes must still
    reach on_message once reading resumes, before the single on_close (as they do after
    a FIN without our shutdown: test_tcp_connection::
    test_fin_while_reading_is_stopped_is_seen_after_start)."""

    class PausedShut(Tracked):
        def on_connection(self, conn: TcpConnection) -> None:
            super().on_connection(conn)
            conn.stop_reading()
            conn.shutdown()

        def act(self, conn: TcpConnection, data: bytes) -> None:
            pass

    pool = ledger.pool(0)
    h = PausedShut(pool)
    st = ledger.server(serve(h))
    s = st.connect()
    cid = h.conn_id(s)
    conn = h.conns[cid]
    assert recv_until_eof(s) == b""  # our FIN
    s.sendall(b"tail")
    s.close()
    time.sleep(0.1)  # the peer's FIN arrives
    for _ in range(3):
        call_in_loop(st.loop, lambda: None)
    closed_while_paused = h.closes[cid]
    conn.start_reading()
    del conn
    h.wait_closed(cid)
    assert h.received_at_close[cid] == 4, (
        "the peer's last bytes were dropped (closed while paused: %d)" % closed_while_paused
    )
    h.assert_clean()
    h.forget()


# -- A11: no busy loop ------------------------------------------------------------------------

# libuv's tcp_unexpected_read allows 20 ticks in 1 s; we watch 0.3 s of idleness.
MAX_IDLE_ITERATIONS = 10


class BusyProbe(Tracked):
    def __init__(self, pool: ThreadPool, case: str) -> None:
        super().__init__(pool)
        self.case = case
        self.write_completes = 0

    def on_connection(self, conn: TcpConnection) -> None:
        super().on_connection(conn)
        if self.case == "paused_peer_writes":
            conn.stop_reading()

    def act(self, conn: TcpConnection, data: bytes) -> None:
        if self.case == "output_drained" and data == b"go":
            conn.send(b"o" * (4 << 20))
        elif self.case == "oob":
            conn.send(data)

    def on_write_complete(self, conn: TcpConnection) -> None:
        self.write_completes += 1


@pytest.mark.parametrize("case", ["paused_peer_writes", "output_drained", "oob", "dup_after_close"])
def test_no_busy_loop(serve: Serve, ledger: Any, case: str) -> None:
    """(a) unread data while paused, (b) an empty output buffer after a big write,
    (c) urgent (MSG_OOB) data, (d) a dup of a connection's fd kept open after the
    connection closed (EPOLL_CTL_DEL must precede close): the idle loop stays idle."""
    pool = ledger.pool(0)
    h = BusyProbe(pool, case)
    st = ledger.server(serve(h))
    s = st.connect()
    dup_fd = -1
    try:
        cid = h.conn_id(s)
        conn = h.conns[cid]
        if case == "paused_peer_writes":
            s.sendall(b"w" * 65536)
            wait_for(lambda: call_in_loop(st.loop, lambda: conn.reading) is False)
        elif case == "output_drained":
            s.sendall(b"go")
            assert recv_exact(s, 4 << 20) == b"o" * (4 << 20)
            wait_for(lambda: h.write_completes >= 1, TIMEOUT)
            assert call_in_loop(st.loop, lambda: conn.output_bytes) == 0
        elif case == "oob":
            for part, oob in (
                (b"a", False),
                (b"x", True),
                (b"b", False),
                (b"y", True),
                (b"c", False),
            ):
                s.send(part, socket.MSG_OOB if oob else 0)
                time.sleep(0.005)
            got = bytearray()
            while b"c" not in got:
                chunk = s.recv(16)
                assert chunk
                got += chunk
            normal = bytes(ch for ch in got if ch in b"abc")
            assert normal == b"abc", got
        else:
            dup_fd = call_in_loop(st.loop, lambda: os.dup(conn.fileno))
            conn.force_close()
            h.wait_closed(cid)
            s.sendall(b"d" * 1000)  # readable on the dup'ed file description
        idle = iterations_while_idle(st)
        assert idle <= MAX_IDLE_ITERATIONS, "busy loop: %d iterations in 0.3 s" % idle
        if case == "paused_peer_writes":
            conn.start_reading()  # a paused connection sees the FIN only then
    finally:
        if dup_fd >= 0:
            os.close(dup_fd)
        s.close()
    h.assert_clean()
    h.forget()
