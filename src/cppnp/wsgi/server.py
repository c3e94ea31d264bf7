"""WsgiServer: an HTTP/1.1 WSGI server on a cppnp EventLoop (+ ThreadPool), and serve().

The seed's design: the loop thread does all socket I/O and HTTP parsing; the app runs on a
ThreadPool worker (one task per request, keyed by the connection); the response goes back
to the loop, which writes it.  ``threads=0`` runs the app on the loop thread.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from cppnp import EventLoop, ICppnpUsr, TcpConnection, TcpServer, ThreadPool
from cppnp.wsgi.config import Config
from cppnp.wsgi.environ import make_base_environ
from cppnp.wsgi.http import P_IDLE, P_NEW, HttpConn
from cppnp.wsgi.response import FileWrapper

__all__ = ["WsgiServer", "serve"]

log = logging.getLogger("cppnp.wsgi")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


def _httptools() -> Any:
    try:
        import httptools
    except ImportError:
        raise ImportError(
            "cppnp.wsgi needs httptools (the llhttp parser): pip install 'cppnp[wsgi]'"
        ) from None
    return httptools


# The settings a connection's HttpConn and Exchange read through ``st.server`` on the hot
# path: each LoopState holds read-only copies of them.
_SETTINGS = (
    "app",
    "pool",
    "parser_errors",
    "max_request_line",
    "max_header_size",
    "max_headers",
    "max_body_size",
    "spool_threshold",
    "header_timeout",
    "keepalive_timeout",
    "body_timeout",
    "send_timeout",
    "send_buffer",
    "max_pipeline",
    "script_name",
    "access_log",
    "sendfile",
)


class LoopState:
    """What the connections of one loop share: their table, the clock and the Date line,
    the timeout sweep (a timer on that loop), the drain flag, and read-only copies of the
    server's settings.  A connection's ``HttpConn.server`` is the LoopState of the loop
    that owns it (the server's loop, or with ``io_threads`` its io loop).

    Written only by its loop's thread; workers only read single attributes (``now``,
    ``date_line``, ``date_end``, ``draining``, the settings) and queue work with
    ``loop.queue_in_loop``.
    """

    def __init__(self, server: WsgiServer, loop: EventLoop, tick: float) -> None:
        for name in _SETTINGS:
            setattr(self, name, getattr(server, name))
        self.wsgi = server
        self.loop = loop
        self.tick = tick
        self.conns: set[HttpConn] = set()
        self.now = loop.time()
        self._date_second = 0
        self.date_line = ""
        self.date_end = b""  # date_line + the blank line that ends a head, encoded
        self.update_date()
        self.draining = False
        self.timer: int | None = None
        # Per-loop lookup caches (http.py, response.py): on free-threaded CPython a lookup
        # in a dict with non-str keys locks the dict, so loops must not share them.
        self.keys: dict[bytes, str] = {}
        self.methods: dict[bytes, str] = {}
        self.targets: dict[bytes, tuple[str, str, str]] = {}
        self.heads: dict[Any, tuple[bytes, int | None, bool, bool]] = {}

    # Declared for mypy (set from _SETTINGS above).
    app: WsgiApp
    pool: ThreadPool | None
    parser_errors: tuple[type[BaseException], ...]
    max_request_line: int
    max_header_size: int
    max_headers: int
    max_body_size: int
    spool_threshold: int
    header_timeout: float
    keepalive_timeout: float
    body_timeout: float
    send_timeout: float
    send_buffer: int
    max_pipeline: int
    script_name: str
    access_log: bool
    sendfile: bool

    def update_date(self) -> None:
        """Refresh the Date line once a second.  Loop thread only."""
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self.date_line = "Date: " + email.utils.formatdate(second, usegmt=True)
            self.date_end = (self.date_line + "\r\n\r\n").encode("ascii")

    def begin_drain(self) -> None:
        """Graceful stop on this loop: close the connections between requests; the others
        close after their response.  Loop thread only."""
        self.draining = True
        for st in list(self.conns):
            if st.active is None and not st.ready and (st.phase == P_IDLE or st.phase == P_NEW):
                st.close()

    def forget(self) -> None:
        """Stop the sweep and drop the table (the server stopped: the connections are
        closing, and if the loop closes first nothing here should keep them alive).
        Loop thread only."""
        if self.timer is not None:
            self.loop.cancel_timer(self.timer)
            self.timer = None
        self.conns.clear()

    def sweep(self) -> None:
        """The timeout sweep (every tick): header, body, keep-alive and linger deadlines,
        and the send timeout.  Loop thread only."""
        now = self.now = self.loop.time()
        self.update_date()
        send_timeout = self.send_timeout
        # Deadlines were set from self.now, up to one tick stale: a deadline has surely
        # passed (by the full timeout) one tick after it.
        due = now - self.tick
        for st in list(self.conns):
            deadline = st.deadline
            if deadline and due >= deadline:
                st.on_deadline(now)
            conn = st.conn
            if conn.output_bytes:
                sent = conn.bytes_sent
                if sent != st.stall_bytes:
                    st.stall_bytes = sent
                    st.stall_since = now
                elif now - st.stall_since >= send_timeout:
                    log.info(
                        "%s: client stopped reading for %.3g s: dropped", conn.name, send_timeout
                    )
                    st.drop()
            elif st.stall_bytes != -1:
                st.stall_bytes = -1


class WsgiServer(ICppnpUsr):
    """Serve the WSGI application *app* on (host, port) with *loop*.

    ``threads`` (or ``config.threads``) workers run the app; 0 runs it on the loop thread
    that owns the connection.  Pass ``pool`` to share a ThreadPool (its lifecycle stays
    yours).  ``io_threads`` (``config.io_threads``, default 0): with N > 0, *loop* only
    accepts and N io loop threads (``TcpServer(io_threads=N)``) do the sockets and the
    HTTP parsing, each connection on one of them (the one with the fewest connections);
    each io loop keeps its own connection table and timeout sweep.  Other keyword
    arguments are Config fields (limits and timeouts).

    Lifecycle, the shape a prefork supervisor drives: ``start()``, ``stop_accepting()``,
    ``drain(timeout, on_done)`` (graceful), ``stop()`` (immediate), ``close()`` (join the
    pool), ``connection_count``, ``address``, ``stats()``.
    """

    def __init__(
        self,
        loop: EventLoop,
        app: WsgiApp,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        config: Config | None = None,
        pool: ThreadPool | None = None,
        name: str | None = None,
        unix: str | bytes | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        """Prepare the server (nothing is bound until start()).  *unix*: serve on this
        Unix socket path (or abstract name) instead of (host, port): a stale socket file
        is replaced, a live one refused, the file removed on stop.  Thread-safe."""
        httptools = _httptools()
        if config is None:
            config = Config(**options)
        elif options:
            config = dataclasses.replace(config, **options)
        if not callable(app):
            raise TypeError("app must be a WSGI callable, got %r" % (app,))
        self.cfg = config
        self.loop = loop
        self.app = app
        self._parser_cls = httptools.HttpRequestParser
        self.parser_errors = (httptools.HttpParserError, httptools.HttpParserUpgrade)
        self.unix = os.fspath(unix) if unix is not None else None
        self._tcp = TcpServer(
            loop,
            self.unix if self.unix is not None else (host, port),
            self,
            name=name
            or ("wsgi-unix:%s" % (os.fsdecode(self.unix),) if self.unix is not None else None)
            or "wsgi-%s:%d" % (host, port),
            reuse_port=config.reuse_port,
            backlog=config.backlog,
            io_threads=config.io_threads,
        )
        self._own_pool = pool is None
        if pool is None and config.threads > 0:
            pool = ThreadPool(config.threads, name="cppnp-wsgi")
        if pool is not None and pool.num_threads == 0:
            pool = None
        self.pool = pool
        # Copies of the configuration (each LoopState copies them again: _SETTINGS).
        self.max_request_line = config.max_request_line
        self.max_header_size = config.max_header_size
        self.max_headers = config.max_headers
        self.max_body_size = config.max_body_size
        self.spool_threshold = config.spool_threshold
        self.header_timeout = config.header_timeout
        self.keepalive_timeout = config.keepalive_timeout
        self.body_timeout = config.body_timeout
        self.send_timeout = config.send_timeout
        self.send_buffer = config.send_buffer
        self.max_pipeline = config.max_pipeline
        self.script_name = config.script_name
        self.access_log = config.access_log
        self.sendfile = config.sendfile
        self.draining = False
        self._base: dict[str, Any] = {}
        self._wildcard = False
        self._tick = min(1.0, max(0.02, config.min_timeout() / 4))
        # One LoopState per loop that serves connections, made on that loop's thread
        # (the server's loop: in start()).  _lock guards _loops, _live and the moves of
        # draining/_stopped that _add_loop must see consistently.
        self._lock = threading.Lock()
        self._loops: dict[EventLoop, LoopState] = {}
        self._main = LoopState(self, loop, self._tick)
        self._live = 0  # HttpConns between on_connection and on_close, over every loop
        self._drain_deadline = 0.0
        self._drain_done: Callable[[], Any] | None = None
        self._stopped = False
        self.requests = 0

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) after start() (a Unix socket server: see ``unix``).
        Thread-safe."""
        addr: tuple[str, int] = self._tcp.address
        return addr

    @property
    def connection_count(self) -> int:
        """Open connections.  Thread-safe."""
        return self._tcp.connection_count

    @property
    def accepting(self) -> bool:
        """Whether the listener is open.  Thread-safe."""
        return self._tcp.accepting

    @property
    def io_threads(self) -> int:
        """The number of io loop threads (0: the server's loop serves every connection).
        Thread-safe."""
        return self._tcp.io_threads

    @property
    def io_loops(self) -> list[EventLoop]:
        """The io loops while they run (``TcpServer.io_loops``).  Thread-safe."""
        return self._tcp.io_loops

    def stats(self) -> dict[str, Any]:
        """The listener's counters (``TcpServer.stats()``: ``accepted``,
        ``connections_per_loop``, ...).  Thread-safe."""
        return self._tcp.stats()

    def start(self) -> None:
        """Bind, listen, start the pool, the io loops and the timeout sweep.  Thread-safe."""
        if self.pool is not None:
            self.pool.start()
        self._tcp.start()
        if self.unix is not None:
            host, port = os.fsdecode(self.unix).replace("\0", "@"), 0
        else:
            host, port = self._tcp.address[:2]
        self._wildcard = host in ("", "0.0.0.0", "::")
        self._base = make_base_environ(
            server_name=socket.gethostname() if self._wildcard else host,
            server_port=port,
            script_name=self.cfg.script_name,
            url_scheme=self.cfg.url_scheme,
            multithread=self.pool is not None or self.cfg.io_threads > 0,
            multiprocess=bool(self.cfg.extra.get("multiprocess", False)),
            file_wrapper=FileWrapper,
        )
        if self.unix is not None:
            self._base["SERVER_PORT"] = ""  # no port: SERVER_NAME is the socket path
        main = self._main
        main.timer = self.loop.run_every(self._tick, self._sweep_main)
        with self._lock:
            self._loops[self.loop] = main

    def _add_loop(self, loop: EventLoop) -> LoopState:
        # On *loop*'s thread, its first connection: its table and its sweep.
        ls = LoopState(self, loop, self._tick)
        with self._lock:
            if self._stopped:
                return ls  # no sweep: stop() already ran (the connection is being closed)
            ls.draining = self.draining
            ls.timer = loop.run_every(self._tick, ls.sweep)
            self._loops[loop] = ls
        return ls

    def stop_accepting(self) -> None:
        """Close the listener; open connections carry on.  Thread-safe."""
        self._tcp.stop_accepting()

    def stop(self) -> None:
        """Stop at once: close the listener and force-close every connection (a response
        being computed is dropped when it comes back).  Thread-safe."""
        with self._lock:
            self._stopped = True
            states = list(self._loops.values())
        self._tcp.stop()
        for ls in states:
            if ls.loop.is_in_loop_thread():
                ls.forget()
            else:
                try:
                    ls.loop.run_in_loop(ls.forget)
                except RuntimeError:
                    pass  # that loop is closed: close() drops its table

    def drain(self, timeout: float | None = None, on_done: Callable[[], Any] | None = None) -> bool:
        """Graceful stop: stop accepting, close idle keep-alive connections, let requests
        in flight finish (each connection closes after its response), and after
        *timeout* seconds (default ``graceful_timeout``) force-close what is left.
        *on_done* runs on the loop thread once no connection is left.  With io_threads
        each io loop closes its own idle connections.

        Returns True once no connection is left (False when called from another thread:
        the drain is then queued to the loop).  Calling it again moves the deadline to
        *timeout* seconds from now: the prefork supervisor calls ``drain(seconds_left)``
        on every tick until it returns True.  Thread-safe.
        """
        if not self.loop.is_in_loop_thread():
            self.loop.run_in_loop(lambda: self.drain(timeout, on_done))
            return False
        if timeout is None:
            timeout = self.cfg.graceful_timeout
        self._drain_done = on_done
        self._drain_deadline = self.loop.time() + timeout
        if not self.draining:
            with self._lock:
                self.draining = True
                states = list(self._loops.values())
            self._tcp.stop_accepting()
            for ls in states:
                if ls is self._main:
                    ls.begin_drain()
                else:
                    try:
                        ls.loop.run_in_loop(ls.begin_drain)
                    except RuntimeError:
                        pass  # that io loop is closed: its connections are gone
        self._check_drained()
        return self._live_count() == 0

    def shutdown(self, timeout: float | None = None) -> bool:
        """Graceful stop from another thread: drain() and wait until no connection is
        left or *timeout* passed (then stop()).  Returns True if it drained in time.
        Not from the loop thread (the loop must run to drain).  Thread-safe.
        """
        if self.loop.is_in_loop_thread():
            raise RuntimeError(
                "WsgiServer.shutdown() would block the loop thread; use drain() there"
            )
        done = threading.Event()
        self.drain(timeout, done.set)
        wait = (timeout if timeout is not None else self.cfg.graceful_timeout) + 1.0
        # _live, not the listener's count: with io_threads an io loop's release reaches
        # the listener's table (on this loop) just after on_close, so it may lag.
        ok = done.wait(wait) and self._live_count() == 0
        if not ok:
            self.stop()
        return ok

    def close(self, timeout: float | None = 5.0) -> bool:
        """Stop, and stop and join the pool if the server made it (not from a worker).
        Returns True if every worker exited in time.  Thread-safe."""
        self.stop()
        with self._lock:
            closed = [ls for ls in self._loops.values() if ls.loop.closed]
        for ls in closed:
            ls.conns.clear()  # its thread has ended: nothing else touches it
        if self.pool is not None and self._own_pool:
            return bool(self.pool.stop(drain=False, timeout=timeout))
        return True

    def _live_count(self) -> int:
        with self._lock:
            return self._live

    def _check_drained(self) -> None:
        # The server's loop thread.
        if self.draining and self._drain_done is not None and self._live_count() == 0:
            done, self._drain_done = self._drain_done, None
            self.stop()
            done()

    # -- ICppnpUsr (the connection's loop thread) ---------------------------------------

    def on_connection(self, conn: TcpConnection) -> None:
        """A new connection: its HTTP state goes in conn.context.  Loop thread only."""
        loop = conn.loop
        ls = self._loops.get(loop)
        if ls is None:
            ls = self._add_loop(loop)
        base = self._base.copy()
        peer = conn.peer_address
        if isinstance(peer, tuple):  # not a Unix socket's peer (a path, usually "")
            base["REMOTE_ADDR"] = peer[0]
            base["REMOTE_PORT"] = str(peer[1])
        if self._wildcard:
            local = conn.local_address
            if isinstance(local, tuple):
                base["SERVER_NAME"] = local[0]
        st = HttpConn(ls, conn, base, self._parser_cls)
        conn.context = st
        ls.conns.add(st)
        with self._lock:
            self._live += 1
        if ls.draining:
            st.close()

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        """Bytes arrived: parse them.  Loop thread only."""
        # conn.context is the HttpConn from on_connection until on_close.
        conn.context.feed(buf.retrieve_all())

    def on_write_complete(self, conn: TcpConnection) -> None:
        """Output drained: resume a loop-side pump, wake a waiting worker.  Loop thread only."""
        st = conn.context
        if st is None:
            return
        pump = st.pump
        if pump is not None:
            st.pump = None
            pump()
        if st.want_drain and st.drained is not None:
            st.drained.set()

    def on_close(self, conn: TcpConnection) -> None:
        """The connection was released.  Loop thread only."""
        st = conn.context
        conn.context = None
        if st is None:
            return
        ls = st.server
        ls.conns.discard(st)
        st.on_closed()
        with self._lock:
            self._live -= 1
            left = self._live
        if left == 0 and ls.draining:
            if ls is self._main:
                self._check_drained()
            else:
                try:
                    self.loop.queue_in_loop(self._check_drained)
                except RuntimeError:
                    pass  # the server's loop is closed: nobody waits for the drain

    # -- timeouts -------------------------------------------------------------------------

    def _sweep_main(self) -> None:
        # The server's loop: its own connections (io_threads=0), and the drain deadline.
        self._main.sweep()
        if self.draining and self._drain_done is not None:
            if self._live_count() == 0:
                self._check_drained()
            elif self._main.now >= self._drain_deadline:
                log.warning(
                    "graceful stop: %d connection(s) still open after the timeout: closing them",
                    self._live_count(),
                )
                done, self._drain_done = self._drain_done, None
                self.stop()
                done()


def serve(
    app: WsgiApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    threads: int = 4,
    processes: int = 1,
    ready: Callable[[Any], Any] | None = None,
    unix: str | bytes | os.PathLike[str] | None = None,
    **options: Any,
) -> int:
    """Serve *app* on (host, port) until SIGTERM or SIGINT (a graceful stop: in-flight
    requests finish, within ``graceful_timeout``), in the calling thread.

    ``threads`` workers run the app (0: on the loop thread).  ``io_threads=N`` (a Config
    field, default 0) moves the sockets and the HTTP parsing to N io loop threads (the
    calling thread then only accepts); with ``threads=0`` the app runs on those io
    threads.  ``processes`` > 1 forks that
    many children with the prefork supervisor (:func:`cppnp.prefork.serve`): each runs
    its own loop, pool and WsgiServer on the same port (SO_REUSEPORT; the kernel spreads
    the connections), ``wsgi.multiprocess`` is True, a child that dies is restarted, and
    SIGTERM drains every child gracefully.  Port 0 with ``processes`` > 1 reserves a free
    port first.  Other keyword arguments are Config fields.

    *ready* is called once the server listens: with the WsgiServer in one process, with
    the :class:`cppnp.prefork.Supervisor` (``pids``, ``address``) with several.  Returns
    the exit status: 0 after a graceful stop (with several processes, 1 if a child had to
    be killed or exited with an error).  Raises :class:`cppnp.prefork.PreforkError` if a
    child cannot start (e.g. the address is in use).  Call it from the main thread to
    get the signal handling (required with several processes).

    *unix*: serve on this Unix socket path (or abstract name) instead of (host, port),
    in one process (ValueError with ``processes`` > 1).
    """
    if type(processes) is not int or processes < 1:
        raise ValueError("processes must be an int >= 1, got %r" % (processes,))
    if unix is not None and processes > 1:
        raise ValueError("unix= serves in one process: processes must be 1")
    if processes > 1:
        return _serve_prefork(app, host, port, threads, processes, ready, options)
    with EventLoop() as loop:
        server = WsgiServer(loop, app, host, port, threads=threads, unix=unix, **options)
        server.start()
        stopping: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            if stopping:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            stopping.append(signum)
            log.info(
                "signal %d: graceful stop (at most %.3g s)", signum, server.cfg.graceful_timeout
            )
            server.drain(None, loop.quit)

        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            log.info(
                "serving on %s with %s%s",
                "unix:%s" % (os.fsdecode(server.unix),)
                if server.unix is not None
                else "http://%s:%d" % (server.address[0], server.address[1]),
                "%d threads" % server.pool.num_threads
                if server.pool is not None
                else "the loop thread (threads=0)",
                ", %d io threads" % server.io_threads if server.io_threads else "",
            )
            if ready is not None:
                ready(server)
            loop.loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.close(timeout=1.0)
    return 0


def _serve_prefork(
    app: WsgiApp,
    host: str,
    port: int,
    threads: int,
    processes: int,
    ready: Callable[[Any], Any] | None,
    options: dict[str, Any],
) -> int:
    from cppnp.prefork import Supervisor, reserve_port
    from cppnp.prefork import serve as prefork_serve

    # Checked here, in the parent: a bad option is one clear error, not N failed children.
    config = Config(threads=threads, **options)
    config = dataclasses.replace(
        config, reuse_port=True, extra=dict(config.extra, multiprocess=True)
    )
    reserved = reserve_port(host, port) if port == 0 else None
    if reserved is not None:
        port = reserved.getsockname()[1]

    def make_server(loop: EventLoop) -> WsgiServer:
        return WsgiServer(loop, app, host, port, config=config)

    def on_ready(sup: Supervisor) -> None:
        h, p = (sup.address or [[host, port]])[0][:2]
        log.info(
            "serving on http://%s:%d with %d processes (pids %s), %s each",
            h,
            p,
            processes,
            " ".join(str(pid) for pid in sup.pids),
            "%d threads" % threads if threads else "the loop thread (threads=0)",
        )
        if config.io_threads:
            log.info("each process has %d io threads", config.io_threads)
        if ready is not None:
            ready(sup)

    try:
        return prefork_serve(
            make_server,
            processes=processes,
            drain_timeout=config.graceful_timeout,
            on_ready=on_ready,
        )
    finally:
        if reserved is not None:
            reserved.close()
