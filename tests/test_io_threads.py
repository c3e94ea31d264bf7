"""TcpServer(io_threads=N): the base loop accepts, N io loop threads serve the connections.

Every connection lives on one io loop for its whole life (``conn.loop``); every callback,
timer, write-complete and worker reply for it runs on that loop's thread; the release
hops back to the base loop; stop() and the base loop's close() join the io threads.
Real loopback sockets, real threads; each test ends with conftest's no-leak check.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections import Counter
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, recv_exact, recv_until_eof, rst_close, wait_for
from cppnp import (
    EventLoop,
    EventLoopThread,
    ICppnpUsr,
    IRun2,
    Task,
    TcpConnection,
    TcpServer,
    ThreadPool,
)

Serve = Callable[..., ServerThread]
TIMEOUT = 30.0


def io_thread_names() -> list[str]:
    return [t.name for t in threading.enumerate() if "-io" in t.name]


class Recorder(ICppnpUsr):
    """Echoes; records, for every callback, the calling thread and the connection's loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int, int, int]] = []  # (what, conn id, thread, loop thr)
        self.conns: dict[int, TcpConnection] = {}
        self.closed: Counter[int] = Counter()

    def note(self, what: str, conn: TcpConnection) -> None:
        with self.lock:
            self.calls.append((what, conn.id, threading.get_ident(), conn.loop.thread_id))

    def on_connection(self, conn: TcpConnection) -> None:
        self.note("on_connection", conn)
        with self.lock:
            self.conns[conn.id] = conn
        conn.set_high_water_mark(1)  # every queued byte fires on_high_water_mark

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        self.note("on_message", conn)
        assert conn.input_buffer is buf  # a loop-thread-only member: raises elsewhere
        data = buf.retrieve_all()
        conn.send(data)

    def on_write_complete(self, conn: TcpConnection) -> None:
        self.note("on_write_complete", conn)

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        self.note("on_high_water_mark", conn)

    def n_closed(self) -> int:
        with self.lock:  # the io threads update it: no iteration without the lock
            return sum(self.closed.values())

    def on_close(self, conn: TcpConnection) -> None:
        self.note("on_close", conn)
        with self.lock:
            self.closed[conn.id] += 1
            self.conns.pop(conn.id, None)


def test_connections_land_on_different_loop_threads(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec, io_threads=4)
    assert st.server is not None
    server = st.server
    io_loops = server.io_loops
    assert len(io_loops) == 4 and server.io_threads == 4
    io_ids = {lp.thread_id for lp in io_loops}
    assert len(io_ids) == 4 and st.loop.thread_id not in io_ids
    socks = [st.connect() for _ in range(8)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"%d" % i)
            assert recv_exact(s, 1) == b"%d" % i
        wait_for(lambda: len(rec.conns) == 8)
        with rec.lock:
            conns = list(rec.conns.values())
        # conn.loop is one of the io loops, never the base loop.
        assert {c.loop.thread_id for c in conns} == io_ids
        assert all(any(c.loop is lp for lp in io_loops) for c in conns)
        # Least connections: 8 open connections on 4 loops are 2 on each.
        assert server.stats()["connections_per_loop"] == [2, 2, 2, 2]
        assert server.stats()["connections"] == 8
        # The thread seen in on_connection is the connection's loop thread.
        with rec.lock:
            firsts = [c for c in rec.calls if c[0] == "on_connection"]
        assert len(firsts) == 8
        assert all(thr == loop_thr for _, _, thr, loop_thr in firsts)
        assert {thr for _, _, thr, _ in firsts} == io_ids
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: rec.n_closed() == 8)
    wait_for(lambda: st.connection_count() == 0)
    assert server.stats()["connections_per_loop"] == [0, 0, 0, 0]


def test_every_callback_runs_on_its_connections_loop_thread(serve: Serve) -> None:
    rec = Recorder()
    pool = ThreadPool(2, name="io-test-worker")
    pool.start()
    timer_calls: list[tuple[int, int]] = []
    st = serve(rec, io_threads=2)
    try:
        socks = [st.connect() for _ in range(4)]
        for i, s in enumerate(socks):
            s.sendall(b"hello %d" % i)
            assert recv_exact(s, 7) == b"hello %d" % i
        wait_for(lambda: len(rec.conns) == 4)
        with rec.lock:
            conns = list(rec.conns.values())
        for conn in conns:
            # A timer on the connection's loop, added from this thread.
            conn.loop.run_after(
                0, lambda c=conn: timer_calls.append((threading.get_ident(), c.loop.thread_id))
            )
            # A worker's reply: sent from a pool thread, written by the connection's loop.
            pool.add_task(lambda c=conn: c.send(b"w"), key=conn)
        for s in socks:
            assert recv_exact(s, 1) == b"w"
        # 16 MiB from a worker to a client that is not reading yet: the kernel cannot take
        # it all, so output is queued and on_high_water_mark (mark: 1 byte) fires.
        big = bytes(range(256)) * (1 << 16)
        pool.add_task(lambda c=conns[0]: c.send(big), key=conns[0])
        wait_for(lambda: conns[0].output_bytes > 0)
        client = {s.getsockname(): s for s in socks}[conns[0].peer_address]
        assert recv_exact(client, len(big)) == big
        wait_for(lambda: len(timer_calls) == 4)
        assert all(a == b for a, b in timer_calls)
        for s in socks[:2]:
            s.close()
        for s in socks[2:]:
            rst_close(s)
        wait_for(lambda: rec.n_closed() == 4)
    finally:
        pool.stop()
    with rec.lock:
        calls = list(rec.calls)
    kinds = Counter(c[0] for c in calls)
    for kind in ("on_connection", "on_message", "on_write_complete", "on_close"):
        assert kinds[kind] >= 4, kinds
    assert kinds["on_high_water_mark"] >= 1, kinds  # the worker's reply is queued first
    wrong = [c for c in calls if c[2] != c[3]]
    assert wrong == []
    # One loop for the whole life: every callback of a connection saw the same thread.
    by_conn: dict[int, set[int]] = {}
    for _, cid, thr, _ in calls:
        by_conn.setdefault(cid, set()).add(thr)
    assert all(len(v) == 1 for v in by_conn.values())
    assert st.loop.thread_id not in {thr for _, _, thr, _ in calls}
    with rec.lock:
        assert rec.closed == Counter({cid: 1 for cid in by_conn})


class OrderedEcho(ICppnpUsr, IRun2):
    """Each 8-byte request becomes Task(self, req, conn) on a pool of 4 (keyed by the
    connection by default); the task replies with the request: order per connection must
    hold although the tasks of different connections run in parallel."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.threads: set[int] = set()

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        with self.lock:
            self.threads.add(threading.get_ident())
        while len(buf) >= 8:
            self.pool.add_task(Task(self, buf.retrieve_as_bytes(8), conn))

    def run2(self, req: bytes, conn: Any) -> None:
        if random.random() < 0.05:
            threading.Event().wait(0.0005)
        conn.send(req)


def test_per_connection_order_with_a_pool(serve: Serve) -> None:
    pool = ThreadPool(4, name="io-order-worker")
    pool.start()
    h = OrderedEcho(pool)
    try:
        st = serve(h, io_threads=2)
        n_conns, n_msgs = 8, 400
        socks = [st.connect() for _ in range(n_conns)]
        errors: list[BaseException] = []

        def client(k: int, s: socket.socket) -> None:
            try:
                payload = b"".join(struct.pack("!II", k, i) for i in range(n_msgs))
                for off in range(0, len(payload), 96):  # split anywhere
                    s.sendall(payload[off : off + 96])
                got = recv_exact(s, len(payload))
                assert got == payload, "connection %d: replies out of order" % k
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=client, args=(k, s)) for k, s in enumerate(socks)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in ts)
        assert errors == []
        with h.lock:
            assert h.threads == {lp.thread_id for lp in st.server.io_loops}  # type: ignore[union-attr]
        for s in socks:
            s.close()
        wait_for(lambda: st.connection_count() == 0)
    finally:
        pool.stop()
    assert pool.stats()["failed"] == 0


class Churn(ICppnpUsr, IRun2):
    """Echo through a pool; counts callbacks per connection and per loop thread."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.opened: Counter[int] = Counter()
        self.closed: Counter[int] = Counter()
        self.loops: Counter[int] = Counter()
        self.wrong_thread = 0

    def n_closed(self) -> int:
        with self.lock:
            return sum(self.closed.values())

    def on_connection(self, conn: TcpConnection) -> None:
        with self.lock:
            self.opened[conn.id] += 1
            self.loops[conn.loop.thread_id] += 1
            self.wrong_thread += threading.get_ident() != conn.loop.thread_id

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        data = buf.retrieve_all()
        if len(data) % 2:
            conn.send(data)  # on the loop thread
        else:
            self.pool.add_task(Task(self, data, conn))

    def run2(self, data: bytes, conn: Any) -> None:
        conn.send(data)

    def on_close(self, conn: TcpConnection) -> None:
        with self.lock:
            self.closed[conn.id] += 1
            self.wrong_thread += threading.get_ident() != conn.loop.thread_id


def test_thousand_connections_random_half_close_and_reset_on_four_loops(serve: Serve) -> None:
    rng = random.Random(20261202)
    pool = ThreadPool(2, name="io-churn-worker")
    pool.start()
    h = Churn(pool)
    total, batch = 1000, 100
    outcomes: Counter[str] = Counter()
    try:
        st = serve(h, io_threads=4)
        assert st.server is not None
        for first in range(0, total, batch):
            socks = [st.connect() for _ in range(batch)]
            msgs = [b"m%d" % (first + i) * rng.randint(1, 3) for i in range(batch)]
            for s, m in zip(socks, msgs):
                s.sendall(m)
            for s, m in zip(socks, msgs):
                how = rng.choice(["half", "reset", "close", "reset_early"])
                outcomes[how] += 1
                if how == "reset_early":
                    rst_close(s)  # maybe before the reply: must be survived
                    continue
                assert recv_exact(s, len(m)) == m
                if how == "half":
                    s.sendall(m)
                    s.shutdown(socket.SHUT_WR)  # the reply still comes, then the EOF
                    assert recv_until_eof(s) == m
                    s.close()
                elif how == "reset":
                    rst_close(s)
                else:
                    s.close()
        wait_for(lambda: h.n_closed() == total, timeout=TIMEOUT)
        wait_for(lambda: st.connection_count() == 0)
        assert st.server.stats()["connections_per_loop"] == [0, 0, 0, 0]
        assert st.server.accepted == total
    finally:
        pool.stop()
    assert all(v >= 1 for v in outcomes.values()) and len(outcomes) == 4
    with h.lock:
        assert len(h.opened) == total and set(h.opened.values()) == {1}
        assert h.closed == h.opened  # on_close once per connection
        assert h.wrong_thread == 0
        # Least connections with a round-robin tie-break: every loop served a share.
        assert len(h.loops) == 4 and min(h.loops.values()) >= total // 8
    assert st.loop.callback_errors == 0
    assert all(lp.callback_errors == 0 for lp in st.server.io_loops)


def test_stop_joins_the_io_threads_after_the_last_connection(serve: Serve) -> None:
    gate = threading.Event()
    pool = ThreadPool(1, name="io-stop-worker")
    pool.start()
    rec = Recorder()

    class Blocked(Recorder, IRun2):
        def on_message(self, conn: TcpConnection, buf: Any) -> None:
            pool.add_task(Task(self, buf.retrieve_all(), conn))

        def run2(self, data: bytes, conn: Any) -> None:
            gate.wait(TIMEOUT)
            conn.send(data)

    rec = Blocked()
    try:
        st = serve(rec, io_threads=2, name="stopping")
        server = st.server
        assert server is not None
        loops = server.io_loops
        assert len(io_thread_names()) == 2
        socks = [st.connect() for _ in range(4)]
        socks[0].sendall(b"x")  # a task in flight, blocked on the gate
        wait_for(lambda: len(rec.conns) == 4)
        wait_for(lambda: pool.stats()["running"] == 1)
        server.stop()
        # Three connections are force-closed at once; the fourth waits for its task.
        wait_for(lambda: rec.n_closed() == 3)
        # on_close runs before the io loop releases the connection from the table.
        wait_for(lambda: server.connection_count == 1)
        assert len(io_thread_names()) == 2 and not any(lp.closed for lp in loops)
        gate.set()
        wait_for(lambda: rec.n_closed() == 4)
        # Once the last one is released the io threads are quit, joined and closed.
        wait_for(lambda: io_thread_names() == [])
        assert all(lp.closed for lp in loops)
        assert server.io_loops == [] and server.connection_count == 0
        assert not server.accepting
        for s in socks:
            assert recv_until_eof(s) == b""  # force-closed: the reply was dropped
            s.close()
    finally:
        gate.set()
        pool.stop()


def test_base_loop_close_releases_connections_and_joins_io_threads() -> None:
    rec = Recorder()
    box: dict[str, TcpServer] = {}

    def init(loop: EventLoop) -> None:
        box["s"] = TcpServer(loop, ("127.0.0.1", 0), rec, io_threads=3)
        box["s"].start()

    lt = EventLoopThread(init, name="io-base")
    lt.start()
    server = box["s"]
    loops = server.io_loops
    socks = [socket.create_connection(server.address, timeout=TIMEOUT) for _ in range(6)]
    try:
        for s in socks:
            s.sendall(b"p")
            assert recv_exact(s, 1) == b"p"
        wait_for(lambda: len(rec.conns) == 6)
        with rec.lock:
            conns = list(rec.conns.values())
        # Close the base loop without stop(): the io loops close too (in their threads),
        # and the connections are released without callbacks (as EventLoop.close() does).
        lt.stop()
        assert io_thread_names() == []
        assert all(lp.closed for lp in loops)
        assert all(c.closed for c in conns)
        assert rec.n_closed() == 0
        for s in socks:
            assert recv_until_eof(s) == b""
    finally:
        for s in socks:
            s.close()
        del conns


def test_connections_accepted_while_stopping_are_released(serve: Serve) -> None:
    # stop() racing accepts: a connection whose start() is still queued to its io loop
    # when the server force-closes its table is closed right after it starts.
    for round_ in range(20):
        rec = Recorder()
        st = serve(rec, io_threads=2, name="race%d" % round_)
        server = st.server
        assert server is not None
        socks = [socket.create_connection(st.address, timeout=TIMEOUT) for _ in range(10)]
        call_in_loop(st.loop, server.stop)
        wait_for(lambda: io_thread_names() == [])
        assert server.connection_count == 0 and server.io_loops == []
        with rec.lock:
            opened = Counter(c[1] for c in rec.calls if c[0] == "on_connection")
            assert rec.closed == opened  # every connection shown to the user was closed
        for s in socks:
            assert recv_until_eof(s) == b""
            s.close()
        st.stop()


def test_stop_accepting_keeps_the_io_loops_until_the_last_connection(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec, io_threads=2)
    server = st.server
    assert server is not None
    s1, s2 = st.connect(), st.connect()
    wait_for(lambda: len(rec.conns) == 2)
    server.stop_accepting()
    wait_for(lambda: not server.accepting)
    for s in (s1, s2):  # open connections carry on, on their io loops
        s.sendall(b"still")
        assert recv_exact(s, 5) == b"still"
    s1.close()
    wait_for(lambda: server.connection_count == 1)
    assert len(io_thread_names()) == 2
    s2.close()
    wait_for(lambda: io_thread_names() == [])
    assert server.io_loops == []


def test_io_threads_zero_serves_on_the_base_loop(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec, io_threads=0)
    assert st.server is not None
    with st.connect() as s:
        s.sendall(b"z")
        assert recv_exact(s, 1) == b"z"
        wait_for(lambda: len(rec.conns) == 1)
        with rec.lock:
            conn = next(iter(rec.conns.values()))
        assert conn.loop is st.loop
        assert st.server.io_loops == [] and io_thread_names() == []
        assert st.server.stats()["connections_per_loop"] == [1]
    wait_for(lambda: rec.n_closed() == 1)


@pytest.mark.parametrize(
    "value, exc",
    [
        ("2", TypeError),
        (2.0, TypeError),
        (True, TypeError),
        (None, TypeError),
        (-1, ValueError),
        (1025, ValueError),
    ],
)
def test_io_threads_validation(value: Any, exc: type[Exception]) -> None:
    with EventLoop() as lp, pytest.raises(exc, match="io_threads"):
        TcpServer(lp, ("127.0.0.1", 0), ICppnpUsr(), io_threads=value)
    assert io_thread_names() == []


def test_start_failure_starts_no_io_thread(serve: Serve) -> None:
    st = serve(ICppnpUsr())
    with EventLoop() as lp:
        clash = TcpServer(lp, st.address, ICppnpUsr(), io_threads=2)
        with pytest.raises(OSError):
            clash.start()  # the port is taken: the bind fails before any thread starts
        assert clash.io_loops == [] and io_thread_names() == []
