"""Helpers for the WSGI server tests: a server in a loop thread, a raw HTTP/1.1 reader."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from conftest import call_in_loop, wait_for
from cppnp import EventLoop, EventLoopThread
from cppnp.wsgi import WsgiServer

HERE = os.path.dirname(os.path.abspath(__file__))
# The server's two modes: requests handled on the loop thread, or in a pool of 4.
MODES = [0, 4]
MODE_IDS = ["threads0", "threads4"]


class WsgiThread:
    """A WsgiServer for *app* on 127.0.0.1:0, its loop in a thread of its own."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.server: WsgiServer | None = None
        # CPPNP_TEST_IO_THREADS=N (conftest) serves every WSGI test with io_threads=N too.
        env_io = os.environ.get("CPPNP_TEST_IO_THREADS")
        if env_io:
            options.setdefault("io_threads", int(env_io))

        def init(loop: EventLoop) -> None:
            self.server = WsgiServer(loop, app, "127.0.0.1", 0, **options)
            self.server.start()

        self.thread = EventLoopThread(init, name="wsgi-loop")
        self.loop = self.thread.start()
        assert self.server is not None
        self.address: tuple[str, int] = self.server.address
        self.port = self.address[1]
        self.url = "http://127.0.0.1:%d" % self.port

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def connection_count(self) -> int:
        assert self.server is not None
        return int(call_in_loop(self.loop, lambda: self.server.connection_count))

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        return call_in_loop(self.loop, fn)

    def stop(self) -> None:
        assert self.server is not None
        if not self.loop.closed:
            call_in_loop(self.loop, self.server.stop)
        self.thread.stop()
        assert self.server.close(timeout=10.0), "worker threads did not exit"


Serve = Callable[..., WsgiThread]  # conftest's ``wsgi`` fixture


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ",".join(values) if values else None


def read_response(f: io.BufferedReader, head_request: bool = False) -> Response:
    """Read one response from *f* (sock.makefile('rb')); framing by the RFC 9112 rules."""
    line = f.readline(65536)
    if not line:
        raise EOFError("connection closed before a response")
    head = bytearray(line)
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    code, _, reason = rest.partition(" ")
    headers: list[tuple[str, str]] = []
    while True:
        h = f.readline(65536)
        head += h
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    resp = Response(int(code), reason, version, headers, b"", bytes(head))
    status = resp.status
    if head_request or status // 100 == 1 or status in (204, 304):
        return resp
    te = resp.header("Transfer-Encoding")
    cl = resp.header("Content-Length")
    if te is not None:
        assert te.lower() == "chunked", te
        resp.chunked = True
        body = bytearray()
        while True:
            size_line = f.readline(1024)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:
                    t = f.readline(65536)
                    if t in (b"\r\n", b""):
                        break
                    name, _, value = t.decode("latin-1").partition(":")
                    resp.trailers.append((name, value.strip()))
                break
            body += f.read(size)
            assert f.read(2) == b"\r\n"
        resp.body = bytes(body)
    elif cl is not None:
        resp.body = f.read(int(cl))
    else:
        resp.body = f.read()
    return resp


def exchange(
    address: tuple[str, int],
    raw: bytes,
    count: int = 1,
    timeout: float = 10.0,
    head_request: bool = False,
    probe: bool = True,
) -> tuple[list[Response], bool]:
    """Send *raw*, read *count* responses; return them and whether the server then
    closed the connection.  Decided without timing: a probe request is sent; an open
    connection answers it, a closed one gives EOF (or a reset)."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(raw)
        f = s.makefile("rb")
        out = [read_response(f, head_request) for _ in range(count)]
        if not probe:
            f.close()
            return out, False
        try:
            s.sendall(b"GET /?probe=1 HTTP/1.1\r\nHost: probe\r\n\r\n")
            closed = f.read(1) == b""
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        f.close()
        return out, closed


def one(address: tuple[str, int], raw: bytes, **kw: Any) -> Response:
    """Send *raw* on a new connection and read one response."""
    return exchange(address, raw, probe=False, **kw)[0][0]


def get(path: str = "/", host: str = "t", extra: str = "", version: str = "1.1") -> bytes:
    return ("GET %s HTTP/%s\r\nHost: %s\r\n%s\r\n" % (path, version, host, extra)).encode("latin-1")


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class ServerProcess:
    """``python -m cppnp.wsgi MODULE:app`` in a child process (apps in tests/wsgi_apps.py)."""

    def __init__(self, app: str, *args: str, env: dict[str, str] | None = None) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        environ = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if env:
            environ.update(env)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cppnp.wsgi",
                app,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=HERE,
        )
        self.address = ("127.0.0.1", self.port)

        def up() -> bool:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                socket.create_connection(self.address, timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, timeout=20)

    def wait(self, timeout: float = 30.0) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError("server did not exit: %s" % err.decode()) from None
        return self.proc.returncode, err.decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def now() -> float:
    return time.monotonic()
