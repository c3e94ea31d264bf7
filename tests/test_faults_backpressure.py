"""Fault suite, checklist section B (backpressure and memory): B1 a slow reader against a
fast writer (high-water mark + stop_reading flow control), B2 memory returned after a
flooded connection dies, B3 a huge write followed by small ones, B4 input floods bounded
by the application's frame cap, B5 hand-off floods and a bounded pool queue fed from the
loop thread.  B6 (cancel-heavy timers) is covered in test_timers.py (tests/README.md).
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, wait_for
from cppnp import Buffer, ICppnpUsr, IRun2, QueueFull, Task, TcpConnection, ThreadPool
from faults_support import (
    POOL_IDS,
    POOL_SIZES,
    TIMEOUT,
    recv_exact,
    recv_until_eof,
    rst_close,
    small_rcvbuf_client,
)

Serve = Callable[..., ServerThread]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- B1: slow reader, fast writer -----------------------------------------------------------

REQ = 4096  # request frame
REPLY = 16384  # reply per request
N_REQ = 2000  # 8 MiB of requests, 32 MiB of replies
HWM = 256 * 1024


def reply_for(seq: int) -> bytes:
    return (b"%08d" % seq) * (REPLY // 8)


# With a pool, the high-water mark only sees bytes already produced: the loop can read
# and queue requests far faster than GIL-bound workers answer them.  So the handler also
# bounds the tasks in flight per connection (conn.pending_tasks) -- the pattern the README
# documents -- and the output bound below follows from both limits.
MAX_INFLIGHT = 256


class FlowControlled(ICppnpUsr, IRun2):
    """Each request frame becomes a pool task that sends a 16 KiB reply.  On the high
    water mark, or with MAX_INFLIGHT tasks in flight, the handler stops reading (and stops
    turning buffered requests into tasks); on write complete it resumes (muduo's socks4a
    tunnel pattern)."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.conn: TcpConnection | None = None
        self.paused = False
        self.hwm_calls: list[int] = []
        self.resumes = 0
        self.stale_write_completes: list[int] = []
        self.batch_max = 0
        self.max_output = 0
        self.timer = -1

    def on_connection(self, conn: TcpConnection) -> None:
        conn.set_high_water_mark(HWM)
        self.conn = conn
        self.timer = conn.loop.run_every(0.001, self._sample)

    def _sample(self) -> None:
        if self.conn is not None:
            self.max_output = max(self.max_output, self.conn.output_bytes)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self._process(conn, buf)

    def _process(self, conn: TcpConnection, buf: Buffer) -> None:
        frames = 0
        while not self.paused and len(buf) >= REQ:
            if conn.pending_tasks >= MAX_INFLIGHT:
                self.paused = True
                conn.stop_reading()
                break
            frame = buf.retrieve_as_bytes(REQ)
            self.pool.add_task(Task(self, frame, conn))
            frames += 1
        self.batch_max = max(self.batch_max, frames)

    def run2(self, frame: bytes, conn: TcpConnection) -> None:
        conn.send(reply_for(int(frame[:8])))

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        self.hwm_calls.append(queued)
        self.paused = True
        conn.stop_reading()
        self._sample()

    def on_write_complete(self, conn: TcpConnection) -> None:
        if conn.output_bytes:
            self.stale_write_completes.append(conn.output_bytes)
        if self.paused:
            self.paused = False
            self.resumes += 1
            conn.start_reading()
            self._process(conn, conn.input_buffer)

    def on_close(self, conn: TcpConnection) -> None:
        conn.loop.cancel_timer(self.timer)
        self.conn = None


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
def test_slow_reader_fast_writer_output_stays_bounded(
    serve: Serve, ledger: Any, nthreads: int
) -> None:
    pool = ledger.pool(nthreads)
    h = FlowControlled(pool)
    st = ledger.server(serve(h))
    requests = b"".join((b"%08d" % i).ljust(REQ, b".") for i in range(N_REQ))
    s = small_rcvbuf_client(st.address)
    sender = threading.Thread(target=s.sendall, args=(requests,), name="req-sender")
    sender.start()
    try:
        wait_for(lambda: h.hwm_calls, TIMEOUT)
        wait_for(lambda: call_in_loop(st.loop, lambda: pool.queued + pool.running) == 0, TIMEOUT)

        def snapshot() -> tuple[Any, ...]:
            c = h.conn
            assert c is not None
            return c.bytes_received, c.output_bytes, c.reading, h.paused

        first = call_in_loop(st.loop, snapshot)
        time.sleep(0.05)
        for _ in range(3):
            call_in_loop(st.loop, lambda: None)
        second = call_in_loop(st.loop, snapshot)
        assert first == second, "the server kept reading or queueing while paused"
        received, queued, reading, paused = first
        assert paused and not reading
        assert received < len(requests), "paused only after reading everything"
        assert queued >= HWM
        # The client reads now: every reply, in order, byte for byte.
        for i in range(N_REQ):
            got = recv_exact(s, REPLY)
            assert got == reply_for(i), "reply %d" % i
    finally:
        sender.join(TIMEOUT)
        s.close()
    assert h.resumes >= 1
    # The documented contract ("everything sent so far has been handed to the kernel")
    # is what makes the documented pause-until-write-complete pattern safe.
    assert h.stale_write_completes == [], (
        "on_write_complete ran with output still queued (%d times, up to %d bytes)"
        % (len(h.stale_write_completes), max(h.stale_write_completes))
    )
    assert len(h.hwm_calls) <= h.resumes + 1  # once per crossing
    bound = HWM + (MAX_INFLIGHT + 3 * h.batch_max) * REPLY + REPLY
    assert h.max_output <= bound, (h.max_output, h.batch_max)
    assert h.max_output < N_REQ * REPLY // 4  # far below "everything queued"


# -- B2: memory returned after a flooded connection dies --------------------------------------

CHUNK = bytes(1 << 20)
FLOOD_MB = 64


class Flooder(ICppnpUsr):
    def __init__(self) -> None:
        self.conns: list[TcpConnection] = []
        self.at_close: list[int] = []

    def on_connection(self, conn: TcpConnection) -> None:
        self.conns.append(conn)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        buf.retrieve_all()
        for _ in range(FLOOD_MB):
            conn.send(CHUNK)

    def on_close(self, conn: TcpConnection) -> None:
        self.at_close.append(conn.output_bytes)


def test_flooded_connection_memory_is_released(serve: Serve, ledger: Any) -> None:
    h = Flooder()
    st = ledger.server(serve(h))
    gc.collect()
    base = rss_bytes()
    s = small_rcvbuf_client(st.address)
    s.sendall(b"go")
    wait_for(lambda: h.conns, TIMEOUT)
    conn = h.conns[0]
    queued = call_in_loop(st.loop, lambda c=conn: c.output_bytes)
    assert queued >= (FLOOD_MB - 4) << 20
    assert rss_bytes() - base >= (FLOOD_MB // 2) << 20  # it really was held
    rst_close(s)
    wait_for(lambda: h.at_close, TIMEOUT)
    assert h.at_close == [0]
    assert conn.bytes_sent + conn.dropped_bytes == FLOOD_MB << 20
    h.conns.clear()
    del conn
    gc.collect()
    assert rss_bytes() - base <= 16 << 20, "the output buffer was not given back"


# -- B3: a huge write, then a small one, then many --------------------------------------------

HUGE = os.urandom(10 << 20)
SMALL_COUNT = 600
SMALL = 65536


def small_chunk(i: int) -> bytes:
    return (b"%07d\n" % i) * (SMALL // 8)


class Writer(ICppnpUsr):
    def __init__(self) -> None:
        self.complete: list[int] = []

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        buf.retrieve_all()
        conn.send(HUGE)
        conn.send(b"!")
        for i in range(SMALL_COUNT):
            conn.send(small_chunk(i))

    def on_write_complete(self, conn: TcpConnection) -> None:
        self.complete.append(conn.output_bytes)


def test_huge_write_then_small_writes_arrive_exactly_in_order(serve: Serve, ledger: Any) -> None:
    h = Writer()
    st = ledger.server(serve(h))
    expected = hashlib.sha256(HUGE + b"!")
    for i in range(SMALL_COUNT):
        expected.update(small_chunk(i))
    total = len(HUGE) + 1 + SMALL_COUNT * SMALL
    got = hashlib.sha256()
    n = 0
    with small_rcvbuf_client(st.address, 65536) as s:
        s.sendall(b"go")
        while n < total:
            chunk = s.recv(min(1 << 20, total - n))
            assert chunk
            got.update(chunk)
            n += len(chunk)
        wait_for(lambda: h.complete, TIMEOUT)
    assert got.hexdigest() == expected.hexdigest()
    assert h.complete[-1] == 0  # drained; EPOLLOUT dropped


# -- B4: input floods; the frame cap is the application's ------------------------------------

MAX_FRAME = 64 * 1024


class Capped(ICppnpUsr):
    """Newline-delimited or 4-byte length-prefixed frames, at most MAX_FRAME bytes: a
    longer line or a bigger declared length closes the connection."""

    def __init__(self, framing: str) -> None:
        self.framing = framing
        self.max_input = 0
        self.rejected = 0
        self.frames: list[bytes] = []
        self.closes = 0

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.max_input = max(self.max_input, len(buf))
        while True:
            if self.framing == "line":
                end = buf.find_eol()
                if end < 0:
                    if len(buf) > MAX_FRAME:
                        return self._reject(conn, buf)
                    return None
                frame = buf.retrieve_as_bytes(end + 1)
            else:
                if len(buf) < 4:
                    return None
                size = buf.peek_int32() & 0xFFFFFFFF
                if size > MAX_FRAME:
                    return self._reject(conn, buf)
                if len(buf) < 4 + size:
                    return None
                frame = buf.retrieve_as_bytes(4 + size)
            self.frames.append(frame)
            conn.send(frame)

    def _reject(self, conn: TcpConnection, buf: Buffer) -> None:
        self.rejected += 1
        buf.retrieve_all()
        conn.force_close()

    def on_close(self, conn: TcpConnection) -> None:
        self.closes += 1


def flood(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server closed on us: expected


@pytest.mark.parametrize("framing", ["line", "length"])
def test_input_flood_is_cut_at_the_frame_cap(serve: Serve, ledger: Any, framing: str) -> None:
    h = Capped(framing)
    st = ledger.server(serve(h))
    if framing == "line":
        data = b"x" * (8 << 20)  # no delimiter at all
    else:
        data = struct.pack("!I", 0xFFFFFFFF) + b"y" * (1 << 20)
    s = st.connect()
    t = threading.Thread(target=flood, args=(s, data))
    t.start()
    t.join(TIMEOUT)
    recv_until_eof(s)
    s.close()
    wait_for(lambda: h.closes == 1, TIMEOUT)
    assert h.rejected == 1 and h.frames == []
    # One read adds at most the free space + the 64 KiB spill area.
    assert h.max_input <= MAX_FRAME + 2 * 65536 + 65536, h.max_input


@pytest.mark.parametrize("framing", ["line", "length"])
def test_frame_sent_one_byte_at_a_time_is_held_until_complete(
    serve: Serve, ledger: Any, framing: str
) -> None:
    h = Capped(framing)
    st = ledger.server(serve(h))
    body = b"0123456789abcdefghi\n"
    frame = body if framing == "line" else struct.pack("!I", len(body)) + body
    with st.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(frame)):
            s.send(frame[i : i + 1])
            time.sleep(0.002)
        assert recv_exact(s, len(frame)) == frame
    wait_for(lambda: h.closes == 1, TIMEOUT)
    assert h.frames == [frame] and h.rejected == 0


# -- B5: hand-off floods ----------------------------------------------------------------------

SENDERS = 8
PER_SENDER = 4000


class Sink(ICppnpUsr):
    """Keeps the one connection; a 5 ms timer makes every loop pass slow (2 ms)."""

    def __init__(self) -> None:
        self.conns: list[TcpConnection] = []
        self.peak_pending = 0
        self.timer = -1

    def on_connection(self, conn: TcpConnection) -> None:
        self.conns.append(conn)
        self.timer = conn.loop.run_every(0.005, lambda: self._slow(conn))

    def _slow(self, conn: TcpConnection) -> None:
        self.peak_pending = max(self.peak_pending, conn.loop.pending_functors)
        time.sleep(0.002)

    def on_close(self, conn: TcpConnection) -> None:
        conn.loop.cancel_timer(self.timer)


def test_hand_off_flood_loses_nothing(serve: Serve, ledger: Any) -> None:
    h = Sink()
    st = ledger.server(serve(h))
    barrier = threading.Barrier(SENDERS)
    with st.connect() as s:
        wait_for(lambda: h.conns, TIMEOUT)
        conn = h.conns[0]

        def sender(k: int) -> None:
            barrier.wait(TIMEOUT)
            for i in range(PER_SENDER):
                conn.send(b"%d:%06d\n" % (k, i))

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS)]
        for t in threads:
            t.start()
        total = SENDERS * PER_SENDER * 9
        data = recv_exact(s, total)
        for t in threads:
            t.join(TIMEOUT)
    assert len(data) == total
    seen = [-1] * SENDERS
    for line in data.split(b"\n")[:-1]:
        k, i = line.split(b":")
        assert int(i) == seen[int(k)] + 1, "sender %s out of order" % k
        seen[int(k)] = int(i)
    assert seen == [PER_SENDER - 1] * SENDERS
    assert conn.dropped_sends == 0
    h.conns.clear()


class Submitter(ICppnpUsr):
    """Every byte received on the loop thread is a task for a bounded pool."""

    def __init__(self, pool: ThreadPool, gate: threading.Event) -> None:
        self.pool = pool
        self.gate = gate
        self.accepted = 0
        self.rejected = 0
        self.ran = 0
        self.lock = threading.Lock()

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        data = buf.retrieve_all()
        if data.startswith(b"echo"):
            conn.send(data)
            return
        for _ in data:
            try:
                self.pool.add_task(self._work)
                self.accepted += 1
            except QueueFull:
                self.rejected += 1
        conn.send(b"%d/%d" % (self.accepted, self.rejected))

    def _work(self) -> None:
        self.gate.wait(TIMEOUT)
        with self.lock:
            self.ran += 1


def test_full_pool_queue_never_blocks_the_loop_thread(serve: Serve, ledger: Any) -> None:
    gate = threading.Event()
    pool = ledger.pool(2, max_queue=5)
    h = Submitter(pool, gate)
    st = ledger.server(serve(h))
    try:
        with st.connect() as s, st.connect() as other:
            s.sendall(b"t" * 20)
            # 20 submissions from the loop thread: 2 running + 5 queued, 13 refused.
            wait_for(lambda: h.accepted + h.rejected == 20, TIMEOUT)
            other.sendall(b"echo?")  # the loop thread is not blocked
            assert recv_exact(other, 5) == b"echo?"
            assert h.rejected > 0 and pool.queued <= 5
            gate.set()
            wait_for(lambda: h.ran == h.accepted, TIMEOUT)
            assert recv_exact(s, len(b"%d/%d" % (h.accepted, h.rejected))) == b"%d/%d" % (
                h.accepted,
                h.rejected,
            )
    finally:
        gate.set()
    assert h.accepted <= 2 + 5 + 2  # workers may have taken tasks meanwhile
    assert pool.failed == 0
