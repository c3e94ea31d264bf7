# cython: language_level=3, embedsignature=True
"""TcpServer: accepts TCP connections and hands them to a handler (ICppnpUsr)."""

cimport cython
from libc.stdint cimport uint32_t

from _core.event_loop cimport EventLoop
from _core.event_loop_pool cimport EventLoopThreadPool, IoLoop
from _core.includes.linux cimport (
    ECONNABORTED, EAGAIN, EINTR, EMFILE, ENFILE, EPOLLIN, EPROTO, EPERM,
    IPPROTO_TCP, O_CLOEXEC, O_RDONLY, SO_KEEPALIVE, SOL_SOCKET, TCP_NODELAY, close, open,
    sockaddr_storage,
)
from _core.includes.sys cimport (
    cppnp_atomic_load, cppnp_atomic_store, cppnp_counter_add, cppnp_monotonic,
    cppnp_relaxed_load, cppnp_relaxed_store,
)
from _core.socket_ops cimport accept_nonblocking, set_bool_opt
from _core.tcp_connection cimport (
    ConnectionOwner, TcpConnection, new_connection, resolve_handlers,
)

import logging
import os
import socket
import threading

cdef object _logger = logging.getLogger("cppnp")

# At most this many accepts per readable event, so a connection storm cannot starve the
# I/O of connections already open (the listener stays readable: level-triggered).
DEF MAX_ACCEPTS_PER_EVENT = 256
# Seconds the listener rests after an accept error that would otherwise repeat at once.
DEF ACCEPT_RETRY_DELAY = 0.1
# The most io loop threads a server takes (a sanity bound, far above any core count here).
DEF MAX_IO_THREADS = 1024


@cython.auto_pickle(False)
@cython.final
cdef class TcpServer(ConnectionOwner):
    """Listens on *address* and serves each accepted connection with *handler*.

    *handler* is an ICppnpUsr (or any object with some of its methods): the server calls
    ``on_connection``, ``on_message``, ``on_write_complete``, ``on_high_water_mark`` and
    ``on_close`` on the connection's loop thread.  One handler object serves every
    connection; keep per-connection state in ``conn.context``.

    ``io_threads=N`` (muduo's ``setThreadNum``): with 0 (the default) *loop* accepts and
    serves every connection.  With N > 0, start() starts N more EventLoops, each in its
    own thread; *loop* only accepts, and each new connection is given to the io loop with
    the fewest connections (ties: round-robin).  All the connection's I/O, callbacks,
    timers and write-complete then run on that loop for its whole life (``conn.loop``), so
    the handler is called from N threads at once: guard state shared between connections.
    stop() and the base loop's close() quit and join the io threads (stop() once the last
    connection is released).
    """

    def __cinit__(self):
        self.fd = -1
        self._idle_fd = -1
        self._connections = {}
        self._lock = threading.Lock()

    def __init__(self, EventLoop loop not None, address, handler, *, name=None,
                 bint reuse_port=False, backlog=1024, bint tcp_nodelay=True,
                 bint keepalive=False, io_threads=0):
        """Prepare a server on (host, port); port 0 picks a free port (see ``address``).

        *io_threads*: an int >= 0, the number of io loop threads (see the class
        docstring; 0 serves everything on *loop*).  Nothing is bound and no thread is
        started until start().  ``__init__`` runs once: calling it again raises
        RuntimeError.  Thread-safe to construct.
        """
        if self._initialized:
            raise RuntimeError("TcpServer.__init__ called twice: a server is initialised "
                               "once (make a new TcpServer)")
        if not isinstance(address, tuple) or len(address) != 2:
            raise TypeError("address must be a (host, port) tuple, got %r" % (address,))
        host, port = address
        if not isinstance(host, str):
            raise TypeError("host must be a str, got %r" % (type(host).__name__,))
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError("port must be an int, got %r" % (type(port).__name__,))
        if not 0 <= port <= 65535:
            raise ValueError("port must be in 0..65535, got %d" % port)
        if not isinstance(backlog, int) or isinstance(backlog, bool):
            raise TypeError("backlog must be an int, got %r" % (type(backlog).__name__,))
        if backlog < 1:
            raise ValueError("backlog must be >= 1, got %d" % backlog)
        if handler is None:
            raise TypeError("handler must be an ICppnpUsr (or an object with its methods)")
        if not isinstance(io_threads, int) or isinstance(io_threads, bool):
            raise TypeError("io_threads must be an int, got %r" % (type(io_threads).__name__,))
        if not 0 <= io_threads <= MAX_IO_THREADS:
            raise ValueError("io_threads must be in 0..%d (0: serve on the server's loop), "
                             "got %d" % (MAX_IO_THREADS, io_threads))
        self._io_threads = io_threads
        self._loop = loop
        self._address = (host, port)
        self._handler = handler
        self._handlers = resolve_handlers(handler)
        self.name = name if name is not None else "TcpServer-%s:%d" % (host, port)
        self._reuse_port = reuse_port
        self._backlog = backlog
        self._tcp_nodelay = tcp_nodelay
        self._keepalive = keepalive
        self._initialized = True

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        if self._idle_fd >= 0:
            close(self._idle_fd)

    def __repr__(self):
        return "<TcpServer %s %s connections=%d>" % (
            self.name, self._bound or self._address, self.connection_count)

    @property
    def address(self):
        """The bound (host, port) after start() (the real port if 0 was asked), else the
        requested address.  Thread-safe."""
        bound = self._bound
        if bound is not None:
            return bound[:2]
        return self._address

    @property
    def loop(self):
        """The EventLoop the server runs on.  Thread-safe."""
        return self._loop

    @property
    def handler(self):
        """The handler given to the constructor.  Thread-safe."""
        return self._handler

    @property
    def connection_count(self):
        """How many connections are open (accepted and not yet released).  Thread-safe."""
        return cppnp_relaxed_load(&self._n_connections)

    @property
    def accepted(self):
        """Connections accepted so far.  Thread-safe."""
        return cppnp_relaxed_load(&self._accepted)

    @property
    def accept_errors(self):
        """accept() failures (the peer gave up, out of fds or memory).  Thread-safe."""
        return cppnp_relaxed_load(&self._accept_errors)

    @property
    def shed_connections(self):
        """Connections accepted and closed at once because fds ran out.  Thread-safe."""
        return cppnp_relaxed_load(&self._shed_connections)

    @property
    def io_threads(self):
        """The number of io loop threads asked for (0: the server's loop serves all).

        Thread-safe.
        """
        return self._io_threads

    @property
    def io_loops(self):
        """The io loops (EventLoop), in thread order, while they run: from start() until
        stop() has released the last connection (or the server's loop closed); else an
        empty list.  Thread-safe."""
        cdef EventLoopThreadPool pool
        with cython.critical_section(self):
            pool = self._pool
        return pool.loops if pool is not None else []

    def stats(self):
        """Return a dict of the server's counters (a snapshot).

        ``connections_per_loop``: open connections on each io loop in thread order, or
        ``[connection_count]`` with ``io_threads=0``.  Thread-safe.
        """
        cdef EventLoopThreadPool pool
        with cython.critical_section(self):
            pool = self._pool
        n = cppnp_relaxed_load(&self._n_connections)
        return {
            "connections": n,
            "accepted": self.accepted,
            "accept_errors": self.accept_errors,
            "shed_connections": self.shed_connections,
            "io_threads": self._io_threads,
            "connections_per_loop": pool.connection_counts() if pool is not None
            else ([] if self._io_threads else [n]),
        }

    def connections(self):
        """Return a list of the open connections.  Loop thread only."""
        self._check_created()
        self._loop.assert_in_loop_thread("TcpServer.connections()")
        return list(self._connections.values())

    cdef int _check_created(self) except -1:
        if self._loop is None:
            raise RuntimeError("TcpServer.__init__ was not called")
        return 0

    def start(self):
        """Bind and listen now (errors raise here), and start accepting on the loop.

        Calling it twice is harmless.  Thread-safe.
        """
        self._check_created()
        with self._lock:
            state = cppnp_atomic_load(&self._state)
            if state == SERVER_NOT_ACCEPTING or state == SERVER_STOPPED:
                raise RuntimeError("a stopped TcpServer cannot be restarted")
            if state == SERVER_STARTED:
                return
            if self._loop.closed:
                raise RuntimeError("TcpServer.start() on a closed EventLoop")
            host, port = self._address
            infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(sockaddr)
                sock.listen(self._backlog)
                sock.setblocking(False)
                self._bound = sock.getsockname()
                if self._io_threads:
                    pool = EventLoopThreadPool(self._loop, self._io_threads, self.name)
                    pool.start(self)
                    with cython.critical_section(self):
                        self._pool = pool
                self._loop.attach(self)
            except BaseException:
                sock.close()
                self._stop_io_loops()
                raise
            self.fd = sock.detach()
            cppnp_atomic_store(&self._listening, 1)
            # Without a spare fd (-1) the acceptor rests instead of shedding on EMFILE.
            self._idle_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
            cppnp_atomic_store(&self._state, SERVER_STARTED)
        if self._loop.in_loop_thread():
            self._listen_in_loop()
        else:
            self._loop.queue(self, 1)

    cdef int _listen_in_loop(self) except -1:
        if self.fd >= 0 and cppnp_atomic_load(&self._state) == SERVER_STARTED \
                and not self._paused:
            self._loop.update_channel(self, EPOLLIN)
        return 0

    def stop(self):
        """Stop listening and force-close every open connection.

        Connections with ThreadPool tasks in flight are released when those finish; once
        the last one is, the loop forgets the server.  Idempotent; start() raises after it.

        Thread-safe.
        """
        self._check_created()
        with self._lock:
            if cppnp_atomic_load(&self._state) == SERVER_STOPPED:
                return
            cppnp_atomic_store(&self._state, SERVER_STOPPED)
        if self._loop.in_loop_thread() or self._loop.closed:
            self._stop_in_loop()
        else:
            self._loop.queue(self, 2)

    def stop_accepting(self):
        """Close the listening socket; open connections carry on (a graceful stop's first
        step: stop accepting, let in-flight work finish, then stop()).

        After it, ``accepting`` is False, ``connection_count`` tells what is left, and
        start() raises; once the last connection is released the loop forgets the
        server.

        Thread-safe.
        """
        self._check_created()
        with self._lock:
            state = cppnp_atomic_load(&self._state)
            if state == SERVER_NOT_ACCEPTING or state == SERVER_STOPPED:
                return
            cppnp_atomic_store(&self._state, SERVER_NOT_ACCEPTING)
        if self._loop.in_loop_thread() or self._loop.closed:
            self._close_listener()
        else:
            self._loop.queue(self, 3)

    @property
    def accepting(self):
        """Whether the listening socket is open: from start() until the loop has closed
        it after stop() or stop_accepting() (then a connect is refused).

        Thread-safe.
        """
        return cppnp_atomic_load(&self._listening) != 0

    cdef int _close_listener(self) except -1:
        """Close the listener and the spare fd, cancel an accept retry, and detach if no
        connection is left (loop thread, or any thread once the loop is closed)."""
        with self._lock:
            if self.fd >= 0:
                self._loop.remove_channel(self)
                close(self.fd)
                self.fd = -1
                cppnp_atomic_store(&self._listening, 0)
            if self._idle_fd >= 0:
                close(self._idle_fd)
                self._idle_fd = -1
        if self._retry_timer:
            self._loop.cancel_timer(self._retry_timer)
            self._retry_timer = 0
        self._paused = False
        self._maybe_detach()
        return 0

    cdef int _maybe_detach(self) except -1:
        if self.fd < 0 and not self._connections \
                and cppnp_atomic_load(&self._state) >= SERVER_NOT_ACCEPTING:
            self._loop.detach(self)
            self._stop_io_loops()
        return 0

    cdef int _stop_io_loops(self) except -1:
        """Quit and join the io loop threads (no-op without them, or once done)."""
        cdef EventLoopThreadPool pool
        with cython.critical_section(self):     # stats() reads it from other threads
            pool = self._pool
            self._pool = None
        if pool is not None:
            pool.stop()
        return 0

    cdef int _stop_in_loop(self) except -1:
        if self._pool is not None:
            self._pool.close_all()      # before the table is read: see IoLoop.run_functor
        self._close_listener()
        if not self._loop.closed:
            for conn in list(self._connections.values()):
                conn.force_close()
        return 0

    cdef int run_functor(self, object arg) except -1:
        if arg == 1:
            self._listen_in_loop()
        elif arg == 2:
            self._stop_in_loop()
        elif arg == 3:
            self._close_listener()
        return 0

    cdef int handle_event(self, uint32_t revents) except -1:
        if cppnp_atomic_load(&self._state) != SERVER_STARTED:
            return 0                # stop() / stop_accepting() pending: accept no more
        self._accept_some()
        return 0

    cdef int _accept_some(self) except -1:
        cdef sockaddr_storage peer
        cdef int err = 0, connfd
        for _ in range(MAX_ACCEPTS_PER_EVENT):
            if self.fd < 0:
                return 0
            connfd = accept_nonblocking(self.fd, &peer, &err)
            if connfd < 0:
                if err == EAGAIN or err == EINTR:
                    return 0
                if err == ECONNABORTED or err == EPROTO or err == EPERM:
                    cppnp_counter_add(&self._accept_errors, 1)
                    continue            # the peer gave up before we accepted: next one
                if (err == EMFILE or err == ENFILE) and self._idle_fd >= 0:
                    self._shed_one(err)
                    return 0
                # Out of fds with no spare, or out of kernel memory: the backlog stays
                # readable, so stop polling the listener for a while instead of spinning.
                cppnp_counter_add(&self._accept_errors, 1)
                self._log_accept_error(err)
                self._pause_accepting()
                return 0
            cppnp_counter_add(&self._accepted, 1)
            self._new_connection(connfd, &peer)
        return 0

    cdef int _new_connection(self, int connfd, const sockaddr_storage* peer) except -1:
        """An accepted socket: make its connection, on this loop or on an io loop (base
        loop thread)."""
        cdef TcpConnection conn
        cdef IoLoop io
        try:
            if self._tcp_nodelay:
                set_bool_opt(connfd, IPPROTO_TCP, TCP_NODELAY, True)
            if self._keepalive:
                set_bool_opt(connfd, SOL_SOCKET, SO_KEEPALIVE, True)
        except OSError:
            pass        # the peer may already be gone; the first read will tell
        if self._pool is None:
            conn = new_connection(self._loop, connfd, self, self._handlers, peer, self.name)
            self._connections[conn.id] = conn
            cppnp_relaxed_store(&self._n_connections, len(self._connections))
            conn.start()
            return 0
        # io_threads > 0: the connection lives on an io loop, which starts it; its release
        # there hands remove_connection() back to this loop (IoLoop).
        io = self._pool.next_loop()
        conn = new_connection(io._loop, connfd, io, self._handlers, peer, self.name)
        self._connections[conn.id] = conn
        cppnp_relaxed_store(&self._n_connections, len(self._connections))
        if not io.adopt(conn):
            # The io loop is closed (the server's loop is closing): drop the connection.
            self._connections.pop(conn.id, None)
            cppnp_relaxed_store(&self._n_connections, len(self._connections))
        return 0

    cdef int _shed_one(self, int err) except -1:
        """Out of fds: accept the pending connection on the spare fd and close it at once
        (muduo's idleFd trick), so the listener does not spin on a readable backlog."""
        cdef sockaddr_storage peer
        cdef int e = 0, connfd
        cppnp_counter_add(&self._accept_errors, 1)
        self._log_accept_error(err)
        if self._idle_fd < 0:
            return 0
        close(self._idle_fd)
        self._idle_fd = -1
        connfd = accept_nonblocking(self.fd, &peer, &e)
        if connfd >= 0:
            close(connfd)
            cppnp_counter_add(&self._shed_connections, 1)
        self._idle_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
        return 0

    cdef int _pause_accepting(self) except -1:
        if self.fd >= 0 and not self._paused:
            self._paused = True
            self._loop.update_channel(self, 0)
            self._retry_timer = self._loop.run_after(ACCEPT_RETRY_DELAY,
                                                     self._resume_accepting)
        return 0

    def _resume_accepting(self):
        # The accept-retry timer (cancelled when the listener closes).
        self._retry_timer = 0
        self._paused = False
        if self.fd < 0 or cppnp_atomic_load(&self._state) != SERVER_STARTED:
            return
        if self._idle_fd < 0:
            self._idle_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
        self._loop.update_channel(self, EPOLLIN)

    cdef _log_accept_error(self, int err):
        cdef double now = cppnp_monotonic()
        if now - self._last_emfile_log >= 1.0:     # at most one line a second
            self._last_emfile_log = now
            try:
                _logger.warning("%s: accept() failed: %s", self.name, os.strerror(err))
            except Exception:
                pass        # a failing log handler must not stop the acceptor

    cdef int remove_connection(self, TcpConnection conn) except -1:
        self._connections.pop(conn.id, None)
        cppnp_relaxed_store(&self._n_connections, len(self._connections))
        self._maybe_detach()
        return 0

    cdef int on_loop_closed(self) except -1:
        cdef TcpConnection conn
        with self._lock:
            cppnp_atomic_store(&self._state, SERVER_STOPPED)
        # The io loops first: each closes in its own thread, releasing its connections
        # without callbacks; once they are joined the table below is ours alone.
        self._stop_io_loops()
        self._close_listener()
        for conn in list(self._connections.values()):
            conn.on_loop_closed()
        self._connections.clear()
        cppnp_relaxed_store(&self._n_connections, 0)
        return 0
