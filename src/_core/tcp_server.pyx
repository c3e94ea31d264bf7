# cython: language_level=3, embedsignature=True
"""TcpServer: accepts TCP connections and hands them to a handler (ICppnpUsr)."""

cimport cython

from _core.acceptor cimport new_acceptor
from _core.event_loop cimport EventLoop
from _core.event_loop_pool cimport EventLoopThreadPool, IoLoop
from _core.handler cimport resolve_handlers
from _core.idle_wheel cimport IdleWheel, new_idle_wheel
from _core.includes.consts cimport MAX_IO_THREADS
from _core.includes.linux cimport sockaddr_storage
from _core.includes.sys cimport (
    cppnp_atomic_load, cppnp_atomic_store, cppnp_relaxed_load, cppnp_relaxed_store,
)
from _core.socket_ops cimport unix_path
from _core.tcp_connection cimport ConnectionOwner, TcpConnection, new_connection
from _core.tls cimport TlsConfig

import threading


cdef int _on_accept(object server, int fd, const sockaddr_storage* peer) except -1:
    # The Acceptor's callback (acceptor.pxd AcceptFn).
    return (<TcpServer>server)._new_connection(fd, peer)


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

    Unix domain sockets: *address* may be a filesystem path (str, bytes, os.PathLike) or
    an abstract name (a leading NUL).  start() removes a socket file left by a dead
    process (a connect to it is refused), and raises for a live one (OSError EADDRINUSE)
    or for an existing file that is not a socket (FileExistsError); *unix_mode* (e.g.
    0o660) is set on the file before listening; stop() (once the listener closes)
    removes the file if it is still ours.  TCP_NODELAY and keepalive do not apply.

    TLS: ``ssl=`` an ``ssl.SSLContext`` (server side, with its certificate chain loaded)
    makes every connection TLS.  The standard library's ``ssl.SSLObject`` over memory
    BIOs does the protocol (OpenSSL the crypto); the connection's loop thread drives it.
    ``on_connection`` runs once the handshake has completed (so user code never sends
    before it; ``conn.ssl_object`` then gives the peer certificate, ALPN protocol,
    version); a handshake not complete after *ssl_handshake_timeout* seconds (default 60,
    as asyncio) closes the connection.  A TLS error closes that connection only, with a
    warning on the "cppnp" logger, counted in ``stats()`` (``tls_errors``,
    ``handshake_timeouts``); a connection that fails its handshake gets neither
    ``on_connection`` nor ``on_close``.  Sends from any thread are encrypted on the loop
    thread in order; shutdown() sends close_notify, then the FIN; the peer's close_notify
    is its EOF.  TLS 1.2 renegotiation is refused (``OP_NO_RENEGOTIATION`` is set on the
    context); ALPN, ciphers and versions come from the context.
    """

    def __cinit__(self):
        self._connections = {}
        self._wheels = {}
        self._lock = threading.Lock()

    def __init__(self, EventLoop loop not None, address, handler, *, name=None,
                 bint reuse_port=False, backlog=1024, bint tcp_nodelay=True,
                 bint keepalive=False, io_threads=0, unix_mode=None, ssl=None,
                 ssl_handshake_timeout=None, idle_timeout=None):
        """Prepare a server on (host, port); port 0 picks a free port (see ``address``).
        Or on a Unix socket path / abstract name (see the class docstring).

        *io_threads*: an int >= 0, the number of io loop threads (see the class
        docstring; 0 serves everything on *loop*).  Nothing is bound and no thread is
        started until start().  *idle_timeout*: None (the default: off) or seconds > 0:
        a connection that receives nothing for that long is closed (``force_close()``;
        on_close runs as usual; counted in ``stats()["idle_closed"]``, logged at DEBUG).
        It is closed between *idle_timeout* and 9/8 of it after its last input (a timing
        wheel of 8 ticks per loop: O(1) per message).  Only input counts: a connection
        that only sends, or whose ThreadPool task runs longer, is closed too (the task's
        replies are then dropped and counted, and on_close waits for the task).
        ``__init__`` runs once: calling it again raises RuntimeError.  Thread-safe to
        construct.
        """
        if self._initialized:
            raise RuntimeError("TcpServer.__init__ called twice: a server is initialised "
                               "once (make a new TcpServer)")
        path = unix_path(address)
        if path is not None:
            if not path:
                raise ValueError("a Unix socket path must not be empty")
        else:
            if not isinstance(address, tuple) or len(address) != 2:
                raise TypeError("address must be a (host, port) tuple or a Unix socket "
                                "path, got %r" % (address,))
            host, port = address
            if not isinstance(host, str):
                raise TypeError("host must be a str, got %r" % (type(host).__name__,))
            if not isinstance(port, int) or isinstance(port, bool):
                raise TypeError("port must be an int, got %r" % (type(port).__name__,))
            if not 0 <= port <= 65535:
                raise ValueError("port must be in 0..65535, got %d" % port)
        if unix_mode is not None:
            if path is None:
                raise ValueError("unix_mode applies to a Unix socket path only")
            if not isinstance(unix_mode, int) or isinstance(unix_mode, bool) \
                    or not 0 <= unix_mode <= 0o7777:
                raise ValueError("unix_mode must be a file mode int (e.g. 0o660), got %r"
                                 % (unix_mode,))
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
        if ssl is not None:
            self._tls = TlsConfig(ssl, True, None,
                                  60.0 if ssl_handshake_timeout is None
                                  else ssl_handshake_timeout)
        elif ssl_handshake_timeout is not None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if idle_timeout is not None:
            if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)):
                raise TypeError("idle_timeout must be None or a number of seconds, got %r"
                                % (type(idle_timeout).__name__,))
            if not 0 < idle_timeout < float("inf"):
                raise ValueError("idle_timeout must be > 0 seconds and finite (None: off), "
                                 "got %r" % (idle_timeout,))
            self._idle_timeout = idle_timeout
        self._io_threads = io_threads
        self._loop = loop
        self._handler = handler
        self._handlers = resolve_handlers(handler)
        if path is not None:
            self._address = path
            self._name = name if name is not None else "TcpServer-unix:%s" % (
                path.decode("utf-8", "backslashreplace").replace("\0", "@")
                if isinstance(path, bytes) else path.replace("\0", "@"),)
        else:
            self._address = (host, port)
            self._name = name if name is not None else "TcpServer-%s:%d" % (host, port)
        self._reuse_port = reuse_port
        self._backlog = backlog
        self._acceptor = new_acceptor(loop, self, _on_accept, self._name, tcp_nodelay,
                                      keepalive)
        if unix_mode is not None:
            self._acceptor.unix_mode = unix_mode
        self._initialized = True

    def __repr__(self):
        return "<TcpServer %s %s connections=%d>" % (
            self._name, self._bound or self._address, self.connection_count)

    @property
    def address(self):
        """The bound (host, port) after start() (the real port if 0 was asked), else the
        requested address; a Unix socket server's path (or abstract name) as given.

        Thread-safe.
        """
        bound = self._bound
        if isinstance(self._address, (str, bytes)):
            return self._address
        if bound is not None:
            return bound[:2]
        return self._address

    @property
    def name(self):
        """The server's name (``TcpServer-<host>:<port>`` unless given); connection names
        start with it.

        Thread-safe.
        """
        return self._name

    @property
    def loop(self):
        """The EventLoop the server runs on.

        Thread-safe.
        """
        return self._loop

    @property
    def handler(self):
        """The handler given to the constructor.

        Thread-safe.
        """
        return self._handler

    @property
    def connection_count(self):
        """How many connections are open (accepted and not yet released).

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._n_connections)

    @property
    def accepted(self):
        """Connections accepted so far.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._acceptor.accepted) if self._acceptor else 0

    @property
    def accept_errors(self):
        """accept() failures (the peer gave up, out of fds or memory).

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._acceptor.accept_errors) if self._acceptor else 0

    @property
    def shed_connections(self):
        """Connections accepted and closed at once because fds ran out.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._acceptor.shed_connections) if self._acceptor else 0

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
        empty list.

        Thread-safe.
        """
        cdef EventLoopThreadPool pool
        with cython.critical_section(self):
            pool = self._pool
        return pool.loops if pool is not None else []

    def stats(self):
        """Return a dict of the server's counters (a snapshot).

        ``connections_per_loop``: open connections on each io loop in thread order, or
        ``[connection_count]`` with ``io_threads=0``.  ``tls_errors`` (connections closed
        by a TLS error or a failed handshake) and ``handshake_timeouts`` (0 without ``ssl``).

        Thread-safe.
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
            "tls_errors": self._tls.counters()[0] if self._tls is not None else 0,
            "handshake_timeouts": self._tls.counters()[1] if self._tls is not None else 0,
            "idle_closed": self.idle_closed,
        }

    @property
    def idle_timeout(self):
        """The idle timeout in seconds, or None (off).

        Thread-safe.
        """
        return self._idle_timeout if self._idle_timeout > 0 else None

    @property
    def idle_closed(self):
        """Connections closed because they received nothing for ``idle_timeout``.

        Thread-safe.
        """
        cdef IdleWheel w
        cdef long total = 0
        with cython.critical_section(self):
            wheels = list(self._wheels.values())
        for w in wheels:
            total += w.expired_count()
        return total

    cdef int _watch_idle(self, TcpConnection conn, EventLoop loop) except -1:
        # Base loop thread, before the connection starts.
        cdef IdleWheel w
        if self._idle_timeout <= 0:
            return 0
        with cython.critical_section(self):
            w = self._wheels.get(loop)
            if w is None:
                w = new_idle_wheel(loop, self._idle_timeout)
                self._wheels[loop] = w
        conn.set_idle_wheel(w)
        return 0

    def connections(self):
        """Return a list of the open connections.

        Loop thread only.
        """
        self._check_created()
        self._loop.assert_in_loop_thread("TcpServer.connections()")
        return list(self._connections.values())

    cdef int _check_created(self) except -1:
        if self._acceptor is None:
            raise RuntimeError("TcpServer.__init__ was not called")
        return 0

    def start(self):
        """Bind and listen now (errors raise here), and start accepting on the loop.

        Calling it twice is harmless.

        Thread-safe.
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
            self._loop.attach(self)
            try:
                self._bound = self._acceptor.listen(self._address, self._reuse_port,
                                                    self._backlog)
                if self._io_threads:
                    pool = EventLoopThreadPool(self._loop, self._io_threads, self._name)
                    pool.start(self)
                    with cython.critical_section(self):
                        self._pool = pool
            except BaseException:
                self._acceptor.close()
                self._stop_io_loops()
                self._loop.detach(self)
                raise
            cppnp_atomic_store(&self._acceptor.enabled, 1)
            cppnp_atomic_store(&self._state, SERVER_STARTED)
        self._loop.run_or_queue(self._start_in_loop)

    def _start_in_loop(self):
        self._acceptor.start_polling()

    def stop(self):
        """Stop listening and force-close every open connection.

        Connections with ThreadPool tasks in flight are released when those finish; once
        the last one is, the loop forgets the server.  Idempotent; start() raises after it.

        Thread-safe.
        """
        self._check_created()
        if self._stop_to(SERVER_STOPPED):
            self._in_loop_or_closed(self._stop_in_loop)

    def stop_accepting(self):
        """Close the listening socket; open connections carry on (a graceful stop's first
        step: stop accepting, let in-flight work finish, then stop()).

        After it, ``accepting`` is False, ``connection_count`` tells what is left, and
        start() raises; once the last connection is released the loop forgets the
        server.

        Thread-safe.
        """
        self._check_created()
        if self._stop_to(SERVER_NOT_ACCEPTING):
            self._in_loop_or_closed(self._stop_accepting_in_loop)

    cdef bint _stop_to(self, int64_t state) except -1:
        """Move to *state* (SERVER_NOT_ACCEPTING or SERVER_STOPPED) unless already there or
        further, and stop accepting; False if nothing changed (any thread)."""
        with self._lock:
            if cppnp_atomic_load(&self._state) >= state:
                return False
            cppnp_atomic_store(&self._state, state)
            cppnp_atomic_store(&self._acceptor.enabled, 0)
        return True

    cdef int _in_loop_or_closed(self, object fn) except -1:
        """Run *fn* on the loop thread (now, or queued), or here once the loop is closed."""
        if self._loop.closed:
            fn()
        else:
            self._loop.run_or_queue(fn)
        return 0

    @property
    def accepting(self):
        """Whether the listening socket is open: from start() until the loop has closed
        it after stop() or stop_accepting() (then a connect is refused).

        Thread-safe.
        """
        return self._acceptor is not None and cppnp_atomic_load(&self._acceptor.listening) != 0

    def _stop_accepting_in_loop(self):
        self._close_listener()

    cdef int _close_listener(self) except -1:
        """Close the acceptor (listener, spare fd, accept retry), and detach if no
        connection is left (loop thread, or any thread once the loop is closed)."""
        with self._lock:
            self._acceptor.close()
        self._maybe_detach()
        return 0

    cdef int _maybe_detach(self) except -1:
        if self._acceptor.fd < 0 and not self._connections \
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

    def _stop_in_loop(self):
        if self._pool is not None:
            self._pool.close_all()      # before the table is read: see IoLoop.run_functor
        self._close_listener()
        if not self._loop.closed:
            for conn in list(self._connections.values()):
                conn.force_close()

    cdef int _new_connection(self, int fd, const sockaddr_storage* peer) except -1:
        """A new connection: the Acceptor accepted *fd* (base loop thread).  Create the
        TcpConnection, register it with the server and start it on its loop: this one, or
        with io_threads an io loop, which starts it there."""
        cdef TcpConnection conn
        cdef IoLoop io
        if self._pool is None:
            conn = new_connection(self._loop, fd, self, self._handlers, peer, self._name)
            if self._tls is not None:
                conn._tls = self._tls.new_session()
            self._watch_idle(conn, self._loop)
            self._connections[conn._id] = conn
            cppnp_relaxed_store(&self._n_connections, len(self._connections))
            conn.start()
            return 0
        # io_threads > 0: the connection lives on an io loop; its release there hands
        # remove_connection() back to this loop (IoLoop).
        io = self._pool.next_loop()
        conn = new_connection(io._loop, fd, io, self._handlers, peer, self._name)
        if self._tls is not None:
            conn._tls = self._tls.new_session()     # used on the io loop from start()
        self._watch_idle(conn, io._loop)
        self._connections[conn._id] = conn
        cppnp_relaxed_store(&self._n_connections, len(self._connections))
        if not io.adopt(conn):
            # The io loop is closed (the server's loop is closing): drop the connection.
            self._connections.pop(conn._id, None)
            cppnp_relaxed_store(&self._n_connections, len(self._connections))
        return 0

    cdef int remove_connection(self, TcpConnection conn) except -1:
        self._connections.pop(conn._id, None)
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
