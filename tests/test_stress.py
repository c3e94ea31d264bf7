"""Stress and shutdown: thousands of framed messages over dozens of connections with
random disconnects (half-close, close, reset) while their tasks are in flight, in pool
mode and single-thread mode; ThreadPool.stop() with tasks queued; the loop quitting
while workers still send.

Frames are length-prefixed (4-byte big-endian length + payload); each payload embeds
the connection number and sequence number and a filler derived from both, so every
reply can be checked byte for byte and a reply on the wrong connection cannot pass.
"""

from __future__ import annotations

import gc
import logging
import random
import socket
import struct
import threading
import time
import weakref
from collections import Counter
from typing import Any

import pytest

import cppnp
from conftest import (
    assert_all_dead,
    call_in_loop,
    cppnp_errors,
    recv_exact,
    recv_to_eof,
    rst_close,
    wait_for,
)
from cppnp import ICppnpUsr, IRun2, Task, ThreadPool

TIMEOUT = 30.0
CLIENT_THREADS = 20  # concurrent clients ...
CONNS_PER_THREAD = 3  # ... each opening this many connections in turn
CONNS = CLIENT_THREADS * CONNS_PER_THREAD
# Client threads share one Counter: `counter[k] += 1` is not atomic without the GIL.
OUTCOME_LOCK = threading.Lock()


def make_frame(cid: int, seq: int, size: int) -> bytes:
    head = b"%05d:%06d:" % (cid, seq)
    filler = bytes((cid * 31 + seq * 7 + k) % 251 for k in range(size))
    payload = head + filler
    return struct.pack("!I", len(payload)) + payload


@pytest.fixture
def new_pool(make_pool: Any) -> Any:
    """new_pool(n, name) -> conftest's make_pool(n, name=name)."""
    return lambda n, name: make_pool(n, name=name)


class FramedEcho(ICppnpUsr, IRun2):
    """Parses complete frames out of the input buffer and hands each one to the pool
    as Task(self, frame, conn); the task echoes the frame."""

    def __init__(self, pool: ThreadPool, seed: int, pause_probability: float) -> None:
        self.pool = pool
        self.rng = random.Random(seed)
        self.pause_probability = pause_probability
        self.lock = threading.Lock()
        self.refs: dict[int, Any] = {}
        self.opened: Counter[int] = Counter()
        self.added: Counter[int] = Counter()
        self.ended: Counter[int] = Counter()
        self.reply_bytes: Counter[int] = Counter()
        self.closes: Counter[int] = Counter()
        self.close_info: dict[int, dict[str, Any]] = {}
        self.on_message_calls = 0

    def on_connection(self, conn: Any) -> None:
        with self.lock:
            self.opened[conn.id] += 1
            self.refs[conn.id] = weakref.ref(conn)

    def total_added(self) -> int:
        """Tasks added so far, over all connections (read under the lock: the loop
        thread adds while the test thread reads)."""
        with self.lock:
            return sum(self.added.values())

    def on_message(self, conn: Any, buf: Any) -> None:
        with self.lock:
            self.on_message_calls += 1
        while len(buf) >= 4:
            n = buf.peek_int32()
            if len(buf) < 4 + n:
                break  # a partial frame: wait for more
            frame = buf.retrieve_as_bytes(4 + n)
            with self.lock:
                self.added[conn.id] += 1
            self.pool.add_task(Task(self, frame, conn))

    def run2(self, frame: bytes, conn: Any) -> None:
        with self.lock:
            pause = self.rng.random() < self.pause_probability
            delay = self.rng.choice([0.0, 0.0002, 0.001])
        if pause:
            time.sleep(delay)
        conn.send(frame)
        with self.lock:
            self.reply_bytes[conn.id] += len(frame)
            self.ended[conn.id] += 1

    def on_close(self, conn: Any) -> None:
        with self.lock:
            self.closes[conn.id] += 1
            self.close_info[conn.id] = {
                "pending": conn.pending_tasks,
                "all_ended": self.ended[conn.id] == self.added[conn.id],
                "bytes_sent": conn.bytes_sent,
                "dropped_sends": conn.dropped_sends,
                "dropped_bytes": conn.dropped_bytes,
                "reply_bytes": self.reply_bytes[conn.id],
            }


class Client:
    """One client connection with a fate: live, half(-close), close or reset."""

    def __init__(
        self, address: Any, cid: int, rng: random.Random, errors: list[str], outcome: Counter[str]
    ) -> None:
        self.address = address
        self.cid = cid
        self.rng = rng
        self.errors = errors
        self.outcome = outcome
        self.fate = rng.choices(["live", "half", "close", "reset"], [4, 3, 2, 2])[0]
        count = rng.randint(60, 200)
        self.frames = [
            make_frame(cid, i, rng.choice([0, 1, 10, 50, 200, 700])) for i in range(count)
        ]

    def fail(self, what: str) -> None:
        self.errors.append("conn %d (%s): %s" % (self.cid, self.fate, what))

    def send_burst(self, s: socket.socket, frames: list[bytes]) -> None:
        data = b"".join(frames)
        i = 0
        while i < len(data):  # partial and merged frames
            n = self.rng.choice([1, 3, 17, 200, 4096, len(data)])
            s.sendall(data[i : i + n])
            i += n

    def run(self) -> None:
        try:
            self._run()
        except OSError as exc:
            if self.fate in ("live", "half"):
                self.fail("socket error %r" % exc)

    def _run(self) -> None:
        rng = self.rng
        s = socket.create_connection(self.address, timeout=TIMEOUT)
        expected = b"".join(self.frames)
        got = bytearray()
        try:
            stop_at = len(self.frames)
            if self.fate in ("close", "reset"):
                stop_at = rng.randint(1, len(self.frames))
            sent = 0
            while sent < stop_at:
                burst = min(stop_at - sent, rng.randint(1, 25))
                self.send_burst(s, self.frames[sent : sent + burst])
                sent += burst
                if self.fate != "half" and rng.random() < 0.4:
                    # Read some or all of what is owed so far.
                    owed = sum(map(len, self.frames[:sent])) - len(got)
                    got += recv_exact(s, rng.randint(0, owed))
            if self.fate == "live":
                got += recv_exact(s, len(expected) - len(got))
                if rng.random() < 0.5:
                    s.shutdown(socket.SHUT_WR)
                    got += recv_to_eof(s)
            elif self.fate == "half":
                s.shutdown(socket.SHUT_WR)  # replies still owed: all must come
                got += recv_to_eof(s)
            if self.fate in ("live", "half"):
                if bytes(got) != expected:
                    self.fail(
                        "stream differs: got %d bytes, want %d; first difference "
                        "at %d"
                        % (
                            len(got),
                            len(expected),
                            next(
                                (i for i, (x, y) in enumerate(zip(got, expected)) if x != y),
                                min(len(got), len(expected)),
                            ),
                        )
                    )
                else:
                    with OUTCOME_LOCK:
                        self.outcome["verified"] += len(self.frames)
            elif not expected.startswith(bytes(got)):
                self.fail("a reply that is not ours, or out of order")
        finally:
            if self.fate == "reset":
                rst_close(s)
            else:
                s.close()
        with OUTCOME_LOCK:
            self.outcome[self.fate] += 1


def run_clients(
    address: Any, seed: int, threads: int, per_thread: int, errors: list[str], outcome: Counter[str]
) -> None:
    master = random.Random(seed)
    plans = [
        [
            Client(address, t * per_thread + k, random.Random(master.random()), errors, outcome)
            for k in range(per_thread)
        ]
        for t in range(threads)
    ]

    def worker(clients: list[Client]) -> None:
        for c in clients:  # later ones reuse fds of earlier
            c.run()

    ts = [threading.Thread(target=worker, args=(p,), name="stress-client") for p in plans]
    for t in ts:
        t.start()
    for t in ts:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in ts), "a client hung"


@pytest.mark.parametrize(
    "nthreads,seed", [(4, 1), (4, 2), (0, 3)], ids=["pool4-seed1", "pool4-seed2", "single-seed3"]
)
def test_stress_random_disconnects(
    serve: Any, new_pool: Any, nthreads: int, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cppnp")
    gc.collect()
    live_before = cppnp.live_connections()
    pool = new_pool(nthreads, "stress-worker")
    h = FramedEcho(pool, seed, pause_probability=0.2 if nthreads else 0.0)
    st = serve(h)
    errors: list[str] = []
    outcome: Counter[str] = Counter()
    run_clients(
        st.address,
        seed,
        threads=CLIENT_THREADS,
        per_thread=CONNS_PER_THREAD,
        errors=errors,
        outcome=outcome,
    )
    assert errors == [], "seed %d: %s" % (seed, errors[:5])
    wait_for(lambda: st.connection_count() == 0, TIMEOUT)
    wait_for(lambda: pool.queued == 0 and pool.running == 0, TIMEOUT)
    assert sum(outcome[f] for f in ("live", "half", "close", "reset")) == CONNS
    assert outcome["live"] and outcome["half"] and outcome["reset"] + outcome["close"]
    assert outcome["verified"] >= 2000, outcome
    assert h.on_message_calls > 0
    assert len(h.opened) == CONNS and set(h.opened.values()) == {1}
    assert set(h.closes) == set(h.opened) and set(h.closes.values()) == {1}
    total_dropped = 0
    for cid, info in h.close_info.items():
        assert info["pending"] == 0, (cid, info)
        assert info["bytes_sent"] + info["dropped_bytes"] == info["reply_bytes"], info
        total_dropped += info["dropped_sends"]
    stats = st.stats()
    assert stats["dropped_sends"] == total_dropped
    assert stats["callback_errors"] == 0
    assert pool.failed == 0
    # Every task ran, or was discarded before it ran because its peer had reset.
    unfinished = sum(h.added[cid] - h.ended[cid] for cid in h.close_info)
    assert unfinished == pool.cancelled == pool.discarded
    assert pool.completed + pool.cancelled == h.total_added()
    assert cppnp_errors(caplog) == []
    assert_all_dead(h.refs)
    assert cppnp.live_connections() == live_before


# -- ThreadPool.stop() with connection tasks queued ----------------------------------------


class GatedEcho(FramedEcho):
    """Every task waits on a gate before it echoes."""

    def __init__(self, pool: ThreadPool) -> None:
        super().__init__(pool, 0, 0.0)
        self.gate = threading.Event()
        self.started = 0

    def run2(self, frame: bytes, conn: Any) -> None:
        with self.lock:
            self.started += 1
        self.gate.wait(TIMEOUT)
        super().run2(frame, conn)


@pytest.mark.parametrize("drain", [True, False], ids=["drain", "discard"])
def test_pool_stop_with_connection_tasks_queued(
    serve: Any, new_pool: Any, drain: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cppnp")
    pool = new_pool(2, "stop-worker")
    h = GatedEcho(pool)
    st = serve(h)
    socks = [st.connect() for _ in range(6)]
    frames = [[make_frame(c, i, 20) for i in range(5)] for c in range(6)]
    for s, fs in zip(socks, frames):
        s.sendall(b"".join(fs))
    wait_for(lambda: h.total_added() == 30 and pool.running == 2, TIMEOUT)
    assert pool.queued == 28
    stopper_box: dict[str, Any] = {}
    stopper = threading.Thread(
        target=lambda: stopper_box.setdefault("ok", pool.stop(drain=drain, timeout=TIMEOUT))
    )
    stopper.start()
    if not drain:
        # Once stop() has discarded anything, whatever is still queued -- also in a
        # worker's batch -- is discarded too: opening the gate cannot start more tasks.
        wait_for(lambda: pool.discarded > 0, TIMEOUT)
    h.gate.set()
    stopper.join(TIMEOUT)
    assert stopper_box == {"ok": True}
    received = []
    for s in socks:
        s.shutdown(socket.SHUT_WR)  # the server closes after replying
        received.append(recv_to_eof(s))
        s.close()
    if drain:
        assert received == [b"".join(fs) for fs in frames]
        assert (pool.completed, pool.discarded) == (30, 0)
    else:
        # Only the two tasks that were running replied: each the first frame of a
        # connection.  Nothing else, and nothing on a wrong connection.
        assert sum(1 for r in received if r) == 2
        for r, fs in zip(received, frames):
            assert r in (b"", fs[0])
        assert (pool.completed, pool.discarded) == (2, 28)
    wait_for(lambda: st.connection_count() == 0, TIMEOUT)
    for info in h.close_info.values():
        assert info["pending"] == 0 and info["dropped_sends"] == 0
    assert len(h.closes) == 6 and set(h.closes.values()) == {1}
    assert (pool.queued, pool.running, pool.failed) == (0, 0, 0)
    assert st.stats()["callback_errors"] == 0
    assert cppnp_errors(caplog) == []
    assert_all_dead(h.refs)


# -- the loop quits while workers still send -----------------------------------------------


class ChattyTask(ICppnpUsr, IRun2):
    """Each frame starts a task that sends *before* replies, waits on the gate (if
    any), then sends *after* more."""

    def __init__(self, pool: ThreadPool, before: int, after: int) -> None:
        self.pool = pool
        self.before = before
        self.after = after
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()
        self.at_gate = 0
        self.sends = 0
        self.send_errors: list[BaseException] = []
        self.refs: list[Any] = []

    def on_connection(self, conn: Any) -> None:
        self.refs.append(weakref.ref(conn))

    def on_message(self, conn: Any, buf: Any) -> None:
        while len(buf) >= 4:
            self.pool.add_task(Task(self, buf.retrieve_as_bytes(4), conn))

    def _send(self, conn: Any, data: bytes) -> None:
        try:
            conn.send(data)
        except BaseException as exc:  # send() must never raise
            self.send_errors.append(exc)
        with self.lock:
            self.sends += 1

    def run2(self, msg: bytes, conn: Any) -> None:
        for i in range(self.before):
            self._send(conn, msg + b"b%03d" % i)
        if self.gate is not None:
            with self.lock:
                self.at_gate += 1
            self.gate.wait(TIMEOUT)
        for i in range(self.after):
            self._send(conn, msg + b"a%03d" % i)
            if i % 8 == 0:
                time.sleep(0.0002)


def test_loop_quit_while_workers_still_send(
    serve: Any, new_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers blocked mid-task while the loop stops and closes; then every one of
    them sends after the close.  Nothing raises, nothing hangs, and every late send is
    accounted for (a dropped send or a dropped functor), none left queued on the
    closed loop."""
    caplog.set_level(logging.ERROR, logger="cppnp")
    pool = new_pool(4, "quit-worker")
    h = ChattyTask(pool, before=3, after=10)
    h.gate = threading.Event()
    st = serve(h)
    socks = [st.connect() for _ in range(4)]
    try:
        for s in socks:
            s.sendall(b"m001m002")  # two tasks per connection
        wait_for(lambda: h.at_gate == 4, TIMEOUT)  # one per connection at a time
        st.stop()  # server.stop + quit + close
        loop = st.loop
        assert loop.closed
        before = st.stats()
        h.gate.set()  # the 4 held tasks send after the close
        assert pool.stop(drain=True, timeout=TIMEOUT) is True
    finally:
        h.gate.set()
        pool.stop(drain=False, timeout=TIMEOUT)
        for s in socks:
            s.close()
    assert h.send_errors == []
    # The second task of each connection never starts: the loop's close released the
    # connections (no FIN from their peers), so their queued work is discarded.
    assert pool.failed == 0 and (pool.completed, pool.cancelled) == (4, 4)
    late = 4 * 10
    after = st.stats()
    accounted = (
        after["dropped_sends"]
        - before["dropped_sends"]
        + after["dropped_functors"]
        - before["dropped_functors"]
    )
    assert after["pending_functors"] == 0, "work left queued on a closed loop"
    assert accounted >= late, (before, after)
    assert st.server is not None
    assert st.server.connection_count == 0, "the stopped server still holds connections"
    assert cppnp_errors(caplog) == []
    assert_all_dead({i: r for i, r in enumerate(h.refs)})


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_loop_quit_at_a_random_moment_while_workers_send(
    serve: Any, new_pool: Any, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cppnp")
    rng = random.Random(seed)
    pool = new_pool(4, "quit-worker")
    h = ChattyTask(pool, before=0, after=rng.randint(20, 200))
    st = serve(h)
    socks = [st.connect() for _ in range(6)]
    try:
        for s in socks:
            s.sendall(b"m001" * rng.randint(1, 4))
        target = rng.randint(1, 30)
        wait_for(lambda: h.sends >= target, TIMEOUT)
        st.stop()  # no hang while workers send
        assert pool.stop(drain=True, timeout=TIMEOUT) is True
    finally:
        pool.stop(drain=False, timeout=TIMEOUT)
        for s in socks:
            s.close()
    assert h.send_errors == [] and pool.failed == 0
    assert st.stats()["pending_functors"] == 0, "work left queued on a closed loop"
    assert st.server is not None
    assert st.server.connection_count == 0, "the stopped server still holds connections"
    assert cppnp_errors(caplog) == []
    assert_all_dead({i: r for i, r in enumerate(h.refs)})


def test_stop_server_then_pool_with_tasks_in_flight(
    serve: Any, new_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """server.stop() force-closes connections whose tasks are still running: they are
    released (on_close once) when the tasks finish, their replies dropped and counted;
    their tasks that had not started are discarded (counted in pool.cancelled)."""
    caplog.set_level(logging.ERROR, logger="cppnp")
    pool = new_pool(2, "stop-worker")
    h = GatedEcho(pool)
    st = serve(h)
    socks = [st.connect() for _ in range(3)]
    for i, s in enumerate(socks):
        s.sendall(make_frame(i, 0, 8) + make_frame(i, 1, 8))
    wait_for(lambda: h.total_added() == 6 and h.started == 2, TIMEOUT)
    assert st.server is not None
    call_in_loop(st.loop, st.server.stop)
    wait_for(lambda: all(r() is None or not r().connected for r in h.refs.values()), TIMEOUT)
    assert st.connection_count() == 3  # held by their tasks
    h.gate.set()
    wait_for(lambda: st.connection_count() == 0, TIMEOUT)
    assert pool.stop(timeout=TIMEOUT) is True
    for s in socks:
        assert recv_to_eof(s) == b""
        s.close()
    assert set(h.closes.values()) == {1} and len(h.closes) == 3
    for info in h.close_info.values():
        assert info["pending"] == 0 and info["bytes_sent"] == 0
    # The two running tasks finish (their replies dropped and counted); the four still
    # queued for the force-closed connections are discarded before they run.
    assert (pool.completed, pool.cancelled) == (2, 4)
    assert sum(i["dropped_sends"] for i in h.close_info.values()) == 2
    assert st.stats()["dropped_sends"] == 2
    assert cppnp_errors(caplog) == []
    assert_all_dead(h.refs)
