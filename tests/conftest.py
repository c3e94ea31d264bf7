"""Shared fixtures: a loop in its own thread, servers on 127.0.0.1:0, and a teardown
accounting check (no connection, Buffer, fd or thread left behind)."""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import cppnp
from cppnp import EventLoop, EventLoopThread, TcpServer


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005) -> Any:
    """Poll *pred* until it is truthy; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s: %r" % (timeout, pred))
        time.sleep(interval)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly *n* bytes (fewer only if the peer closes first)."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_until_eof(sock: socket.socket, limit: int = 256 << 20) -> bytes:
    """Everything until EOF; a reset after some data ends the read too."""
    out = bytearray()
    while len(out) <= limit:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("more than %d bytes before EOF" % limit)


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER (1, 0): the peer gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def call_in_loop(loop: EventLoop, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run *fn* on the loop thread and return its result (or raise its exception)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller
            box["error"] = exc
        finally:
            done.set()

    loop.queue_in_loop(run)
    assert done.wait(timeout), "loop did not run the functor"
    if "error" in box:
        raise box["error"]
    return box.get("value")


class ServerThread:
    """A TcpServer with *handler* on an EventLoop in its own thread."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self.handler = handler
        self.server: TcpServer | None = None

        def init(loop: EventLoop) -> None:
            self.server = TcpServer(loop, ("127.0.0.1", 0), handler, **kwargs)
            self.server.start()

        self.thread = EventLoopThread(init, name="test-loop")
        self.loop = self.thread.start()
        assert self.server is not None
        self.address = self.server.address
        # With io_threads > 0 the connections live on the io loops (kept here: the server
        # forgets them once stopped); serving_loops are the loops connections run on.
        self.io_loops: list[EventLoop] = list(self.server.io_loops)
        self.serving_loops: list[EventLoop] = self.io_loops or [self.loop]
        self.serving_thread_ids = {lp.thread_id for lp in self.serving_loops}

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.create_connection(self.address, timeout=timeout)
        return s

    def stats(self) -> dict[str, Any]:
        """The loop's counters, summed over the io loops too (io_threads > 0)."""
        total = dict(self.loop.stats())
        for lp in self.io_loops:
            for key, value in lp.stats().items():
                total[key] += value
        return total

    def connection_count(self) -> int:
        assert self.server is not None
        return int(call_in_loop(self.loop, lambda: self.server.connection_count))

    def stop(self) -> None:
        if self.server is not None and not self.loop.closed:
            call_in_loop(self.loop, self.server.stop)
        self.thread.stop()


# io_threads for the servers the `serve` fixture makes.  The server tests of these files
# run twice, with io_threads 0 and 2 (ids io0, io2); CPPNP_TEST_IO_THREADS=N runs every
# `serve` test of the suite with io_threads=N instead.  A test that passes io_threads to
# serve() keeps its own value.
IO_THREADS_MODULES = frozenset(
    {"test_tcp_server.py", "test_tcp_connection.py", "test_lifetime.py", "test_stress.py"}
)
IO_THREADS_ENV = "CPPNP_TEST_IO_THREADS"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "io_threads" not in metafunc.fixturenames or os.environ.get(IO_THREADS_ENV):
        return
    if metafunc.definition.get_closest_marker("single_loop"):
        return  # it orders events within one loop iteration: io_threads 0 only
    if os.path.basename(str(metafunc.definition.fspath)) in IO_THREADS_MODULES:
        metafunc.parametrize("io_threads", [0, 2], ids=["io0", "io2"])


@pytest.fixture
def io_threads(request: pytest.FixtureRequest) -> int:
    """The io_threads of the servers `serve` makes (see IO_THREADS_MODULES)."""
    if hasattr(request, "param"):
        return int(request.param)
    if request.node.get_closest_marker("single_loop"):
        return 0
    return int(os.environ.get(IO_THREADS_ENV) or 0)


@pytest.fixture
def serve(io_threads: int) -> Iterator[Callable[..., ServerThread]]:
    """serve(handler, **TcpServer kwargs) -> ServerThread; stopped at teardown."""
    started: list[ServerThread] = []

    def make(handler: Any, **kwargs: Any) -> ServerThread:
        kwargs.setdefault("io_threads", io_threads)
        st = ServerThread(handler, **kwargs)
        started.append(st)
        return st

    yield make
    for st in started:
        st.stop()


@pytest.fixture
def ledger(caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """The fault suite's accounting check (faults_support.Ledger)."""
    from faults_support import ledger_fixture

    yield from ledger_fixture(caplog)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends with no connection, Buffer, fd or thread left behind."""
    gc.collect()
    fds = fd_count()
    threads = threading.active_count()
    conns = cppnp.live_connections()
    bufs = cppnp.live_buffers()
    yield
    if request.node.get_closest_marker("no_leak_check"):
        return

    def settled() -> bool:
        gc.collect()
        return (
            fd_count() <= fds
            and threading.active_count() <= threads
            and cppnp.live_connections() <= conns
            and cppnp.live_buffers() <= bufs
        )

    deadline = time.monotonic() + 5
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fd_count() <= fds, "fds leaked: %d -> %d" % (fds, fd_count())
    assert threading.active_count() <= threads, "threads leaked: %s" % threading.enumerate()
    assert cppnp.live_connections() <= conns, "TcpConnection objects leaked"
    assert cppnp.live_buffers() <= bufs, "Buffer objects leaked"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_leak_check: skip the teardown accounting check")
    config.addinivalue_line(
        "markers", "single_loop: a serve() test that needs every connection on one loop"
    )
