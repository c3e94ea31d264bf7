"""Shared fixtures: a loop in its own thread, servers on 127.0.0.1:0, and a teardown
accounting check (no connection, Buffer, fd or thread left behind)."""

from __future__ import annotations

import gc
import logging
import os
import resource
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import cppnp
from cppnp import EventLoop, EventLoopThread, TcpServer, ThreadPool
from handlers import serve_in_thread

TIMEOUT = 20.0
# Where a pool applies, a case runs in single-thread mode and in pool mode.
POOL_SIZES = [0, 4]
POOL_IDS = ["single", "pool4"]


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


def recv_until_eof(sock: socket.socket, limit: int = 256 << 20, reset_ok: bool = True) -> bytes:
    """Everything until EOF; a reset after some data ends the read too (unless
    *reset_ok* is false: then the reset raises ConnectionResetError)."""
    out = bytearray()
    while len(out) <= limit:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            if not reset_ok:
                raise
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("more than %d bytes before EOF" % limit)


def recv_to_eof(sock: socket.socket) -> bytes:
    """Everything until a FIN; a reset raises ConnectionResetError."""
    return recv_until_eof(sock, reset_ok=False)


def assert_all_dead(refs: dict[int, weakref.ref[Any]], timeout: float = 3.0) -> None:
    """Every connection object is gone once the pool is idle and gc has run (an idle
    worker or a queue must not keep the last connection it served alive)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        alive = [cid for cid, r in refs.items() if r() is not None]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert alive == [], "%d of %d connection objects still alive after release: %r" % (
        len(alive),
        len(refs),
        [refs[c]() for c in alive[:3]],
    )


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER (1, 0): the peer gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def capture(fn: Callable[[], Any], box: dict[str, Any]) -> None:
    """Call *fn*: its result goes to box["value"], or its exception to box["error"] (for
    another thread to pick up with handed_back)."""
    try:
        box["value"] = fn()
    except BaseException as exc:  # handed back to the caller
        box["error"] = exc


def handed_back(box: dict[str, Any]) -> Any:
    """What capture() stored: the exception is raised, else the value returned."""
    if "error" in box:
        raise box["error"]
    return box.get("value")


def call_in_loop(loop: EventLoop, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run *fn* on the loop thread and return its result (or raise its exception)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            capture(fn, box)
        finally:
            done.set()

    loop.queue_in_loop(run)
    assert done.wait(timeout), "loop did not run the functor"
    return handed_back(box)


def in_thread(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run *fn* in a new thread; return its result or raise its exception."""
    box: dict[str, Any] = {}
    t = threading.Thread(target=capture, args=(fn, box))
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "thread did not finish"
    return handed_back(box)


def cppnp_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records of the cppnp loggers at ERROR or above."""
    return [r for r in caplog.records if r.name.startswith("cppnp") and r.levelno >= logging.ERROR]


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    """An EventLoop owned by the test's thread (closed at teardown)."""
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def loop_thread() -> Iterator[EventLoop]:
    """An EventLoop running in its own thread (stopped and closed at teardown)."""
    lt = EventLoopThread(name="test-loop-thread")
    lp = lt.start()
    try:
        yield lp
    finally:
        lt.stop()


@pytest.fixture(params=POOL_SIZES, ids=POOL_IDS)
def nthreads(request: pytest.FixtureRequest) -> int:
    """The pool size: 0 (single-thread mode) and 4."""
    return int(request.param)


@pytest.fixture
def make_pool() -> Any:
    """make_pool(n, **kw) -> a started ThreadPool, stopped (and joined) at teardown."""
    pools: list[ThreadPool] = []

    def make(n: int, start: bool = True, **kw: Any) -> ThreadPool:
        pool = ThreadPool(n, **kw)
        pools.append(pool)
        if start:
            pool.start()
        return pool

    yield make
    for pool in pools:
        assert pool.stop(drain=False, timeout=TIMEOUT), "pool workers did not exit"


class ServerThread:
    """A TcpServer with *handler* on an EventLoop in its own thread."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self.handler = handler
        self.server: TcpServer | None
        self.thread, self.loop, self.server = serve_in_thread(handler, **kwargs)
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


def stopped_at_teardown(factory: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Body of a factory fixture: yields *factory*; everything it made is stopped after."""
    started: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        obj = factory(*args, **kwargs)
        started.append(obj)
        return obj

    yield make
    for obj in started:
        obj.stop()


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

    def make(handler: Any, **kwargs: Any) -> ServerThread:
        kwargs.setdefault("io_threads", io_threads)
        return ServerThread(handler, **kwargs)

    yield from stopped_at_teardown(make)


@pytest.fixture
def nofile_limit() -> Iterator[Callable[[int], None]]:
    """ensure(n): raise RLIMIT_NOFILE to at least n (restored afterwards).

    A hard limit below n is raised too, which needs root (CI runs as root); otherwise
    setrlimit raises and the test fails with that reason rather than passing unchecked.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(n: int) -> None:
        if soft >= n:
            return
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= n else n
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, new_hard))

    yield ensure
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def wsgi() -> Iterator[Callable[..., Any]]:
    """wsgi(app, **options) -> wsgi_support.WsgiThread; stopped at teardown."""
    from wsgi_support import WsgiThread

    yield from stopped_at_teardown(WsgiThread)


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
