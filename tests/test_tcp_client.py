"""TcpClient (issue 10 item 1): connect, errors per attempt, backoff, reconnect, graceful
disconnect, stop during backoff, sends from worker threads; real loopback sockets."""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

import pytest

from conftest import call_in_loop, fd_count, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, TcpClient, TcpConnection, TcpServer
from handlers import Echo, RecordingEcho


class ClientRecorder(ICppnpUsr):
    """Records the client side: connections, bytes received, errors (loop thread), with
    an event per connection and a condition for the received bytes."""

    def __init__(self) -> None:
        self.opened: list[TcpConnection] = []
        self.closed: list[TcpConnection] = []
        self.errors: list[tuple[float, BaseException]] = []
        self.data = bytearray()
        self.lock = threading.Lock()

    def on_connection(self, conn: TcpConnection) -> None:
        self.opened.append(conn)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        with self.lock:
            self.data += buf.retrieve_all()

    def on_close(self, conn: TcpConnection) -> None:
        self.closed.append(conn)

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        self.errors.append((time.monotonic(), exc))

    def received(self) -> bytes:
        with self.lock:
            return bytes(self.data)


def free_port() -> int:
    """A port nothing listens on (bound, then closed; connect is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def make_client(loop: EventLoop, address: Any, handler: Any, **kw: Any) -> TcpClient:
    return call_in_loop(loop, lambda: TcpClient(loop, address, handler, **kw))


def stop_client(loop: EventLoop, client: TcpClient) -> None:
    client.stop()
    wait_for(lambda: client.connection is None)


def test_connect_echo_roundtrip(loop_thread: EventLoop, serve: Any) -> None:
    srv = serve(Echo())
    h = ClientRecorder()
    client = make_client(loop_thread, srv.address, h)
    client.connect()
    wait_for(lambda: client.connected)
    conn = client.connection
    assert conn is not None and conn.peer_address == srv.address
    assert conn.name.startswith("TcpClient-127.0.0.1:%d" % srv.address[1])
    conn.send(b"hello client")
    wait_for(lambda: h.received() == b"hello client")
    assert client.stats()["connections"] == 1 and h.errors == []
    stop_client(loop_thread, client)
    assert len(h.closed) == 1


def test_refused_reported_without_retry(loop_thread: EventLoop) -> None:
    h = ClientRecorder()
    client = make_client(loop_thread, ("127.0.0.1", free_port()), h, retry=False)
    client.connect()
    wait_for(lambda: len(h.errors) == 1)
    assert isinstance(h.errors[0][1], ConnectionRefusedError)
    assert client.connection is None and not client.connected
    assert call_in_loop(loop_thread, lambda: client.stats())["attempts"] == 1


def test_refused_retries_with_backoff_bounds(loop_thread: EventLoop) -> None:
    """Intervals between attempts follow the doubling backoff with [0.75 d, d] jitter:
    0.05, 0.1, 0.2, capped at 0.2 (generous margins: lower bounds only are strict; the
    upper bound allows for a loaded machine)."""
    h = ClientRecorder()
    client = make_client(
        loop_thread, ("127.0.0.1", free_port()), h, retry_initial=0.05, retry_max=0.2
    )
    client.connect()
    wait_for(lambda: len(h.errors) >= 5)
    stop_client(loop_thread, client)
    times = [t for t, _ in h.errors]
    gaps = [b - a for a, b in zip(times, times[1:])]
    bounds = [0.05, 0.1, 0.2, 0.2]
    for gap, d in zip(gaps, bounds):
        assert gap >= max(0.05, 0.75 * d) * 0.9, (gaps, bounds)
        assert gap <= d + 2.0, (gaps, bounds)
    assert all(isinstance(e, ConnectionRefusedError) for _, e in h.errors)


def test_dns_failure_reported(loop_thread: EventLoop) -> None:
    h = ClientRecorder()
    client = make_client(loop_thread, ("no-such-host.invalid", 80), h, retry=False)
    client.connect()
    wait_for(lambda: len(h.errors) == 1, timeout=30)
    assert isinstance(h.errors[0][1], socket.gaierror)


def test_name_is_resolved_off_the_loop(loop_thread: EventLoop, serve: Any) -> None:
    srv = serve(Echo())
    h = ClientRecorder()
    client = make_client(loop_thread, ("localhost", srv.address[1]), h)
    client.connect()
    # The server listens on 127.0.0.1 only: where localhost resolves to ::1 first, that
    # address is refused and the next one (127.0.0.1) is tried within the same attempt.
    wait_for(lambda: client.connected or h.errors, timeout=30)
    assert client.connected and h.errors == []
    conn = client.connection
    assert conn is not None and conn.peer_address == srv.address
    stop_client(loop_thread, client)


def test_connect_timeout(loop_thread: EventLoop) -> None:
    """A listener with backlog 0 whose queue is filled and never accepted: a further SYN
    is dropped, the connect stays in progress and connect_timeout ends it."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    try:
        # Fill the accept queue (Linux accepts backlog + 1) until a connect hangs.
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex(lsock.getsockname())
            fillers.append(s)
            if err == errno.EINPROGRESS:
                break
        h = ClientRecorder()
        client = make_client(loop_thread, lsock.getsockname(), h, retry=False, connect_timeout=0.2)
        client.connect()
        wait_for(lambda: len(h.errors) == 1)
        assert isinstance(h.errors[0][1], TimeoutError)
    finally:
        for s in fillers:
            s.close()
        lsock.close()


def test_reconnects_after_server_restart(loop_thread: EventLoop) -> None:
    """The server goes away and comes back on the same port: the client retries (refused
    in between) and reconnects."""
    port = free_port()
    srv_loop_box: list[TcpServer] = []

    def start_server() -> TcpServer:
        def make() -> TcpServer:
            s = TcpServer(loop_thread, ("127.0.0.1", port), RecordingEcho())
            s.start()
            return s

        s = call_in_loop(loop_thread, make)
        srv_loop_box.append(s)
        return s

    srv = start_server()
    h = ClientRecorder()
    client = make_client(loop_thread, ("127.0.0.1", port), h, retry_initial=0.05, retry_max=0.4)
    client.connect()
    wait_for(lambda: client.connected)
    call_in_loop(loop_thread, srv.stop)
    wait_for(lambda: len(h.closed) == 1)
    wait_for(lambda: len(h.errors) >= 2)  # refused while the server is down
    srv = start_server()
    wait_for(lambda: len(h.opened) == 2 and client.connected)
    client.connection.send(b"again")  # type: ignore[union-attr]
    wait_for(lambda: h.received() == b"again")
    stop_client(loop_thread, client)
    call_in_loop(loop_thread, srv.stop)
    assert all(isinstance(e, ConnectionRefusedError) for _, e in h.errors)


def test_stop_during_backoff(loop_thread: EventLoop) -> None:
    h = ClientRecorder()
    client = make_client(
        loop_thread, ("127.0.0.1", free_port()), h, retry_initial=5.0, retry_max=10.0
    )
    client.connect()
    wait_for(lambda: len(h.errors) == 1)
    timers = call_in_loop(loop_thread, lambda: loop_thread.timer_count)
    assert timers >= 1
    client.stop()
    wait_for(lambda: call_in_loop(loop_thread, lambda: loop_thread.timer_count) == timers - 1)
    attempts = client.stats()["attempts"]
    assert attempts == 1 and len(h.errors) == 1


def test_disconnect_flushes_pending_output_then_fin(loop_thread: EventLoop) -> None:
    """disconnect() right after a large send: every byte arrives, then EOF."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    payload = bytes(range(256)) * 16384  # 4 MiB: more than the socket buffers hold
    h = ClientRecorder()
    client = make_client(loop_thread, lsock.getsockname(), h)
    try:
        client.connect()
        peer, _ = lsock.accept()
        wait_for(lambda: client.connected)

        def send_and_disconnect() -> None:
            assert client.connection is not None
            client.connection.send(payload)
            client.disconnect()

        call_in_loop(loop_thread, send_and_disconnect)
        got = bytearray()
        peer.settimeout(10)
        while True:
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        assert bytes(got) == payload
        peer.close()
        wait_for(lambda: client.connection is None)
        assert len(h.closed) == 1 and len(h.opened) == 1  # no reconnect after disconnect
        assert client.stats()["attempts"] == 1
    finally:
        lsock.close()


def test_sends_from_8_workers_byte_exact(loop_thread: EventLoop, serve: Any) -> None:
    srv = serve(Echo())
    h = ClientRecorder()
    client = make_client(loop_thread, srv.address, h)
    client.connect()
    wait_for(lambda: client.connected)
    conn = client.connection
    assert conn is not None
    n, per = 8, 500
    expected: dict[int, bytes] = {}

    def worker(i: int) -> None:
        for j in range(per):
            conn.send(b"%d:%d;" % (i, j))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(n):
        expected[i] = b"".join(b"%d:%d;" % (i, j) for j in range(per))
    total = sum(len(v) for v in expected.values())
    wait_for(lambda: len(h.received()) == total)
    # Each thread's messages arrive in its order (interleaved with the others').
    parts = [p for p in h.received().split(b";") if p]
    per_thread: dict[int, list[bytes]] = {i: [] for i in range(n)}
    for p in parts:
        i, _ = p.split(b":")
        per_thread[int(i)].append(p + b";")
    for i in range(n):
        assert b"".join(per_thread[i]) == expected[i]
    stop_client(loop_thread, client)


def test_fds_and_threads_back_to_baseline(loop_thread: EventLoop, serve: Any) -> None:
    srv = serve(Echo())
    fds = fd_count()
    threads = threading.active_count()
    for _ in range(5):
        h = ClientRecorder()
        client = make_client(loop_thread, srv.address, h)
        client.connect()
        wait_for(lambda c=client: c.connected)  # type: ignore[misc]
        stop_client(loop_thread, client)
    h = ClientRecorder()
    client = make_client(loop_thread, ("no-such-host.invalid", 80), h, retry=False)
    client.connect()
    wait_for(lambda: len(h.errors) == 1, timeout=30)
    wait_for(lambda: fd_count() <= fds and threading.active_count() <= threads)


def test_loop_close_releases_client(loop: EventLoop) -> None:
    """Closing the loop under a connecting client (retry timer armed) leaves nothing."""
    h = ClientRecorder()
    client = TcpClient(loop, ("127.0.0.1", free_port()), h, retry_initial=5.0)
    client.connect()
    while not h.errors:
        loop.run_once(0.5)
    loop.close()
    assert client.connection is None


def test_bad_arguments() -> None:
    lp = EventLoop()
    try:
        with pytest.raises(TypeError):
            TcpClient(lp, 8080, Echo())  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            TcpClient(lp, ("127.0.0.1", 0), Echo())
        with pytest.raises(ValueError):
            TcpClient(lp, ("127.0.0.1", 80), Echo(), retry_initial=2.0, retry_max=1.0)
        with pytest.raises(ValueError):
            TcpClient(lp, ("127.0.0.1", 80), Echo(), connect_timeout=-1)
        with pytest.raises(TypeError):  # ssl= takes an ssl.SSLContext (test_tls.py)
            TcpClient(lp, ("127.0.0.1", 80), Echo(), ssl=True)
        c = TcpClient(lp, ("127.0.0.1", 80), Echo())
        with pytest.raises(RuntimeError):
            c.__init__(lp, ("127.0.0.1", 80), Echo())  # type: ignore[misc]
    finally:
        lp.close()


def test_default_on_connect_error_logs(
    loop_thread: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    class Plain(ICppnpUsr):
        pass

    client = make_client(loop_thread, ("127.0.0.1", free_port()), Plain(), retry=False)
    with caplog.at_level("WARNING", logger="cppnp"):
        client.connect()
        wait_for(lambda: any("connect failed" in r.getMessage() for r in caplog.records))


def test_idle_timeout_closes_a_silent_connection(loop_thread: EventLoop, serve: Any) -> None:
    """A connection that receives nothing for idle_timeout is closed (on_close runs,
    counted); one that keeps receiving stays open."""
    srv = serve(Echo())
    quiet = ClientRecorder()
    busy = ClientRecorder()
    c1 = make_client(loop_thread, srv.address, quiet, retry=False, idle_timeout=0.3)
    c2 = make_client(loop_thread, srv.address, busy, retry=False, idle_timeout=0.3)
    assert c1.idle_timeout == 0.3
    t0 = time.monotonic()
    c1.connect()
    c2.connect()
    wait_for(lambda: c1.connected and c2.connected)
    conn2 = c2.connection
    assert conn2 is not None
    for i in range(10):  # the echo keeps c2's connection receiving
        conn2.send(b"%d" % i)
        time.sleep(0.1)
    wait_for(lambda: len(quiet.closed) == 1)
    assert time.monotonic() - t0 >= 0.3
    assert c1.stats()["idle_closed"] == 1 and c1.connection is None
    assert busy.closed == [] and c2.connected and c2.stats()["idle_closed"] == 0
    stop_client(loop_thread, c2)


def test_idle_timeout_argument_checks(loop: EventLoop) -> None:
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="idle_timeout"):
            TcpClient(loop, ("127.0.0.1", 1), ICppnpUsr(), idle_timeout=bad)
    assert TcpClient(loop, ("127.0.0.1", 1), ICppnpUsr()).idle_timeout is None
