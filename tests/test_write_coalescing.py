"""Write coalescing: the sends of one loop iteration (callbacks on the loop thread, worker
sends drained in the functor pass) are written with one send() per connection, before the
loop polls again.  Same bytes, same order; shutdown, force_close, the high-water mark and
write-complete keep their meaning."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from conftest import recv_exact, recv_until_eof, wait_for
from cppnp import Buffer, ICppnpUsr, IRun2, Task, TcpConnection
from faults_support import small_rcvbuf_client

TIMEOUT = 30.0


class Lines(ICppnpUsr, IRun2):
    """Each complete line goes to self.line(conn, line); records opens and closes."""

    def __init__(self, pool: Any = None) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.conns: list[TcpConnection] = []
        self.closed = threading.Event()
        self.high_water: list[int] = []
        self.write_completes = 0

    def on_connection(self, conn: TcpConnection) -> None:
        with self.lock:
            self.conns.append(conn)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        while True:
            line = buf.readline(b"\n")
            if line is None:
                return
            self.line(conn, bytes(line)[:-1])  # without the b"\n"

    def line(self, conn: TcpConnection, line: bytes) -> None:
        conn.send(line + b"\n")

    def run2(self, msg: Any, conn: TcpConnection) -> None:
        conn.send(msg)

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        self.high_water.append(queued)

    def on_write_complete(self, conn: TcpConnection) -> None:
        self.write_completes += 1

    def on_close(self, conn: TcpConnection) -> None:
        with self.lock:
            self.conns.remove(conn)  # no leak: the teardown counts live connections
        self.closed.set()


def test_pipelined_sends_take_one_write_call(serve: Any) -> None:
    """100 lines in one segment: 100 send() calls by the handler, about one syscall."""
    h = Lines()
    st = serve(h, io_threads=0)
    with st.connect() as s:
        s.sendall(b"warm\n")
        assert recv_exact(s, 5) == b"warm\n"
        before = st.loop.stats()
        payload = b"".join(b"line%03d\n" % i for i in range(100))
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
        after = st.loop.stats()
    calls = after["write_calls"] - before["write_calls"]
    coalesced = after["coalesced_sends"] - before["coalesced_sends"]
    # Each send had its own call or joined a pending one; most joined.
    assert calls + coalesced == 100
    assert calls <= 25, (calls, coalesced)
    assert h.closed.wait(TIMEOUT)


class Interleaved(Lines):
    """Per line n: a loop send "P<n>;", a worker task sending "W<n>;", and a loop send
    "L<n>;" after the task (after_tasks=True): the stream must be P0 W0 L0 P1 W1 L1 ..."""

    def line(self, conn: TcpConnection, line: bytes) -> None:
        n = int(line)
        conn.send(b"P%d;" % n)
        self.pool.add_task(Task(self, b"W%d;" % n, conn))
        conn.send(b"L%d;" % n, after_tasks=True)


@pytest.mark.parametrize("io_threads", [0, 2], ids=["io0", "io2"])
def test_callback_and_worker_sends_keep_their_order(
    serve: Any, make_pool: Any, io_threads: int
) -> None:
    h = Interleaved(make_pool(2))
    st = serve(h, io_threads=io_threads)
    n = 300
    expected = b"".join(b"P%d;W%d;L%d;" % (i, i, i) for i in range(n))
    with st.connect() as s:
        for chunk in range(0, n, 30):  # several lines per read: several per iteration
            s.sendall(b"".join(b"%d\n" % i for i in range(chunk, chunk + 30)))
        assert recv_exact(s, len(expected)) == expected
    assert h.closed.wait(TIMEOUT)


class SendThenShutdown(Lines):
    def line(self, conn: TcpConnection, line: bytes) -> None:
        for i in range(50):
            conn.send(b"%s-%d\n" % (line, i))
        if self.pool is None:
            conn.shutdown()  # our FIN only after the coalesced output
        else:
            self.pool.add_task(Task(self, line, conn))

    def run2(self, msg: Any, conn: TcpConnection) -> None:
        for i in range(50):
            conn.send(b"w%s-%d\n" % (msg, i))
        conn.shutdown()


@pytest.mark.parametrize("worker", [False, True], ids=["loop", "worker"])
def test_shutdown_after_sends_sends_everything_first(
    serve: Any, make_pool: Any, worker: bool
) -> None:
    h = SendThenShutdown(make_pool(2) if worker else None)
    st = serve(h, io_threads=0)
    with st.connect() as s:
        s.settimeout(TIMEOUT)
        s.sendall(b"x\n")
        got = recv_until_eof(s, reset_ok=False)
    expected = b"".join(b"x-%d\n" % i for i in range(50))
    if worker:
        expected += b"".join(b"wx-%d\n" % i for i in range(50))
    assert got == expected
    assert h.closed.wait(TIMEOUT)


class SendThenForceClose(Lines):
    def line(self, conn: TcpConnection, line: bytes) -> None:
        conn.send(b"bye ")
        conn.send(line + b"\n")
        conn.force_close()


def test_force_close_after_small_sends_still_offers_them(serve: Any) -> None:
    """Sends before force_close() get their one write attempt (as before coalescing)."""
    h = SendThenForceClose()
    st = serve(h, io_threads=0)
    with st.connect() as s:
        s.settimeout(TIMEOUT)
        s.sendall(b"now\n")
        assert recv_until_eof(s, reset_ok=False) == b"bye now\n"
    assert h.closed.wait(TIMEOUT)
    assert st.loop.stats()["dropped_bytes"] == 0


class Flood(Lines):
    """One line: 4000 sends of 4 KiB (coalesced: one flush of 16 MiB) to a client that
    does not read."""

    def on_connection(self, conn: TcpConnection) -> None:
        super().on_connection(conn)
        conn.set_high_water_mark(1 << 20)

    def line(self, conn: TcpConnection, line: bytes) -> None:
        for i in range(4000):
            conn.send(bytes([65 + i % 26]) * 4096)


def test_high_water_mark_and_write_complete_with_coalesced_sends(serve: Any) -> None:
    h = Flood()
    st = serve(h, io_threads=0)
    s = small_rcvbuf_client(st.address)
    try:
        s.sendall(b"go\n")
        wait_for(lambda: len(h.high_water) >= 1, 5)  # fired, with the backlog
        assert len(h.high_water) == 1, h.high_water
        assert h.high_water[0] >= 1 << 20
        assert h.write_completes == 0
        expected = b"".join(bytes([65 + i % 26]) * 4096 for i in range(4000))
        assert recv_exact(s, len(expected)) == expected
        wait_for(lambda: h.write_completes >= 1, TIMEOUT)
        assert len(h.high_water) == 1
    finally:
        s.close()
    assert h.closed.wait(TIMEOUT)


class ParkAfterReply(Lines):
    """Replies, then parks the loop in a timer of the next iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.parked = threading.Event()
        self.go = threading.Event()

    def line(self, conn: TcpConnection, line: bytes) -> None:
        conn.send(line + b"\n")
        # A timer added now runs in this iteration (before the flush); one it adds runs
        # in the next iteration, after the poll.
        conn.loop.run_after(0.0, lambda: conn.loop.run_after(0.0, self.park))

    def park(self) -> None:
        self.parked.set()
        self.go.wait(TIMEOUT)


def test_loop_thread_send_goes_out_before_the_next_poll(serve: Any) -> None:
    """Latency: the reply is written before the loop polls again, so it arrives while
    the loop is stuck in a timer of the next iteration."""
    h = ParkAfterReply()
    st = serve(h, io_threads=0)
    with st.connect() as s:
        try:
            s.sendall(b"ping\n")
            assert h.parked.wait(TIMEOUT)
            assert recv_exact(s, 5) == b"ping\n"  # the loop is still parked
            assert not h.go.is_set()
        finally:
            h.go.set()
    assert h.closed.wait(TIMEOUT)


def test_large_send_is_written_at_once(serve: Any) -> None:
    """Above the coalescing size, a send with nothing queued is written inside send()."""
    seen: dict[str, int] = {}

    class Big(Lines):
        def line(self, conn: TcpConnection, line: bytes) -> None:
            conn.send(b"y" * 100_000)
            seen["sent_in_call"] = conn.bytes_sent

    h = Big()
    st = serve(h, io_threads=0)
    with st.connect() as s:
        s.sendall(b"go\n")
        assert recv_exact(s, 100_000) == b"y" * 100_000
    assert seen["sent_in_call"] > 0
    assert h.closed.wait(TIMEOUT)
