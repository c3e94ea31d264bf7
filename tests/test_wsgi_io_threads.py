"""``WsgiServer(..., io_threads=N)`` / ``cppnp wsgi --io-threads N``: the server's loop
accepts, N io loops do the sockets, the parsing and the timeouts of their own connections.

Real loopback sockets and real clients; the in-process servers have 2 io loops, so every
mechanism below runs on two loop threads at once (the connections are spread over both:
least connections, ties round-robin).  ``CPPNP_TEST_IO_THREADS=2`` runs the other WSGI
test modules on io loops too."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pytest

import wsgi_apps
from conftest import wait_for
from cppnp.wsgi import Config
from wsgi_support import MODE_IDS, MODES, Serve, ServerProcess, get, read_response, rss_kib

IO = 2


def _thread_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    data = threading.current_thread().name.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def _connect(w: Any, n: int) -> list[socket.socket]:
    """*n* connections, each answered once (so each is on its io loop)."""
    socks = []
    for _ in range(n):
        s = w.connect()
        s.sendall(get("/hello"))
        assert read_response(s.makefile("rb")).status == 200
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_connections_are_spread_over_the_io_loops(wsgi: Serve, threads: int) -> None:
    w = wsgi(_thread_app, threads=threads, io_threads=IO)
    assert w.server is not None
    assert w.server.io_threads == IO and len(w.server.io_loops) == IO
    socks = _connect(w, 4)
    try:
        stats = w.server.stats()
        assert stats["io_threads"] == IO
        assert stats["connections_per_loop"] == [2, 2]
        names = set()
        for s in socks:
            s.sendall(get("/"))
            names.add(read_response(s.makefile("rb")).body.decode())
        if threads:
            assert all(n.startswith("cppnp-wsgi") for n in names), names
        else:
            # threads=0: the app runs on the io loop that owns the connection.
            assert names == {"wsgi-127.0.0.1:0-io0", "wsgi-127.0.0.1:0-io1"}
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: w.connection_count() == 0)
    assert w.server.stats()["connections_per_loop"] == [0, 0]


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_keep_alive_and_pipelining_in_order_on_every_io_loop(wsgi: Serve, threads: int) -> None:
    w = wsgi(wsgi_apps.dispatch, threads=threads, io_threads=IO, max_pipeline=64)
    socks = [w.connect() for _ in range(4)]
    try:
        # 12 pipelined requests per connection, the early ones slower (with a pool they
        # would finish last if the order were not kept), all sent before any is read.
        for c, s in enumerate(socks):
            ms = 2 if threads else 0
            raw = b"".join(get("/slow/%d-%d?ms=%d" % (c, i, ms * (12 - i))) for i in range(12))
            s.sendall(raw)
        for c, s in enumerate(socks):
            f = s.makefile("rb")
            for i in range(12):
                r = read_response(f)
                assert r.status == 200 and r.body == b"/slow/%d-%d" % (c, i)
                assert r.header("Connection") is None  # kept alive
            f.close()
        # Still usable after the pipeline (keep-alive).
        for s in socks:
            s.sendall(get("/hello"))
            assert read_response(s.makefile("rb")).body == b"Hello, World!"
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_chunked_and_content_length_bodies_on_every_io_loop(wsgi: Serve, threads: int) -> None:
    w = wsgi(wsgi_apps.echo, threads=threads, io_threads=IO)
    socks = [w.connect() for _ in range(4)]
    try:
        for c, s in enumerate(socks):
            body = (b"%d-" % c) * 3000
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
                for i in range(0, len(body), 1000)
            )
            s.sendall(
                b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunks
                + b"0\r\n\r\n"
                + b"POST /l HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
            )
        for c, s in enumerate(socks):
            f = s.makefile("rb")
            for path in ("/c", "/l"):
                info = json.loads(read_response(f).body)
                assert info["PATH_INFO"] == path
                assert info["body"] == ((b"%d-" % c) * 3000).decode()
            f.close()
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_header_timeout_is_408_on_every_io_loop(wsgi: Serve, threads: int) -> None:
    w = wsgi(wsgi_apps.hello, threads=threads, io_threads=IO, header_timeout=0.3)
    assert w.server is not None
    slow = [w.connect() for _ in range(4)]
    try:
        wait_for(
            lambda: w.server is not None and sum(w.server.stats()["connections_per_loop"]) == 4
        )
        assert w.server.stats()["connections_per_loop"] == [2, 2]
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow")  # and nothing more
        # A normal client is served meanwhile.
        with w.connect() as s:
            s.sendall(get("/"))
            assert read_response(s.makefile("rb")).body == b"Hello, World!"
        for s in slow:
            f = s.makefile("rb")
            r = read_response(f)
            assert r.status == 408 and r.header("Connection") == "close"
            assert f.read() == b""
            f.close()
    finally:
        for s in slow:
            s.close()


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_keepalive_idle_close_on_every_io_loop(wsgi: Serve, threads: int) -> None:
    w = wsgi(wsgi_apps.hello, threads=threads, io_threads=IO, keepalive_timeout=0.3)
    socks = _connect(w, 4)
    try:
        for s in socks:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed quietly: no 408 between requests
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: w.connection_count() == 0)


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_file_wrapper_sendfile_on_every_io_loop(wsgi: Serve, threads: int) -> None:
    data = os.urandom(3 << 20)
    with tempfile.NamedTemporaryFile(prefix="cppnp-io-") as tmp:
        tmp.write(data)
        tmp.flush()

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [("Content-Length", str(len(data)))])
            return environ["wsgi.file_wrapper"](open(tmp.name, "rb"), 1 << 16)

        w = wsgi(app, threads=threads, io_threads=IO)
        socks = [w.connect() for _ in range(4)]
        try:
            for s in socks:
                s.sendall(get("/") * 2)
            for s in socks:
                f = s.makefile("rb")
                for _ in range(2):
                    r = read_response(f)
                    assert r.status == 200 and len(r.body) == len(data)
                    assert hashlib.sha256(r.body).digest() == hashlib.sha256(data).digest()
                f.close()
        finally:
            for s in socks:
                s.close()


# The send-timeout drop on an io loop: test_wsgi_load.py's
# test_client_that_stops_reading_is_dropped_after_the_send_timeout[io2].


@pytest.mark.parametrize("threads", ["0", "4"])
def test_large_response_to_a_slow_reader_keeps_rss_flat(threads: str) -> None:
    env = {}
    if "ASAN_OPTIONS" in os.environ:
        env["ASAN_OPTIONS"] = os.environ["ASAN_OPTIONS"] + ":quarantine_size_mb=4"
    srv = ServerProcess(
        "wsgi_apps:dispatch", "--threads", threads, "--io-threads", str(IO), env=env
    )
    try:
        base = peak = rss_kib(srv.proc.pid)
        total = 0
        size = 256 << 20
        with socket.create_connection(srv.address, timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(get("/big?mb=256"))
            # Nothing read for 1 s: the streaming app must wait, not buffer.
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                peak = max(peak, rss_kib(srv.proc.pid))
                time.sleep(0.1)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            last = time.monotonic()
            while total < size:
                n = s.recv_into(view)
                assert n, "EOF after %d bytes" % total
                total += n
                if time.monotonic() - last > 0.1:
                    peak = max(peak, rss_kib(srv.proc.pid))
                    last = time.monotonic()
        assert total == size
        grown_mib = (peak - base) / 1024
        assert grown_mib < 24, "server RSS grew by %.1f MiB while streaming" % grown_mib
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        code, err = srv.wait()
    assert code == 0, err


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_shutdown_drains_every_io_loop(wsgi: Serve, threads: int) -> None:
    entered = threading.Semaphore(0)
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"].startswith("/busy"):
            entered.release()
            # threads=0 blocks the io loop itself (as an app that blocks there would):
            # the drain must still finish it.
            release.wait(10)
        data = environ["PATH_INFO"].encode()
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return [data]

    w = wsgi(app, threads=threads, io_threads=IO, graceful_timeout=20)
    assert w.server is not None
    server = w.server
    busy = [w.connect() for _ in range(2 if threads == 0 else 4)]
    idle = _connect(w, 2)
    try:
        for i, s in enumerate(busy):
            s.sendall(get("/busy/%d" % i))
        # Every request is inside the app (one per io loop with threads=0).
        for _ in busy:
            assert entered.acquire(timeout=10)
        result: dict[str, bool] = {}
        drainer = threading.Thread(target=lambda: result.update(ok=server.shutdown(20)))
        drainer.start()
        for s in idle:
            s.settimeout(10)
            if threads:
                assert _closed_by_server(s)  # closed between requests, at once
        release.set()
        for i, s in enumerate(busy):
            f = s.makefile("rb")
            r = read_response(f)
            assert r.status == 200 and r.body == b"/busy/%d" % i
            if threads:
                assert r.header("Connection") == "close"
            # threads=0: the app held the io loop, so the response was made before that
            # loop saw the drain; the connection is closed right after it.
            assert f.read() == b""
            f.close()
        for s in idle:
            assert _closed_by_server(s)
        drainer.join(30)
        assert not drainer.is_alive() and result == {"ok": True}
        assert not server.accepting
    finally:
        release.set()
        for s in busy + idle:
            s.close()


def test_sigterm_drains_in_flight_requests_through_the_cli() -> None:
    marks = tempfile.mkdtemp(prefix="cppnp-wsgi-marks-")
    srv = ServerProcess(
        "wsgi_apps:dispatch",
        "--threads",
        "8",
        "--io-threads",
        str(IO),
        "--graceful-timeout",
        "20",
        env={"WSGI_MARK_DIR": marks},
    )
    busy = [socket.create_connection(srv.address, timeout=30) for _ in range(8)]
    idle = [socket.create_connection(srv.address, timeout=30) for _ in range(4)]
    try:
        for s in idle:
            s.sendall(get("/hello"))
            assert read_response(s.makefile("rb")).status == 200
        for i, s in enumerate(busy):
            s.sendall(get("/inflight/r%d?ms=700" % i))
        wait_for(lambda: len(os.listdir(marks)) == len(busy), timeout=20)
        srv.proc.send_signal(signal.SIGTERM)
        for i, s in enumerate(busy):
            f = s.makefile("rb")
            r = read_response(f)
            assert r.status == 200 and r.body == b"r%d %d" % (i, srv.proc.pid)
            assert r.header("Connection") == "close"
            assert f.read() == b""
            f.close()
        for s in idle:
            assert _closed_by_server(s)
        code, err = srv.wait()
        assert code == 0, err
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(srv.address, timeout=5).close()
    finally:
        srv.kill()
        for s in busy + idle:
            s.close()
        for name in os.listdir(marks):
            os.unlink(os.path.join(marks, name))
        os.rmdir(marks)


def test_io_threads_is_checked_and_documented() -> None:
    assert Config().io_threads == 0
    for bad in (-1, 1025, 1.5, "2"):
        with pytest.raises(ValueError, match="io_threads"):
            Config(io_threads=bad)  # type: ignore[arg-type]
    out = subprocess.run(
        [sys.executable, "-m", "cppnp.wsgi", "--help"], capture_output=True, text=True, timeout=60
    )
    text = " ".join(out.stdout.split())
    assert "--io-threads INT io loop threads" in text and "(default: 0)" in text
