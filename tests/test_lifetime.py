"""Connection lifetime with a ThreadPool (the seed's _theothersideisclosed + _pacCount).

Each case is repeated with randomised timing in single-thread mode (ThreadPool(0)) and
pool mode, and ends with nothing left behind: no connection in the server, no task or
counter in the pool or on a connection, no live TcpConnection object, no fd.

The server protocol: fixed 16-byte frames ``<mode><d><d><cid:5>:<seq:6>\\n``.  Each
frame becomes ``Task(handler, frame, conn)``; the task optionally waits (mode), sleeps
``dd`` tenths of a millisecond, then replies ``r`` + frame[1:].  Modes:
``q`` just sleep; ``w`` wait until the server saw the peer's FIN (conn.peer_closed);
``x`` wait until the socket is gone (not conn.connected); ``g`` wait on handler.gate;
``h`` hand the connection to a thread of our own that replies once handler.gate is set.
"""

from __future__ import annotations

import gc
import logging
import random
import socket
import threading
import time
import weakref
from collections import Counter
from typing import Any

import pytest

import cppnp
from conftest import assert_all_dead, call_in_loop, recv_exact, recv_to_eof, rst_close, wait_for
from cppnp import ICppnpUsr, IRun2, Task, ThreadPool

TIMEOUT = 20.0
FRAME = 16
SEED = 20240611


@pytest.fixture(params=[0, 4], ids=["single", "pool4"])
def pool(request: pytest.FixtureRequest) -> Any:
    p = ThreadPool(int(request.param), name="lt-worker")
    p.start()
    yield p
    assert p.stop(drain=False, timeout=TIMEOUT)


def frame(mode: bytes, tenths_ms: int, cid: int, seq: int) -> bytes:
    f = b"%s%02d%05d:%06d\n" % (mode, tenths_ms, cid, seq)
    assert len(f) == FRAME
    return f


def reply_of(f: bytes) -> bytes:
    return b"r" + f[1:]


def wait_in_worker(pred: Any) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


class LifetimeHandler(ICppnpUsr, IRun2):
    """Frames -> pool tasks -> replies; records every lifetime event by connection id."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.single = pool.num_threads == 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.opened: dict[int, tuple[int, int]] = {}  # id -> (peer port, fd)
        self.by_port: dict[int, int] = {}  # peer port -> id
        self.refs: dict[int, weakref.ref[Any]] = {}
        self.messages: Counter[int] = Counter()
        self.added: Counter[int] = Counter()
        self.ended: Counter[int] = Counter()
        self.reply_bytes: Counter[int] = Counter()
        self.saw_peer_closed: Counter[int] = Counter()  # tasks that ran after FIN
        self.closes: Counter[int] = Counter()
        self.close_info: dict[int, dict[str, Any]] = {}
        self.errors: list[str] = []
        self.holders: list[threading.Thread] = []
        self.held: list[Any] = []
        self.late_drops = 0  # counted after on_close

    # -- loop thread --
    def on_connection(self, conn: Any) -> None:
        with self.lock:
            self.opened[conn.id] = (conn.peer_address[1], conn.fileno)
            self.by_port[conn.peer_address[1]] = conn.id
            self.refs[conn.id] = weakref.ref(conn)

    def on_message(self, conn: Any, buf: Any) -> None:
        self.messages[conn.id] += 1
        while len(buf) >= FRAME:
            f = buf.retrieve_as_bytes(FRAME)
            with self.lock:
                self.added[conn.id] += 1
            # run_if_closed: these cases follow every task to its end, including work
            # that runs after its connection was reset (its replies are dropped and
            # counted); discarding such work instead is covered by test_defects_pool.py.
            self.pool.add_task(Task(self, f, conn), run_if_closed=True)

    def on_close(self, conn: Any) -> None:
        with self.lock:
            # close_info first: wait_closed() polls closes without the lock, then reads
            # close_info (with the GIL off it could see the count before the entry).
            self.close_info[conn.id] = {
                "pending": conn.pending_tasks,
                "all_ended": self.ended[conn.id] == self.added[conn.id],
                "dropped_sends": conn.dropped_sends,
                "dropped_bytes": conn.dropped_bytes,
                "bytes_sent": conn.bytes_sent,
                "reply_bytes": self.reply_bytes[conn.id],
                "closed_flag": conn.closed,
                "thread": threading.get_ident(),
            }
            self.closes[conn.id] += 1

    # -- worker (or the loop thread in single-thread mode) --
    def run2(self, f: bytes, conn: Any) -> None:
        mode = f[:1]
        if mode == b"w" and not wait_in_worker(lambda: conn.peer_closed):
            self.errors.append("peer_closed never seen")
        elif mode == b"x" and not wait_in_worker(lambda: not conn.connected):
            self.errors.append("socket close never seen")
        elif mode == b"g" and not self.gate.wait(TIMEOUT):
            self.errors.append("gate never opened")
        elif mode == b"h":
            gate = self.gate
            self.held.append(conn)

            def late() -> None:
                gate.wait(TIMEOUT)
                conn.send(reply_of(f))

            t = threading.Thread(target=late, name="late-replier")
            self.holders.append(t)
            t.start()
            with self.lock:
                self.ended[conn.id] += 1
            return
        tenths = int(f[1:3])
        if tenths:
            time.sleep(tenths / 10000.0)
        if conn.peer_closed:
            with self.lock:
                self.saw_peer_closed[conn.id] += 1
        conn.send(reply_of(f))
        with self.lock:
            self.reply_bytes[conn.id] += FRAME
            self.ended[conn.id] += 1

    # -- test side --
    def conn_id(self, sock: socket.socket) -> int:
        port = sock.getsockname()[1]
        return int(wait_for(lambda: self.by_port.get(port), TIMEOUT))

    def wait_closed(self, cid: int) -> dict[str, Any]:
        # close_info is written after closes in on_close: waiting on closes and then
        # reading close_info raced with on_close on a free-threaded build (KeyError).
        wait_for(lambda: cid in self.close_info, TIMEOUT)
        return self.close_info[cid]


def send_chunked(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    """Send in random pieces so the server sees partial and merged frames."""
    i = 0
    while i < len(data):
        n = rng.randint(1, 2 * FRAME + 3)
        sock.sendall(data[i : i + n])
        i += n


# Iterations per mode: the two modes together run 120 per case.
ITERATIONS = 60


def assert_clean(
    st: Any,
    pool: ThreadPool,
    h: LifetimeHandler,
    live_before: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing left behind: connections, tasks, counters, objects, errors."""
    wait_for(lambda: st.connection_count() == 0, TIMEOUT)
    wait_for(lambda: pool.queued == 0 and pool.running == 0, TIMEOUT)
    wait_for(lambda: call_in_loop(st.loop, lambda: st.loop.pending_functors) == 0, TIMEOUT)
    assert h.errors == []
    assert pool.failed == 0
    assert set(h.closes) == set(h.opened), "a connection was never released"
    assert set(h.closes.values()) <= {1}, "on_close ran more than once: %r" % h.closes
    for cid, info in h.close_info.items():
        assert info["pending"] == 0, (cid, info)
        assert info["all_ended"], ("on_close before the last task finished", cid)
        assert info["closed_flag"], cid
        assert info["thread"] in st.serving_thread_ids
        # Every reply was handed to the kernel or dropped and counted, byte for byte.
        assert info["bytes_sent"] + info["dropped_bytes"] == info["reply_bytes"], (cid, info)
    stats = st.stats()
    assert stats["callback_errors"] == 0
    assert stats["dropped_sends"] == h.late_drops + sum(
        i["dropped_sends"] for i in h.close_info.values()
    )
    h.held.clear()
    assert_all_dead(h.refs)
    assert cppnp.live_connections() == live_before
    errors = [
        r for r in caplog.records if r.name.startswith("cppnp") and r.levelno >= logging.ERROR
    ]
    assert errors == [], [r.getMessage() for r in errors]


def start_server(serve: Any, h: LifetimeHandler, caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.ERROR, logger="cppnp")
    return serve(h)


@pytest.fixture
def setup(serve: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture) -> Any:
    h = LifetimeHandler(pool)
    st = start_server(serve, h, caplog)
    yield st, h
    h.gate.set()
    for t in h.holders:
        t.join(TIMEOUT)
    h.held.clear()


def baseline_live() -> int:
    gc.collect()
    return int(cppnp.live_connections())


# -- case 1: the peer closes before anything was read ------------------------------------


def test_peer_closes_before_anything_was_read(
    setup: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture
) -> None:
    st, h = setup
    live = baseline_live()
    rng = random.Random(SEED + 1 + pool.num_threads)
    for _ in range(ITERATIONS):
        s = st.connect()
        how = rng.choice(["close", "shutdown", "accepted-then-close", "accepted-then-reset"])
        if how.startswith("accepted"):
            cid = h.conn_id(s)  # accepted and registered first
            if how.endswith("reset"):
                rst_close(s)
            else:
                s.close()
        else:  # maybe before the accept
            cid_port = s.getsockname()[1]
            if how == "close":
                s.close()
            else:
                s.shutdown(socket.SHUT_WR)
                assert recv_to_eof(s) == b""  # the server closes at once
                s.close()
            cid = int(wait_for(lambda p=cid_port: h.by_port.get(p), TIMEOUT))
        info = h.wait_closed(cid)  # released with nothing else to do
        assert info["pending"] == 0 and info["bytes_sent"] == 0
        assert h.messages[cid] == 0 and h.added[cid] == 0
    assert len(h.opened) == ITERATIONS
    assert_clean(st, pool, h, live, caplog)


# -- case 2: the peer half-closes while n tasks for it are in the pool --------------------


def test_half_close_with_tasks_in_flight_gets_every_reply(
    setup: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture
) -> None:
    st, h = setup
    live = baseline_live()
    rng = random.Random(SEED + 2 + pool.num_threads)
    in_flight_cases = 0
    for it in range(ITERATIONS):
        s = st.connect()
        n = rng.randint(1, 8)
        # Pool mode: half of the time the first task waits until the server has seen
        # the FIN, so the half-close certainly lands while all n tasks are in flight.
        hold = not h.single and rng.random() < 0.5
        frames = [
            frame(
                b"w" if hold and i == 0 else b"q",
                rng.choice([0, 0, 1, 5, 20]) if not h.single else rng.choice([0, 1]),
                it,
                i,
            )
            for i in range(n)
        ]
        send_chunked(s, b"".join(frames), rng)
        s.shutdown(socket.SHUT_WR)
        got = recv_to_eof(s)  # every reply, in order, then EOF
        s.close()
        assert got == b"".join(reply_of(f) for f in frames), (it, n)
        in_flight_cases += hold
    wait_for(lambda: len(h.closes) == ITERATIONS, TIMEOUT)
    for info in h.close_info.values():
        assert info["dropped_sends"] == 0
    if not h.single:
        assert in_flight_cases > 0
        assert sum(1 for v in h.saw_peer_closed.values() if v) >= in_flight_cases
    assert_clean(st, pool, h, live, caplog)


class TriggerHandler(LifetimeHandler):
    """A LifetimeHandler where one connection's data ("the trigger") blocks the loop
    thread until the task of another connection has replied and finished."""

    def __init__(self, pool: ThreadPool) -> None:
        super().__init__(pool)
        self.trigger_id = -1
        self.completed_target = 0  # pool.completed once it ended

    def on_message(self, conn: Any, buf: Any) -> None:
        if conn.id != self.trigger_id:
            super().on_message(conn, buf)
            return
        buf.retrieve_all()
        self.gate.set()  # the watched task replies and
        # finishes (the pool counts it completed and, in the same GIL-held step, tells
        # the connection) while the loop thread is still in this callback.
        wait_in_worker(lambda: self.pool.completed >= self.completed_target)


@pytest.mark.parametrize("pool", [4], ids=["pool4"], indirect=True)
def test_half_close_reply_not_lost_when_task_finishes_during_the_eof_pass(
    serve: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The release of a half-closed connection must not overtake a reply its last task
    queued before finishing.

    A's task is held; the loop is parked while A half-closes and B sends a trigger, so
    one poll returns [A: EOF, B: data].  A's EOF queues the release check; B's
    on_message lets A's task reply and finish before the loop reaches its functors.
    A must still get its reply before EOF (if epoll reports B first, the race is not
    provoked and the test passes trivially).  Pool mode only: it needs a task in flight
    on a worker while the loop thread runs."""
    h = TriggerHandler(pool)
    st = start_server(serve, h, caplog)
    live = baseline_live()
    for it in range(3):
        h.gate = threading.Event()
        a = st.connect()
        b = st.connect()
        a_id, b_id = h.conn_id(a), h.conn_id(b)
        f = frame(b"g", 0, 1, it)
        a.sendall(f)
        wait_for(lambda a_id=a_id: h.added[a_id] == 1, TIMEOUT)
        h.completed_target = pool.completed + 1
        h.trigger_id = b_id
        parked, release = threading.Event(), threading.Event()

        def park(parked: threading.Event = parked, release: threading.Event = release) -> None:
            parked.set()
            release.wait(TIMEOUT)

        st.loop.queue_in_loop(park)
        assert parked.wait(TIMEOUT)
        a.shutdown(socket.SHUT_WR)
        b.sendall(b"trigger")
        time.sleep(0.05)  # let both reach the server socket
        release.set()
        got = recv_to_eof(a)
        a.close()
        b.close()
        assert got == reply_of(f), "round %d: a half-closed peer lost its reply" % it
        assert h.wait_closed(a_id)["dropped_sends"] == 0
        h.wait_closed(b_id)
    assert_clean(st, pool, h, live, caplog)


class RelayHandler(LifetimeHandler):
    """Data on the relay connection is forwarded to the target connection through the
    pool (a chat-style broadcast): Task(self, frame, target)."""

    def __init__(self, pool: ThreadPool) -> None:
        super().__init__(pool)
        self.relay_id = -1
        self.target: Any = None  # weakref to the target conn
        self.busy = threading.Event()  # holds the one worker awake
        self.target_state: list[tuple[bool, bool]] = []

    def on_message(self, conn: Any, buf: Any) -> None:
        if conn.id != self.relay_id:
            super().on_message(conn, buf)
            return
        buf.retrieve_all()
        target = self.target()
        if target is None:  # released and gone already
            self.target_state.append((False, True))
            self.busy.set()
            return
        self.target_state.append((target.connected, target.closed))
        done = self.pool.completed + 2
        with self.lock:
            self.added[target.id] += 1
        self.pool.add_task(Task(self, frame(b"q", 0, 9, 9), target))
        self.busy.set()  # the awake worker runs it next
        wait_in_worker(lambda: self.pool.completed >= done)


@pytest.mark.single_loop
@pytest.mark.parametrize("pool", [1], ids=["pool1"], indirect=True)
def test_half_closed_peer_gets_replies_of_a_task_added_before_its_release(
    serve: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture
) -> None:
    """A task added for a half-closed connection that is not released yet (still
    ``connected``, not ``closed``) is counted on it, so its reply must be written before
    the connection is released -- also when the task is added and finishes between
    the loop's first and second look at the finished connection.

    Pass k: A's EOF queues the release check, a timer makes B's data arrive; pass k+1:
    B's on_message hands a reply for A to the (already awake) worker, which sends and
    finishes before the loop reaches its functors."""
    h = RelayHandler(pool)
    st = start_server(serve, h, caplog)
    live = baseline_live()
    for it in range(3):
        h.busy = threading.Event()
        a = st.connect()
        b = st.connect()
        a_id, b_id = h.conn_id(a), h.conn_id(b)
        h.target = h.refs[a_id]
        h.relay_id = b_id
        pool.add_task(h.busy.wait, TIMEOUT)  # the worker stays awake: no wakeup
        wait_for(lambda: pool.running == 1, TIMEOUT)
        parked, release = threading.Event(), threading.Event()

        def park(
            parked: threading.Event = parked,
            release: threading.Event = release,
            b: socket.socket = b,
        ) -> None:
            parked.set()
            release.wait(TIMEOUT)
            # Fires after the I/O of the next pass (the one that reads A's EOF).
            st.loop.run_after(0, lambda: b.sendall(b"relay"))

        st.loop.queue_in_loop(park)
        assert parked.wait(TIMEOUT)
        a.shutdown(socket.SHUT_WR)
        time.sleep(0.05)  # let the FIN reach the server
        release.set()
        got = recv_to_eof(a)
        a.close()
        b.close()
        h.wait_closed(a_id)
        h.wait_closed(b_id)
        connected, closed = h.target_state[-1]
        if connected and not closed:  # the task was added in time
            assert got == reply_of(frame(b"q", 0, 9, 9)), (
                "round %d: reply of a task added before the release was dropped" % it
            )
    assert_clean(st, pool, h, live, caplog)


# -- case 3: the peer closes after everything was answered --------------------------------


def test_peer_closes_after_everything_was_answered(
    setup: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture
) -> None:
    st, h = setup
    live = baseline_live()
    rng = random.Random(SEED + 3 + pool.num_threads)
    for it in range(ITERATIONS):
        s = st.connect()
        n = rng.randint(1, 6)
        frames = [frame(b"q", rng.choice([0, 1, 5]), it, i) for i in range(n)]
        send_chunked(s, b"".join(frames), rng)
        assert recv_exact(s, n * FRAME) == b"".join(reply_of(f) for f in frames)
        cid = h.conn_id(s)
        how = rng.choice(["close", "shutdown", "reset"])
        if how == "shutdown":
            s.shutdown(socket.SHUT_WR)
            assert recv_to_eof(s) == b""
            s.close()
        elif how == "reset":
            rst_close(s)
        else:
            s.close()
        info = h.wait_closed(cid)
        assert info["dropped_sends"] == 0
        assert info["bytes_sent"] == n * FRAME
    assert_clean(st, pool, h, live, caplog)


# -- case 4: the peer resets or closes while tasks are in flight -------------------------


def test_peer_resets_or_closes_with_tasks_in_flight(
    setup: Any, pool: ThreadPool, caplog: pytest.LogCaptureFixture
) -> None:
    st, h = setup
    live = baseline_live()
    rng = random.Random(SEED + 4 + pool.num_threads)
    held_resets = 0
    for it in range(ITERATIONS):
        s = st.connect()
        cid = h.conn_id(s)
        n = rng.randint(1, 8)
        how = rng.choice(["reset", "close"])
        # Pool mode, half of the time: every task waits until the server noticed the
        # disconnect (reset: socket gone; close: FIN seen), so all replies are late.
        hold = not h.single and rng.random() < 0.5
        mode = (b"x" if how == "reset" else b"w") if hold else b"q"
        frames = [
            frame(mode, rng.choice([0, 2, 10]) if not h.single else 0, it, i) for i in range(n)
        ]
        s.sendall(b"".join(frames))
        if hold:
            wait_for(lambda c=cid, n=n: h.added[c] == n, TIMEOUT)
            conn = h.refs[cid]()
            assert conn is not None
            # All n held in flight (on_message counts a frame just before add_task does).
            wait_for(lambda c=conn, n=n: c.pending_tasks == n, TIMEOUT)
            del conn
        if how == "reset":
            rst_close(s)
        else:
            s.close()
        info = h.wait_closed(cid)
        assert info["all_ended"]  # released after the last task
        if hold:
            assert h.ended[cid] == n
        if hold and how == "reset":
            held_resets += 1
            assert info["dropped_sends"] == n  # every late reply dropped, counted
            assert info["dropped_bytes"] == n * FRAME
            assert info["bytes_sent"] == 0
    if not h.single:
        assert held_resets > 0
    assert_clean(st, pool, h, live, caplog)


# -- a late reply never reaches a newer connection on the same fd number -----------------


# A task blocked in single-thread mode would block the loop thread: there the late
# reply comes from a thread of our own holding a reference to the connection.
@pytest.mark.parametrize(
    "pool,late",
    [(4, "pool-task"), (4, "held-reference"), (0, "held-reference")],
    ids=["pool4-pool-task", "pool4-held-reference", "single-held-reference"],
    indirect=["pool"],
)
def test_late_reply_never_reaches_a_connection_reusing_the_fd(
    setup: Any, pool: ThreadPool, late: str, caplog: pytest.LogCaptureFixture
) -> None:
    st, h = setup
    live = baseline_live()
    rounds = 12
    reused = 0
    for it in range(rounds):
        h.gate = threading.Event()
        a = st.connect()
        a_id = h.conn_id(a)
        a.sendall(frame(b"g" if late == "pool-task" else b"h", 0, 1, it))
        wait_for(lambda a_id=a_id: h.added[a_id] == 1, TIMEOUT)
        a_fd = h.opened[a_id][1]
        rst_close(a)
        if late == "pool-task":
            ref = h.refs[a_id]
            wait_for(lambda ref=ref: ref() is None or ref().fileno == -1, TIMEOUT)
        else:
            h.wait_closed(a_id)
        b = st.connect()
        b_id = h.conn_id(b)
        reused += h.opened[b_id][1] == a_fd
        h.gate.set()  # A's late reply goes now
        info = h.wait_closed(a_id)
        if late == "held-reference":
            for t in h.holders:
                t.join(TIMEOUT)
            call_in_loop(h.held[-1].loop, lambda: None)  # the queued send has been handled
            conn_a = h.held.pop()
            assert conn_a.id == a_id and conn_a.dropped_sends == 1
            h.late_drops += 1
            del conn_a
        else:
            assert info["dropped_sends"] == 1
        # B's own exchange: exactly its reply, nothing of A's before or after it.
        fb = frame(b"q", 0, 2, it)
        b.sendall(fb)
        b.shutdown(socket.SHUT_WR)
        assert recv_to_eof(b) == reply_of(fb)
        b.close()
        h.wait_closed(b_id)
    assert reused > 0, "the scenario never happened: B never got A's fd number"
    assert_clean(st, pool, h, live, caplog)
