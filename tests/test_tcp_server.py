"""TcpServer: byte-exact echo (1 byte .. 16 MiB, whole and one byte at a time), many
concurrent connections, server lifecycle (start/stop/restart), arguments, socket options."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, recv_exact, recv_until_eof, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer
from handlers import RecordingEcho

Serve = Callable[..., ServerThread]

# -- helpers ------------------------------------------------------------------------------


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


def echo_roundtrip(st: ServerThread, data: bytes) -> bytes:
    """Send *data* from a thread while reading the echo here (no deadlock on big data)."""
    with st.connect(timeout=30) as s:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                s.sendall(data)
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=sender)
        t.start()
        got = recv_exact(s, len(data))
        t.join(30)
        assert not errors, errors
        return got


# -- echo -----------------------------------------------------------------------------------------


SIZES = [1, 2, 100, 4095, 65535, 65536, 65537, 200_000, 1 << 20, 16 << 20]


@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
def test_echo_is_byte_exact(serve: Serve, size: int) -> None:
    handler = RecordingEcho()
    st = serve(handler)
    data = pattern(size)
    got = echo_roundtrip(st, data)
    assert len(got) == size
    assert got == data
    wait_for(lambda: len(handler.closed) == 1)
    _, received, sent = handler.closed[0]
    assert received == sent == size


def test_echo_one_byte_at_a_time_ping_pong(serve: Serve) -> None:
    """300 one-byte messages, each echoed before the next is sent: each arrives in its
    own on_message and comes back alone."""
    handler = RecordingEcho()
    st = serve(handler)
    data = pattern(300, seed=1)
    with st.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
            assert s.recv(16) == data[i : i + 1]
    wait_for(lambda: len(handler.closed) == 1)
    assert handler.messages == 300
    assert handler.closed[0][1:] == (300, 300)


def test_echo_one_byte_at_a_time_streamed(serve: Serve) -> None:
    handler = RecordingEcho()
    st = serve(handler)
    data = pattern(500, seed=2)
    with st.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.send(data[i : i + 1])
        assert recv_exact(s, len(data)) == data
    wait_for(lambda: len(handler.closed) == 1)
    assert 1 <= handler.messages <= 500


def test_server_sends_one_byte_at_a_time(serve: Serve) -> None:
    data = pattern(400, seed=3)

    class Dribble(ICppnpUsr):
        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            buf.retrieve_all()
            for i in range(len(data)):
                conn.send(data[i : i + 1])

    st = serve(Dribble())
    with st.connect() as s:
        s.sendall(b"go")
        assert recv_exact(s, len(data)) == data


def test_length_prefixed_frames_split_anywhere(serve: Serve) -> None:
    """Frames [int32 length][body] sent in random pieces: the handler leaves partial
    frames in the Buffer and answers each complete one, in order."""

    class Framed(ICppnpUsr):
        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            while len(buf) >= 4:
                n = buf.peek_int32()
                if len(buf) < 4 + n:
                    break
                buf.retrieve(4)
                body = buf.retrieve_as_bytes(n)
                reply = Buffer(body[::-1])
                reply.prepend_int32(n)
                conn.send(reply)  # a Buffer is bytes-like

    st = serve(Framed())
    rng = random.Random(5)
    bodies = [pattern(rng.randrange(0, 3000), seed=i) for i in range(200)]
    wire = b"".join(struct.pack(">i", len(b)) + b for b in bodies)
    expect = b"".join(struct.pack(">i", len(b)) + b[::-1] for b in bodies)
    with st.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pos = 0
        while pos < len(wire):
            step = rng.choice([1, 2, 3, 5, 100, 1000, 5000])
            s.sendall(wire[pos : pos + step])
            pos += step
        assert recv_exact(s, len(expect)) == expect


def test_many_clients_echo_concurrently(serve: Serve) -> None:
    handler = RecordingEcho()
    st = serve(handler)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            data = pattern(256 * 1024, seed=i)
            assert echo_roundtrip(st, data) == data
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    wait_for(lambda: len(handler.closed) == 20)
    assert all(r == s == 256 * 1024 for _, r, s in handler.closed)


def test_1000_concurrent_connections(serve: Serve, nofile_limit: Callable[[int], None]) -> None:
    n = 1000
    nofile_limit(2 * n + 200)  # both ends live in this process
    handler = RecordingEcho()
    st = serve(handler)
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            clients.append(st.connect())
        wait_for(lambda: st.connection_count() == n, timeout=30)
        wait_for(lambda: len(set(handler.opened)) == n)  # io_threads: started on its loop
        for i, s in enumerate(clients):
            s.sendall(b"%d\n" % i)
        for i, s in enumerate(clients):
            assert recv_exact(s, len(b"%d\n" % i)) == b"%d\n" % i
        assert st.server is not None
        assert call_in_loop(st.loop, lambda: st.server.accepted) == n  # type: ignore[union-attr]
    finally:
        for s in clients:
            s.close()
    wait_for(lambda: st.connection_count() == 0, timeout=30)
    assert len(handler.closed) == n


# -- lifecycle ------------------------------------------------------------------------------------


def test_start_binds_now_and_address_has_real_port(serve: Serve) -> None:
    st = serve(RecordingEcho())
    host, port = st.address
    assert host == "127.0.0.1"
    assert 0 < port < 65536
    assert st.server is not None
    assert st.server.address == (host, port)
    st.server.start()  # twice: harmless (and from another thread)
    assert echo_roundtrip(st, b"x") == b"x"


def test_address_before_start_is_the_requested_one() -> None:
    with EventLoop() as lp:
        srv = TcpServer(lp, ("127.0.0.1", 0), RecordingEcho(), name="unstarted")
        assert srv.address == ("127.0.0.1", 0)
        assert srv.connection_count == 0
        assert srv.connections() == []
        assert srv.name == "unstarted"


def test_stop_closes_listener_and_connections(serve: Serve) -> None:
    handler = RecordingEcho()
    st = serve(handler)
    assert st.server is not None
    with st.connect() as s:
        assert echo_roundtrip(st, b"hi") == b"hi"
        wait_for(lambda: st.connection_count() == 1)
        st.server.stop()  # from another thread: queued to the loop
        s.settimeout(10)
        try:
            assert recv_until_eof(s) == b""
        except ConnectionResetError:
            pass  # a force-close may reset
    wait_for(lambda: st.connection_count() == 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(st.address, timeout=5).close()
    st.server.stop()  # twice: harmless


def test_stopped_server_cannot_be_restarted(serve: Serve) -> None:
    """start() after stop() raises instead of silently not listening."""
    st = serve(RecordingEcho())
    assert st.server is not None
    call_in_loop(st.loop, st.server.stop)
    with pytest.raises(RuntimeError):
        call_in_loop(st.loop, st.server.start)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(st.address, timeout=5).close()


def test_server_stopped_before_start_cannot_start() -> None:
    with EventLoop() as lp:
        srv = TcpServer(lp, ("127.0.0.1", 0), RecordingEcho())
        srv.stop()
        with pytest.raises(RuntimeError):
            srv.start()


def test_stop_on_the_loop_thread(serve: Serve) -> None:
    st = serve(RecordingEcho())
    assert st.server is not None
    call_in_loop(st.loop, st.server.stop)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(st.address, timeout=5).close()


def test_connections_and_counters(serve: Serve) -> None:
    handler = RecordingEcho()
    st = serve(handler, name="counted")
    server = st.server
    assert server is not None
    with st.connect() as a, st.connect() as b:
        a.sendall(b"a")
        b.sendall(b"b")
        assert recv_exact(a, 1) == b"a" and recv_exact(b, 1) == b"b"
        conns = call_in_loop(st.loop, server.connections)
        assert len(conns) == 2
        assert {c.id for c in conns} == set(handler.opened)
        assert all(c.name.startswith("counted") for c in conns)
        assert len({c.name for c in conns}) == 2
        assert {c.peer_address for c in conns} == {a.getsockname(), b.getsockname()}
        del conns
    wait_for(lambda: st.connection_count() == 0)
    assert call_in_loop(st.loop, lambda: server.accepted) == 2
    assert call_in_loop(st.loop, lambda: server.accept_errors) == 0


def test_bind_conflict_raises_and_reuse_port_shares(serve: Serve) -> None:
    st = serve(RecordingEcho())
    port = st.address[1]
    with EventLoop() as lp:
        clash = TcpServer(lp, ("127.0.0.1", port), RecordingEcho())
        with pytest.raises(OSError):
            clash.start()
    a = serve(RecordingEcho(), reuse_port=True)
    with EventLoop() as lp:
        b = TcpServer(lp, ("127.0.0.1", a.address[1]), RecordingEcho(), reuse_port=True)
        b.start()
        assert b.address == a.address
        b.stop()


@pytest.mark.parametrize(
    "address, exc",
    [
        (("127.0.0.1", -1), ValueError),
        (("127.0.0.1", 70000), ValueError),
        (("127.0.0.1", "80"), TypeError),
        (("127.0.0.1", 1.5), TypeError),
        (("127.0.0.1", True), TypeError),
        ((b"127.0.0.1", 0), TypeError),
        ("127.0.0.1:0", TypeError),
        (("127.0.0.1", 0, 0), TypeError),
        (None, TypeError),
    ],
)
def test_bad_addresses(address: Any, exc: type[BaseException]) -> None:
    with EventLoop() as lp, pytest.raises(exc):
        TcpServer(lp, address, RecordingEcho())


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"backlog": 0}, ValueError),
        ({"backlog": -5}, ValueError),
        ({"backlog": "1"}, TypeError),
        ({"backlog": 1.1}, TypeError),
        ({"bogus": 1}, TypeError),
    ],
)
def test_bad_server_options(kwargs: dict[str, Any], exc: type[BaseException]) -> None:
    with EventLoop() as lp, pytest.raises(exc):
        TcpServer(lp, ("127.0.0.1", 0), RecordingEcho(), **kwargs)


def test_server_needs_a_loop() -> None:
    with pytest.raises(TypeError):
        TcpServer(None, ("127.0.0.1", 0), RecordingEcho())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TcpServer(object(), ("127.0.0.1", 0), RecordingEcho())  # type: ignore[arg-type]


def test_handler_with_only_some_methods(serve: Serve) -> None:
    """A plain object with just on_message is a valid handler."""

    class Minimal:
        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            conn.send(buf.retrieve_all().upper())

    st = serve(Minimal())
    with st.connect() as s:
        s.sendall(b"abc")
        assert recv_exact(s, 3) == b"ABC"


def test_default_handler_discards_input(serve: Serve) -> None:
    closed: list[int] = []

    class Quiet(ICppnpUsr):
        def on_close(self, conn: TcpConnection) -> None:
            closed.append(conn.bytes_received)

    st = serve(Quiet())
    with st.connect() as s:
        s.sendall(b"x" * 100000)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
    wait_for(lambda: closed == [100000])


def test_client_reset_before_accept(serve: Serve) -> None:
    """A client that resets while the loop is busy: the listener keeps accepting."""
    handler = RecordingEcho()
    st = serve(handler)
    blocked = threading.Event()
    release = threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(10)

    st.loop.queue_in_loop(block)
    assert blocked.wait(10)
    for _ in range(5):
        s = socket.create_connection(st.address, timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    release.set()
    assert echo_roundtrip(st, b"after") == b"after"
    wait_for(lambda: st.connection_count() == 0)


# -- socket options -------------------------------------------------------------------------------


def _sockopt(conn: TcpConnection, level: int, opt: int) -> int:
    dup = socket.socket(fileno=os.dup(conn.fileno))
    try:
        return int(dup.getsockopt(level, opt))
    finally:
        dup.close()


@pytest.mark.parametrize("nodelay, keepalive", [(True, False), (False, True)])
def test_accepted_socket_options(serve: Serve, nodelay: bool, keepalive: bool) -> None:
    conns: list[TcpConnection] = []

    class Keep(RecordingEcho):
        def on_connection(self, conn: TcpConnection) -> None:
            conns.append(conn)

    st = serve(Keep(), tcp_nodelay=nodelay, keepalive=keepalive)
    with st.connect() as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
        conn = conns[0]
        opts = call_in_loop(
            conn.loop,
            lambda: (
                _sockopt(conn, socket.IPPROTO_TCP, socket.TCP_NODELAY),
                _sockopt(conn, socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            ),
        )
        assert (bool(opts[0]), bool(opts[1])) == (nodelay, keepalive)
        conn.set_tcp_no_delay(not nodelay)  # from this thread: queued
        conn.set_keep_alive(not keepalive)
        opts = call_in_loop(
            conn.loop,
            lambda: (
                _sockopt(conn, socket.IPPROTO_TCP, socket.TCP_NODELAY),
                _sockopt(conn, socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            ),
        )
        assert (bool(opts[0]), bool(opts[1])) == (not nodelay, not keepalive)
        call_in_loop(conn.loop, lambda: conn.setTcpNoDelay(nodelay))  # on the loop thread
        assert (
            bool(
                call_in_loop(
                    conn.loop, lambda: _sockopt(conn, socket.IPPROTO_TCP, socket.TCP_NODELAY)
                )
            )
            == nodelay
        )
    conns.clear()


def test_idle_connections_do_not_make_the_loop_spin(serve: Serve) -> None:
    """Idle connections do not make the loop spin: iterations stay flat while 50 idle
    clients are connected and nothing happens."""
    st = serve(RecordingEcho())
    clients = [st.connect() for _ in range(50)]
    try:
        wait_for(lambda: st.connection_count() == 50)
        call_in_loop(st.loop, lambda: None)
        before = st.stats()["iterations"]
        time.sleep(0.2)
        assert st.stats()["iterations"] - before <= 2
    finally:
        for s in clients:
            s.close()
    wait_for(lambda: st.connection_count() == 0)


def test_stop_accepting_keeps_open_connections(serve: Serve) -> None:
    """stop_accepting() closes the listener; an open connection still echoes; stop() then
    force-closes it."""
    st = serve(RecordingEcho())
    assert st.server is not None
    server = st.server
    with st.connect() as s:
        s.sendall(b"hi")
        assert recv_exact(s, 2) == b"hi"
        assert server.accepting
        server.stop_accepting()  # from another thread: queued to the loop
        wait_for(lambda: not server.accepting)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(st.address, timeout=5).close()
        s.sendall(b"still here")
        assert recv_exact(s, 10) == b"still here"
        with pytest.raises(RuntimeError):
            call_in_loop(st.loop, server.start)
        call_in_loop(st.loop, server.stop)
        s.settimeout(10)
        try:
            assert recv_until_eof(s) == b""
        except ConnectionResetError:
            pass
    wait_for(lambda: st.connection_count() == 0)
