"""TcpConnection: send() argument rules and cross-thread sends, half-close, peer reset,
shutdown/force_close, high water mark and reading flow control, attributes."""

from __future__ import annotations

import array
import random
import socket
import threading
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, recv_exact, recv_until_eof, rst_close, wait_for
from cppnp import Buffer, ICppnpUsr, TcpConnection

Serve = Callable[..., ServerThread]

# -- helpers ------------------------------------------------------------------------------


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


def small_rcvbuf_client(st: ServerThread, size: int = 4096) -> socket.socket:
    """A client whose receive window stays small (set before connect: no autotuning)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    s.settimeout(30)
    s.connect(st.address)
    return s


class Recorder(ICppnpUsr):
    """Keeps the connections and what happened to them; echoes unless told otherwise.

    Call forget() at the end of a test: the serve fixture keeps handlers alive until after
    the leak check, so a handler must not hold connections (or take new ones) by then.
    """

    def __init__(self, reply: Callable[[TcpConnection, bytes], None] | None = None) -> None:
        self.reply = reply
        self.conns: list[TcpConnection] = []
        self.closed: list[TcpConnection] = []
        # Written by the loop thread, read by the test thread: under a lock.
        self.lock = threading.Lock()
        self._received = bytearray()
        self._messages = 0
        self.state_at_close: list[dict[str, Any]] = []
        self.keep = True

    def on_connection(self, conn: TcpConnection) -> None:
        if self.keep:
            self.conns.append(conn)

    @property
    def received(self) -> bytes:
        with self.lock:
            return bytes(self._received)

    @property
    def messages(self) -> int:
        with self.lock:
            return self._messages

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        data = buf.retrieve_all()
        with self.lock:
            self._messages += 1
            self._received += data
        if self.reply is not None:
            self.reply(conn, data)
        else:
            conn.send(data)

    def on_close(self, conn: TcpConnection) -> None:
        self.state_at_close.append(
            {
                "connected": conn.connected,
                "closed": conn.closed,
                "peer_closed": conn.peer_closed,
                "fileno": conn.fileno,
                "output_bytes": conn.output_bytes,
                "in_loop": conn.loop.is_in_loop_thread(),
            }
        )
        if self.keep:  # after the state: a test that sees it closed finds the state
            self.closed.append(conn)

    def conn(self, st: ServerThread, i: int = 0) -> TcpConnection:
        wait_for(lambda: len(self.conns) > i)
        return self.conns[i]

    def forget(self) -> None:
        self.keep = False
        self.conns.clear()
        self.closed.clear()


# -- send(): arguments ------------------------------------------------------------------------


def test_str_is_sent_as_utf8(serve: Serve) -> None:
    text = "héllo wörld ✓ \U0001f600"
    rec = Recorder(reply=lambda conn, data: conn.send(text))
    st = serve(rec)
    with st.connect() as s:
        s.sendall(b"?")
        assert recv_exact(s, len(text.encode())) == text.encode("utf-8")
        conn = rec.conn(st)
        conn.send("ü✓")  # from another thread: encoded and queued
        assert recv_exact(s, len("ü✓".encode())) == "ü✓".encode()
    rec.forget()


def test_send_empty_is_a_noop(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    with st.connect() as s:
        conn = rec.conn(st)
        before = call_in_loop(conn.loop, lambda: (conn.bytes_sent, conn.dropped_sends))
        call_in_loop(conn.loop, lambda: (conn.send(b""), conn.send(""), conn.send(bytearray())))
        conn.send(b"")  # from another thread too
        conn.send(memoryview(b""))
        assert call_in_loop(conn.loop, lambda: (conn.bytes_sent, conn.dropped_sends)) == before
        conn.send(b"x")
        assert recv_exact(s, 1) == b"x"
        s.settimeout(0.05)
        with pytest.raises(socket.timeout):
            s.recv(1)  # nothing else was sent
    rec.forget()


BAD_SEND = [None, 123, 1.5, [1, 2], {"a": 1}, object(), memoryview(b"abcdef")[::2]]


@pytest.mark.parametrize(
    "bad", BAD_SEND, ids=["None", "int", "float", "list", "dict", "object", "strided"]
)
def test_send_rejects_non_bytes_like(serve: Serve, bad: Any) -> None:
    rec = Recorder()
    st = serve(rec)
    with st.connect() as s:
        conn = rec.conn(st)
        with pytest.raises(TypeError):
            conn.send(bad)  # another thread
        with pytest.raises(TypeError):
            call_in_loop(conn.loop, lambda: conn.send(bad))  # the loop thread
        with pytest.raises(TypeError):
            conn.Send(bad)
        conn.send(b"still ok")
        assert recv_exact(s, 8) == b"still ok"
        assert conn.dropped_sends == 0
    rec.forget()


def test_send_bytes_like_kinds(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    arr = array.array("i", [1, 2, 3])
    pieces: list[Any] = [b"b", bytearray(b"ba"), memoryview(b"xmvx")[1:3], arr, Buffer(b"buf")]
    expect = b"b" + b"ba" + b"mv" + arr.tobytes() + b"buf"
    with st.connect() as s:
        conn = rec.conn(st)
        for p in pieces:
            conn.send(p)
        assert recv_exact(s, len(expect)) == expect
        call_in_loop(conn.loop, lambda: [conn.send(p) for p in pieces])
        assert recv_exact(s, len(expect)) == expect
    rec.forget()


def test_send_copies_and_does_not_mutate_bytearray(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    with st.connect() as s:
        conn = rec.conn(st)
        data = bytearray(b"original-data" * 1000)
        keep = bytes(data)
        blocked = threading.Event()
        release = threading.Event()

        def block() -> None:
            blocked.set()
            release.wait(10)

        st.loop.queue_in_loop(block)  # the send below stays queued meanwhile
        assert blocked.wait(10)
        conn.send(data)
        assert data == keep  # not mutated
        data[:] = b"X" * len(data)  # the queued send holds its own copy
        release.set()
        assert recv_exact(s, len(keep)) == keep
    rec.forget()


# -- send() from other threads -------------------------------------------------------------------


def test_sends_from_one_thread_keep_their_order(serve: Serve) -> None:
    rec = Recorder(reply=lambda conn, data: None)
    st = serve(rec)
    n = 3000
    expect = b"".join(b"%06d\n" % i for i in range(n))
    with st.connect() as s:
        conn = rec.conn(st)
        for i in range(n):
            conn.send(b"%06d\n" % i)
        assert recv_exact(s, len(expect)) == expect
        wait_for(lambda: conn.bytes_sent == len(expect))
    rec.forget()


def test_sends_from_many_threads_keep_per_thread_order(serve: Serve) -> None:
    rec = Recorder(reply=lambda conn, data: None)
    st = serve(rec)
    threads_n, per = 4, 1000
    with st.connect() as s:
        conn = rec.conn(st)
        barrier = threading.Barrier(threads_n)

        def worker(w: int) -> None:
            barrier.wait(10)
            for i in range(per):
                conn.send(b"%d:%05d\n" % (w, i))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(threads_n)]
        for t in threads:
            t.start()
        total = threads_n * per * len(b"0:00000\n")
        data = recv_exact(s, total)
        for t in threads:
            t.join(10)
    lines = data.split(b"\n")[:-1]
    assert len(lines) == threads_n * per
    per_thread: dict[int, list[int]] = {}
    for line in lines:
        w, i = line.split(b":")
        per_thread.setdefault(int(w), []).append(int(i))
    assert per_thread == {w: list(range(per)) for w in range(threads_n)}
    rec.forget()


def test_sends_from_thread_interleave_with_loop_sends_in_order(serve: Serve) -> None:
    """A send queued from another thread before a loop-thread send goes out first."""
    rec = Recorder(reply=lambda conn, data: conn.send(b"[loop]"))
    st = serve(rec)
    with st.connect() as s:
        conn = rec.conn(st)
        conn.send(b"[thread]")
        call_in_loop(conn.loop, lambda: conn.send(b"[loop-direct]"))
        assert recv_exact(s, len(b"[thread][loop-direct]")) == b"[thread][loop-direct]"
    rec.forget()


# -- half-close ----------------------------------------------------------------------------------


def test_half_close_replies_still_delivered_then_eof(serve: Serve) -> None:
    """Pipelined requests, then SHUT_WR at once: every reply arrives in order (the server
    still sends after it saw the FIN), then the server closes and the client reads EOF."""

    def reply(conn: TcpConnection, data: bytes) -> None:
        ctx = conn.context if conn.context is not None else bytearray()
        ctx += data
        while b"\n" in ctx:
            line, _, rest = bytes(ctx).partition(b"\n")
            ctx[:] = rest
            n = int(line)
            conn.send(pattern(n, seed=n))
        conn.context = ctx

    rec = Recorder(reply=reply)
    st = serve(rec)
    sizes = [5, 1 << 20, 300_000, 2 << 20, 7]
    expect = b"".join(pattern(n, seed=n) for n in sizes)
    with small_rcvbuf_client(st, 65536) as s:
        s.sendall(b"".join(b"%d\n" % n for n in sizes))
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s)
    assert len(got) == len(expect)
    assert got == expect
    wait_for(lambda: len(rec.closed) == 1)
    state = rec.state_at_close[0]
    assert state["peer_closed"] is True
    assert state["closed"] is True and state["connected"] is False
    assert state["in_loop"] is True
    conn = rec.closed[0]
    assert conn.bytes_sent == len(expect)
    assert conn.dropped_sends == 0
    wait_for(lambda: st.connection_count() == 0)
    rec.forget()


def test_half_close_with_nothing_to_send_closes(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    with st.connect() as s:
        s.sendall(b"abc")
        assert recv_exact(s, 3) == b"abc"
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
    wait_for(lambda: len(rec.closed) == 1)
    assert rec.state_at_close[0]["peer_closed"] is True
    rec.forget()


# -- peer reset ------------------------------------------------------------------------------------


def test_peer_reset_mid_send_is_survived_and_counted(serve: Serve) -> None:
    big = pattern(16 << 20, seed=9)
    rec = Recorder(reply=lambda conn, data: conn.send(big) if data == b"go" else conn.send(data))
    st = serve(rec)
    s = small_rcvbuf_client(st)
    try:
        s.sendall(b"go")
        assert recv_exact(s, 16384) == big[:16384]
        conn = rec.conn(st)
        wait_for(lambda: call_in_loop(conn.loop, lambda: conn.output_bytes) > 0)
    finally:
        rst_close(s)
    wait_for(lambda: len(rec.closed) == 1)
    assert rec.state_at_close[0]["output_bytes"] == 0  # freed
    assert conn.dropped_sends >= 1
    assert 0 < conn.dropped_bytes <= len(big)
    assert conn.bytes_sent + conn.dropped_bytes == len(big)
    stats = st.stats()
    assert stats["dropped_sends"] >= 1 and stats["dropped_bytes"] >= conn.dropped_bytes
    # Later sends to the dead connection are dropped and counted, never raised.
    before = conn.dropped_sends
    conn.send(b"late")
    call_in_loop(conn.loop, lambda: conn.send(b"late too"))
    wait_for(lambda: conn.dropped_sends == before + 2)
    # The server is fine: the next client is served.
    with st.connect() as s2:
        s2.sendall(b"next")
        assert recv_exact(s2, 4) == b"next"
    wait_for(lambda: st.connection_count() == 0)
    rec.forget()


def test_peer_reset_while_idle(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    s = st.connect()
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    rst_close(s)
    wait_for(lambda: len(rec.closed) == 1)
    wait_for(lambda: st.connection_count() == 0)
    rec.forget()


# -- shutdown / force_close ------------------------------------------------------------------------


def test_shutdown_after_output_drains_and_keeps_reading(serve: Serve) -> None:
    big = pattern(3 << 20, seed=4)

    class Shut(Recorder):
        def on_connection(self, conn: TcpConnection) -> None:
            super().on_connection(conn)
            conn.send(big)
            conn.shutdown()
            conn.shutdown()  # twice: harmless

    rec = Shut(reply=lambda conn, data: conn.send(b"dropped after shutdown"))
    st = serve(rec)
    with small_rcvbuf_client(st, 65536) as s:
        assert recv_until_eof(s) == big  # everything, then our FIN
        conn = rec.conn(st)
        s.sendall(b"more")  # the server still reads
        wait_for(lambda: bytes(rec.received) == b"more")
        wait_for(lambda: conn.dropped_sends == 1)
        assert conn.connected
    wait_for(lambda: len(rec.closed) == 1)
    assert conn.bytes_sent == len(big)
    rec.forget()


def test_force_close_drops_queued_output(serve: Serve) -> None:
    big = pattern(16 << 20, seed=6)

    def reply(conn: TcpConnection, data: bytes) -> None:
        conn.send(big)
        conn.force_close()
        conn.force_close()

    rec = Recorder(reply=reply)
    st = serve(rec)
    s = small_rcvbuf_client(st)
    try:
        s.sendall(b"go")
        try:
            got = recv_until_eof(s)
            assert big.startswith(got)
        except ConnectionResetError:
            pass
    finally:
        s.close()
    wait_for(lambda: len(rec.closed) == 1)
    conn = rec.closed[0]
    assert conn.closed and not conn.connected
    assert conn.fileno == -1
    assert conn.dropped_bytes > 0
    assert conn.bytes_sent + conn.dropped_bytes == len(big)
    conn.force_close()  # after release: no-op
    conn.send(b"x")
    wait_for(lambda: conn.dropped_sends >= 2)
    assert len(rec.closed) == 1  # on_close ran once
    rec.forget()


def test_force_close_from_another_thread(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    with st.connect() as s:
        conn = rec.conn(st)
        conn.forceClose()
        s.settimeout(10)
        try:
            assert recv_until_eof(s) == b""
        except ConnectionResetError:
            pass
    wait_for(lambda: len(rec.closed) == 1)
    wait_for(lambda: st.connection_count() == 0)
    rec.forget()


# -- high water mark and flow control --------------------------------------------------------------


class Producer(ICppnpUsr):
    """Streams *total* bytes in chunks from a self-requeueing functor; pauses on the high
    water mark and resumes on write complete (muduo's socks4a tunnel pattern)."""

    def __init__(self, total: int, chunk: int, hwm: int) -> None:
        self.total, self.chunk, self.hwm = total, chunk, hwm
        self.data = pattern(total, seed=8)
        self.conns: list[TcpConnection] = []

    def on_connection(self, conn: TcpConnection) -> None:
        conn.set_high_water_mark(self.hwm)
        conn.context = {
            "sent": 0,
            "paused": False,
            "chain": False,
            "hwm": [],
            "max_output": 0,
            "resumes": 0,
        }
        self.conns.append(conn)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        if buf.retrieve_all() == b"go":
            self._start(conn)

    def _start(self, conn: TcpConnection) -> None:
        ctx = conn.context
        if not ctx["chain"]:
            ctx["chain"] = True
            self._produce(conn)

    def _produce(self, conn: TcpConnection) -> None:
        ctx = conn.context
        if ctx["paused"] or not conn.connected or ctx["sent"] >= self.total:
            ctx["chain"] = False
            return
        start = ctx["sent"]
        conn.send(self.data[start : start + self.chunk])
        ctx["sent"] = min(start + self.chunk, self.total)
        ctx["max_output"] = max(ctx["max_output"], conn.output_bytes)
        conn.loop.queue_in_loop(lambda: self._produce(conn))

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        ctx = conn.context
        ctx["hwm"].append(queued)
        ctx["paused"] = True

    def on_write_complete(self, conn: TcpConnection) -> None:
        ctx = conn.context
        if ctx["paused"]:
            ctx["paused"] = False
            ctx["resumes"] += 1
            self._start(conn)


def test_slow_reader_triggers_high_water_mark_and_memory_stays_bounded(serve: Serve) -> None:
    hwm, chunk, total = 256 * 1024, 64 * 1024, 24 << 20
    prod = Producer(total, chunk, hwm)
    st = serve(prod)
    with small_rcvbuf_client(st) as s:
        s.sendall(b"go")
        wait_for(lambda: prod.conns)
        conn = prod.conns[0]
        wait_for(lambda: call_in_loop(conn.loop, lambda: len(conn.context["hwm"])) >= 1)

        def snapshot() -> tuple[int, int, bool, bool]:
            ctx = conn.context
            return ctx["sent"], conn.output_bytes, ctx["paused"], ctx["chain"]

        sent1, out1, paused, chain = call_in_loop(conn.loop, snapshot)
        assert paused and not chain  # the producer stopped
        assert sent1 < total
        assert out1 <= sent1
        sent2, _, _, _ = call_in_loop(conn.loop, snapshot)
        assert sent2 == sent1  # nothing more was queued while paused
        queued = call_in_loop(conn.loop, lambda: conn.context["hwm"][0])
        assert hwm <= queued <= hwm + chunk
        # The client reads everything: the producer resumes on write complete.
        got = recv_exact(s, total)
        assert got == prod.data
        ctx = call_in_loop(conn.loop, lambda: dict(conn.context))
        assert ctx["sent"] == total
        assert ctx["resumes"] >= 1
        assert ctx["max_output"] <= hwm + chunk, "output buffer grew past the mark"
    prod.conns.clear()


def test_high_water_mark_fires_once_per_crossing(serve: Serve) -> None:
    marks: list[int] = []

    class Flood(ICppnpUsr):
        def on_connection(self, conn: TcpConnection) -> None:
            conn.set_high_water_mark(100_000)
            assert conn.high_water_mark == 100_000

        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            buf.retrieve_all()
            for _ in range(40):  # 40 x 256 KiB, far above the mark
                conn.send(b"z" * (256 * 1024))

        def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
            marks.append(queued)

    st = serve(Flood())
    with small_rcvbuf_client(st) as s:
        s.sendall(b"go")
        wait_for(lambda: marks)
        call_in_loop(st.loop, lambda: None)
        assert len(marks) == 1  # crossing upwards once, not per send
        assert marks[0] >= 100_000
        assert recv_exact(s, 40 * 256 * 1024) == b"z" * (40 * 256 * 1024)


def test_high_water_mark_validation(serve: Serve) -> None:
    rec = Recorder()
    st = serve(rec)
    with st.connect():
        conn = rec.conn(st)
        assert conn.high_water_mark == 64 * 1024 * 1024
        for bad in (0, -1):
            with pytest.raises(ValueError):
                conn.set_high_water_mark(bad)
        with pytest.raises(TypeError):
            conn.set_high_water_mark("1")
        assert conn.high_water_mark == 64 * 1024 * 1024
    rec.forget()


def test_stop_and_start_reading(serve: Serve) -> None:
    class Paused(Recorder):
        def on_connection(self, conn: TcpConnection) -> None:
            super().on_connection(conn)
            conn.stop_reading()
            conn.stop_reading()  # idempotent

    rec = Paused(reply=lambda conn, data: None)
    st = serve(rec)
    first = pattern(256 * 1024, seed=11)
    second = pattern(100_000, seed=12)
    with st.connect() as s:
        conn = rec.conn(st)
        sender = threading.Thread(target=s.sendall, args=(first,))
        sender.start()
        for _ in range(3):
            call_in_loop(conn.loop, lambda: None)  # several loop iterations
        assert call_in_loop(
            conn.loop, lambda: (conn.reading, conn.bytes_received, rec.messages)
        ) == (
            False,
            0,
            0,
        )
        conn.start_reading()  # from another thread: queued
        conn.start_reading()
        wait_for(lambda: len(rec.received) == len(first))
        sender.join(10)
        assert bytes(rec.received) == first
        assert conn.reading
        # Pause again on the loop thread, then resume.
        call_in_loop(conn.loop, conn.stop_reading)
        s.sendall(second)
        for _ in range(3):
            call_in_loop(conn.loop, lambda: None)
        assert call_in_loop(conn.loop, lambda: conn.bytes_received) == len(first)
        call_in_loop(conn.loop, conn.start_reading)
        wait_for(lambda: len(rec.received) == len(first) + len(second))
        assert bytes(rec.received) == first + second
    wait_for(lambda: len(rec.closed) == 1)
    rec.forget()


def test_peer_reset_is_noticed_while_reading_is_stopped(serve: Serve) -> None:
    class Paused(Recorder):
        def on_connection(self, conn: TcpConnection) -> None:
            super().on_connection(conn)
            conn.stop_reading()

    rec = Paused()
    st = serve(rec)
    s = st.connect()
    s.sendall(b"unread data")
    rec.conn(st)
    call_in_loop(rec.conn(st).loop, lambda: None)
    rst_close(s)
    wait_for(lambda: len(rec.closed) == 1)
    assert rec.messages == 0
    wait_for(lambda: st.connection_count() == 0)
    rec.forget()


def test_fin_while_reading_is_stopped_is_seen_after_start(serve: Serve) -> None:
    class Paused(Recorder):
        def on_connection(self, conn: TcpConnection) -> None:
            super().on_connection(conn)
            conn.stop_reading()

    rec = Paused(reply=lambda conn, data: None)
    st = serve(rec)
    with st.connect() as s:
        s.sendall(b"tail")
        s.shutdown(socket.SHUT_WR)
        conn = rec.conn(st)
        for _ in range(3):
            call_in_loop(conn.loop, lambda: None)
        assert rec.messages == 0
        conn.start_reading()
        wait_for(lambda: len(rec.closed) == 1)
        assert bytes(rec.received) == b"tail"
        assert recv_until_eof(s) == b""
    rec.forget()


def test_write_complete_after_queued_output_drains(serve: Serve) -> None:
    big = pattern(8 << 20, seed=13)
    done: list[int] = []

    class Writer(ICppnpUsr):
        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            buf.retrieve_all()
            conn.send(big)

        def on_write_complete(self, conn: TcpConnection) -> None:
            done.append(conn.output_bytes)

    st = serve(Writer())
    with small_rcvbuf_client(st) as s:
        s.sendall(b"go")
        assert recv_exact(s, len(big)) == big
        wait_for(lambda: done)
        assert done[-1] == 0


# -- attributes ------------------------------------------------------------------------------------


def test_connection_attributes_and_lifecycle(serve: Serve) -> None:
    order: list[str] = []

    class Attrs(Recorder):
        def on_connection(self, conn: TcpConnection) -> None:
            order.append("connection")
            conn.context = {"mine": 1}
            super().on_connection(conn)

        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            order.append("message")
            if len(buf) < 10:
                return  # leave it: it stays for the next call
            conn.send(buf.retrieve_all())

        def on_close(self, conn: TcpConnection) -> None:
            order.append("close")
            super().on_close(conn)

    rec = Attrs()
    st = serve(rec, name="attrs")
    with st.connect() as s, st.connect():
        client_address = s.getsockname()
        conn = rec.conn(st)
        conn2 = rec.conn(st, 1)
        if conn.peer_address != client_address:  # io_threads: two loops, either goes first
            conn, conn2 = conn2, conn
        assert conn.id != conn2.id
        assert conn.name != conn2.name and conn.name.startswith("attrs")
        assert conn.peer_address == s.getsockname()
        assert call_in_loop(conn.loop, lambda: conn.local_address) == st.address
        assert conn.fileno >= 0
        assert conn.connected and not conn.closed and not conn.peer_closed
        assert conn.context == {"mine": 1}
        assert conn.loop in st.serving_loops
        assert conn.reading
        assert conn.pending_tasks == 0
        assert repr(conn)
        s.sendall(b"12345")
        wait_for(lambda: call_in_loop(conn.loop, lambda: conn.input_bytes) == 5)
        assert call_in_loop(conn.loop, lambda: len(conn.input_buffer)) == 5
        s.sendall(b"67890")
        assert recv_exact(s, 10) == b"1234567890"
        assert call_in_loop(
            conn.loop, lambda: (conn.bytes_received, conn.bytes_sent, conn.input_bytes)
        ) == (10, 10, 0)
    wait_for(lambda: len(rec.closed) == 2)
    assert order[0] == "connection" and order.count("close") == 2
    assert conn.closed and not conn.connected and conn.fileno == -1
    assert conn.peer_address == client_address  # still known after close
    rec.forget()


def test_connection_cannot_be_created_directly() -> None:
    with pytest.raises(TypeError):
        TcpConnection()
