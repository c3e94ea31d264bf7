"""The WSGI server under load: slowloris, 10,000 keep-alive connections, a 1 GB streamed
response to a slow reader (RSS stays flat), the send timeout, SIGTERM under load, --help."""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

import wsgi_apps
from conftest import wait_for
from cppnp.wsgi import Config
from wsgi_support import Serve, ServerProcess, get, read_response, rss_kib


def test_slowloris_does_not_stop_normal_clients(
    wsgi: Serve, nofile_limit: Callable[[int], None]
) -> None:
    n = 1000
    nofile_limit(2 * n + 500)
    w = wsgi(wsgi_apps.hello, threads=4, header_timeout=3.0)
    attackers: list[socket.socket] = []
    served: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def normal_client() -> None:
        # New connections and keep-alive requests, all the time the attack lasts.
        try:
            while not stop.is_set():
                with socket.create_connection(w.address, timeout=10) as s:
                    f = s.makefile("rb")
                    for _ in range(5):
                        t0 = time.monotonic()
                        s.sendall(get())
                        assert read_response(f).body == b"Hello, World!"
                        served.append(time.monotonic() - t0)
                    f.close()
        except BaseException as exc:
            errors.append(exc)

    try:
        for _ in range(n):
            s = socket.create_connection(w.address, timeout=10)
            s.setblocking(False)
            attackers.append(s)
        wait_for(lambda: w.connection_count() >= n)
        client = threading.Thread(target=normal_client)
        client.start()
        request = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100
        sel = selectors.DefaultSelector()
        for s in attackers:
            sel.register(s, selectors.EVENT_READ)
        data: dict[socket.socket, bytes] = {}
        done: set[socket.socket] = set()
        # One byte per connection per second until the server answers it; the header
        # timeout (3 s) answers each with 408 and closes it.
        t0 = time.monotonic()
        next_byte = t0
        sent = 0
        while len(done) < n and time.monotonic() - t0 < 20:
            if time.monotonic() >= next_byte and sent < len(request):
                for s in attackers:
                    if s not in data:
                        s.send(request[sent : sent + 1])
                sent += 1
                next_byte += 1.0
            for key, _ in sel.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    chunk = b""
                data[sock] = data.get(sock, b"") + chunk
                if not chunk:
                    sel.unregister(sock)
                    done.add(sock)
        answered = sum(
            1 for v in data.values() if v.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        )
        assert 2 <= sent <= 6
        sel.close()
        stop.set()
        client.join(30)
        assert not errors, errors
        assert answered == n
        assert len(served) >= 20, "normal clients were starved: %d requests" % len(served)
    finally:
        stop.set()
        for s in attackers:
            s.close()
    wait_for(lambda: w.connection_count() == 0, timeout=30)


def socket_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return n


def test_10000_keep_alive_connections_held(nofile_limit: Callable[[int], None]) -> None:
    n = 10_000
    nofile_limit(n + 500)  # the clients here; the server, a child, has its own fds
    srv = ServerProcess(
        "wsgi_apps:pid", "--threads", "4", "--keepalive-timeout", "120", "--backlog", "4096"
    )
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(n):
            s = socket.create_connection(srv.address, timeout=30)
            s.sendall(get())
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, i)
        expected = str(srv.proc.pid).encode()
        for rnd in range(2):
            got: dict[int, bytes] = {}
            deadline = time.monotonic() + 60
            while len(got) < n and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    i = key.data
                    chunk = socks[i].recv(4096)
                    assert chunk, "connection %d closed" % i
                    got[i] = got.get(i, b"") + chunk
            assert len(got) == n
            assert all(v.endswith(b"\r\n\r\n" + expected) for v in got.values())
            # Every connection is still open in the server (plus its listener).
            assert socket_fds(srv.proc.pid) >= n + 1
            if rnd == 0:
                for s in socks:  # a second request on each of them
                    s.sendall(get())
    finally:
        sel.close()
        for s in socks:
            s.close()
        srv.proc.send_signal(signal.SIGTERM)
        code, err = srv.wait(60)
    assert code == 0, err


@pytest.mark.parametrize("threads", ["0", "4"])
def test_1gb_streamed_to_a_slow_reader_keeps_rss_flat(threads: str) -> None:
    # Under scripts/sanitize.sh, ASan's quarantine would hold on to every freed block (256
    # MiB by default): keep it small so RSS measures what the server holds.
    env = {}
    if "ASAN_OPTIONS" in os.environ:
        env["ASAN_OPTIONS"] = os.environ["ASAN_OPTIONS"] + ":quarantine_size_mb=4"
    srv = ServerProcess("wsgi_apps:dispatch", "--threads", threads, "--send-timeout", "60", env=env)
    try:
        base = rss_kib(srv.proc.pid)
        peak = base
        total = 0
        with socket.create_connection(srv.address, timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(get("/big?mb=1024"))
            # First the slow part: nothing read for 1.5 s, then 64 KiB every 50 ms for
            # 1.5 s; the server must wait, not buffer.
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                peak = max(peak, rss_kib(srv.proc.pid))
                time.sleep(0.1)
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Length: %d\r\n" % (1 << 30) in head
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                total += s.recv_into(view[:65536])
                peak = max(peak, rss_kib(srv.proc.pid))
                time.sleep(0.05)
            # Then read the rest as fast as we can, sampling the server's RSS.
            last = time.monotonic()
            while total < 1 << 30:
                n = s.recv_into(view)
                assert n, "EOF after %d bytes" % total
                total += n
                if time.monotonic() - last > 0.1:
                    peak = max(peak, rss_kib(srv.proc.pid))
                    last = time.monotonic()
            assert buf[0] == 0xAB
        assert total == 1 << 30
        grown_mib = (peak - base) / 1024
        print("server RSS: %.1f MiB at start, +%.1f MiB at most" % (base / 1024, grown_mib))
        assert grown_mib < 24, "server RSS grew by %.1f MiB while streaming 1 GiB" % grown_mib
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        code, err = srv.wait()
    assert code == 0, err


@pytest.mark.parametrize("io_threads", [0, 2], ids=["io0", "io2"])
def test_client_that_stops_reading_is_dropped_after_the_send_timeout(
    wsgi: Serve, io_threads: int
) -> None:
    w = wsgi(
        wsgi_apps.dispatch, threads=1, send_timeout=1.0, send_buffer=1 << 16, io_threads=io_threads
    )
    with socket.create_connection(w.address, timeout=10) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(get("/stream?size=100000000&chunk=65536"))
        time.sleep(0.2)
        # The only worker is held by the stalled client; after the send timeout it is
        # dropped and the worker serves the next client.
        with socket.create_connection(w.address, timeout=15) as s:
            s.sendall(get("/hello"))
            assert read_response(s.makefile("rb")).body == b"Hello, World!"
        # Dropped with a reset: the kernel does not go on delivering what was queued.
        stalled.settimeout(10)
        with pytest.raises(ConnectionResetError):
            for _ in range(10_000):
                if not stalled.recv(1 << 16):
                    break
    wait_for(lambda: w.connection_count() == 0)


def test_sigterm_under_load_finishes_in_flight_requests() -> None:
    srv = ServerProcess("wsgi_apps:dispatch", "--threads", "8", "--graceful-timeout", "20")
    try:
        # 16 requests in flight (each blocks 500 ms in the app), 8 idle keep-alive clients.
        busy = [socket.create_connection(srv.address, timeout=30) for _ in range(16)]
        idle = [socket.create_connection(srv.address, timeout=30) for _ in range(8)]
        for s in idle:
            s.sendall(get("/hello"))
            assert read_response(s.makefile("rb")).status == 200
        for i, s in enumerate(busy):
            s.sendall(get("/slow/%d?ms=500" % i))
        time.sleep(0.2)  # the requests have arrived; most are in the app
        srv.proc.send_signal(signal.SIGTERM)
        for i, s in enumerate(busy):
            f = s.makefile("rb")
            r = read_response(f)
            assert r.status == 200 and r.body == b"/slow/%d" % i
            assert r.header("Connection") == "close"
            assert f.read() == b""
        for s in idle:
            assert s.recv(100) == b""  # closed between requests
        code, err = srv.wait()
        assert code == 0, err
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(srv.address, timeout=5).close()
    finally:
        srv.kill()
        for s in busy + idle:
            s.close()


def test_help_documents_every_flag_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cppnp.wsgi", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=dict(os.environ, COLUMNS="200"),
    ).stdout
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)]
    for flag in [*flags, "--processes"]:
        if flag == "--extra":
            continue
        # The flag's entry: its line and the help lines indented under it.
        lines = out.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(flag))
        entry = [lines[start]]
        for ln in lines[start + 1 :]:
            if ln.startswith("  -") or not ln.startswith("    "):
                break
            entry.append(ln)
        assert "(default: " in " ".join(entry), entry
    assert "--host" in out and "--port" in out and "module:attr" in out
