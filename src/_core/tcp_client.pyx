# cython: language_level=3, embedsignature=True
"""TcpClient: one outgoing TCP connection served by a handler (ICppnpUsr)."""

cimport cython
from libc.math cimport isnan

from _core.connector cimport new_connector
from _core.event_loop cimport EventLoop
from _core.handler cimport resolve_handlers
from _core.idle_wheel cimport IdleWheel, new_idle_wheel
from _core.includes.linux cimport IPPROTO_TCP, TCP_NODELAY, sockaddr_storage
from _core.includes.linux cimport close as close_fd
from _core.includes.sys cimport (
    cppnp_atomic_load32, cppnp_atomic_store32, cppnp_counter_add, cppnp_relaxed_load,
)
from _core.socket_ops cimport set_bool_opt, unix_path
from _core.tcp_connection cimport ConnectionOwner, TcpConnection, new_connection
from _core.tls cimport TlsConfig

import logging
import os
import ssl as _ssl

cdef object _logger = logging.getLogger("cppnp")


cdef int _on_connected(object client, int fd, const sockaddr_storage* peer) except -1:
    return (<TcpClient>client)._new_connection(fd, peer)


cdef int _on_error(object client, object exc, bint will_retry) except -1:
    return (<TcpClient>client)._connect_error(exc, will_retry)


cdef double _seconds(object value, str what, bint allow_none) except? -1:
    if value is None and allow_none:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number of seconds, got %r" % (what, value))
    if isnan(value) or not value > 0 or value == float("inf"):
        raise ValueError("%s must be a finite number of seconds > 0, got %r" % (what, value))
    return value


@cython.auto_pickle(False)
@cython.final
cdef class TcpClient(ConnectionOwner):
    """Connects to *address* and serves the connection with *handler* (muduo's TcpClient).

    The connection is an ordinary TcpConnection: the handler's ``on_connection``,
    ``on_message``, ``on_write_complete``, ``on_high_water_mark`` and ``on_close`` run on
    *loop*'s thread, ``conn.send()`` works from any thread (ThreadPool workers too), and
    its lifetime rules are a server connection's.  Each failed attempt (refused,
    unreachable, timed out, a name that does not resolve) calls
    ``handler.on_connect_error(client, exc)`` on the loop thread (logged if the handler
    has no such method).

    Connecting never blocks the loop: the connect is non-blocking, and a host name is
    resolved by getaddrinfo in a short-lived worker thread (an IP literal needs none).
    With ``retry=True`` (the default) a failed attempt is retried after a delay that
    starts at *retry_initial* seconds and doubles up to *retry_max*, each drawn from
    [0.75 d, d] (jitter, never below *retry_initial*); after an established connection
    closes, the client connects again after such a delay (the backoff starts over), until
    disconnect() or stop().  With ``retry=False`` one attempt is made per connect().
    *connect_timeout* (seconds, or None: the kernel's) bounds each attempt.

    *address* may also be a Unix socket path (str, bytes, os.PathLike) or an abstract
    name (a leading NUL); TCP_NODELAY then does not apply.

    TLS: ``ssl=`` an ``ssl.SSLContext`` (e.g. ``ssl.create_default_context()``);
    *server_hostname* (default: the host of *address*) is sent as SNI and checked against
    the certificate when the context's ``check_hostname`` is on (its ``verify_mode``
    decides the chain check).  ``on_connection`` runs after the handshake; a failed
    handshake (certificate rejected, TLS alert, *ssl_handshake_timeout* seconds passed,
    default 60) is reported to ``on_connect_error(client, exc)`` (``exc`` an
    ``ssl.SSLError``, ``TimeoutError`` or ``ConnectionError``) and logged; a certificate
    error is not retried.  See TcpServer for the rest (close_notify, errors, counters).

    *idle_timeout* (seconds, or None: off): a connection that receives nothing for that
    long is closed (force_close; ``on_close`` runs, and with ``retry`` the client
    reconnects), counted in ``stats()["idle_closed"]``; as TcpServer's, an idle wheel
    (idle_wheel.pxd), O(1) per message.
    """

    def __init__(self, EventLoop loop not None, address, handler, *, name=None,
                 bint retry=True, retry_initial=0.5, retry_max=30.0, connect_timeout=None,
                 ssl=None, server_hostname=None, bint tcp_nodelay=True,
                 ssl_handshake_timeout=None, idle_timeout=None):
        """Prepare a client for *address*, a (host, port) tuple or a Unix socket path
        (see the class docstring); nothing happens until
        connect().  ``__init__`` runs once (RuntimeError if called again).

        Thread-safe to construct.
        """
        cdef double initial, maximum, timeout
        if self._initialized:
            raise RuntimeError("TcpClient.__init__ called twice: make a new TcpClient")
        path = unix_path(address)
        if path is not None:
            if not path:
                raise ValueError("a Unix socket path must not be empty")
            host, port = path, None
        else:
            if not isinstance(address, tuple) or len(address) != 2:
                raise TypeError("address must be a (host, port) tuple or a Unix socket "
                                "path, got %r" % (address,))
            host, port = address
            if not isinstance(host, str) or not host:
                raise TypeError("host must be a non-empty str, got %r" % (host,))
            if not isinstance(port, int) or isinstance(port, bool):
                raise TypeError("port must be an int, got %r" % (type(port).__name__,))
            if not 1 <= port <= 65535:
                raise ValueError("port must be in 1..65535, got %d" % port)
        if handler is None:
            raise TypeError("handler must be an ICppnpUsr (or an object with its methods)")
        initial = _seconds(retry_initial, "retry_initial", False)
        maximum = _seconds(retry_max, "retry_max", False)
        if maximum < initial:
            raise ValueError("retry_max (%r) must be >= retry_initial (%r)"
                             % (retry_max, retry_initial))
        timeout = _seconds(connect_timeout, "connect_timeout", True)
        if idle_timeout is not None:
            self._idle_timeout = _seconds(idle_timeout, "idle_timeout", False)
        on_error = getattr(handler, "on_connect_error", None)
        if on_error is not None and not callable(on_error):
            raise TypeError("handler.on_connect_error must be callable")
        if ssl is not None:
            self._tls = TlsConfig(
                ssl, False,
                server_hostname if server_hostname is not None
                else (host if path is None else None),
                60.0 if ssl_handshake_timeout is None else ssl_handshake_timeout)
        elif server_hostname is not None or ssl_handshake_timeout is not None:
            raise ValueError("server_hostname and ssl_handshake_timeout are only "
                             "meaningful with ssl")
        self._loop = loop
        self._address = path if path is not None else (host, port)
        self._handler = handler
        self._handlers = resolve_handlers(handler)
        self._on_connect_error = on_error
        if name is not None:
            self._name = name
        elif path is not None:
            self._name = "TcpClient-unix:%s" % (
                os.fsdecode(path) if isinstance(path, bytes) else path).replace("\0", "@")
        else:
            self._name = "TcpClient-%s:%d" % (host, port)
        self._retry = retry
        self._tcp_nodelay = tcp_nodelay and path is None
        self._connector = new_connector(loop, self, _on_connected, _on_error, host, port,
                                        retry, initial, maximum, timeout)
        self._initialized = True

    def __repr__(self):
        return "<TcpClient %s %s>" % (
            self._name, "connected" if self.connected else "not connected")

    cdef int _check_created(self) except -1:
        if not self._initialized:
            raise RuntimeError("TcpClient.__init__ was not called")
        return 0

    @property
    def idle_timeout(self):
        """The idle timeout in seconds, or None (off).

        Thread-safe.
        """
        return self._idle_timeout if self._idle_timeout > 0 else None

    @property
    def address(self):
        """The (host, port) the client connects to (or the Unix socket path).

        Thread-safe.
        """
        return self._address

    @property
    def name(self):
        """The client's name (``TcpClient-<host>:<port>`` unless given); its connections'
        names start with it.

        Thread-safe.
        """
        return self._name

    @property
    def loop(self):
        """The EventLoop the client runs on.

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
    def retry(self):
        """Whether failed attempts are retried and a closed connection is remade.

        Thread-safe.
        """
        return self._retry

    @property
    def connection(self):
        """The current TcpConnection, or None (not connected yet, or released).

        Thread-safe.
        """
        with cython.critical_section(self):
            conn = self._connection
        return conn

    @property
    def connected(self):
        """True while the client has a connection whose socket is open.

        Thread-safe.
        """
        conn = self.connection
        return conn is not None and conn.connected

    def stats(self):
        """Return a dict of the client's counters (a snapshot): ``attempts`` (connects
        tried), ``connect_errors`` (failed attempts), ``connections`` (made),
        ``tls_errors`` and ``handshake_timeouts`` (0 without ``ssl``), ``idle_closed``
        (connections closed by *idle_timeout*).

        Thread-safe.
        """
        cdef IdleWheel wheel
        self._check_created()
        with cython.critical_section(self):
            wheel = self._idle
        return {
            "attempts": cppnp_relaxed_load(&self._connector.attempts),
            "connect_errors": cppnp_relaxed_load(&self._connect_errors),
            "connections": cppnp_relaxed_load(&self._connections_made),
            "tls_errors": self._tls.counters()[0] if self._tls is not None else 0,
            "handshake_timeouts": self._tls.counters()[1] if self._tls is not None else 0,
            "idle_closed": wheel.expired_count() if wheel is not None else 0,
        }

    def connect(self):
        """Start connecting (in the background, on the loop); a no-op while connecting or
        connected.  Errors are reported to ``handler.on_connect_error``.  May be called
        again after disconnect() or stop() (once the old connection is released, a new
        one is made).

        Thread-safe.
        """
        self._check_created()
        if self._loop.closed:
            raise RuntimeError("TcpClient.connect() on a closed EventLoop")
        cppnp_atomic_store32(&self._wanted, 1)
        self._loop.attach(self)
        self._loop.run_or_queue(self._connect_in_loop)

    def disconnect(self):
        """Graceful: stop connecting and retrying, and shut the connection down (our FIN
        goes out after the output accepted so far is written; it is released when the
        peer closes too).  No reconnect follows.

        Thread-safe.
        """
        self._check_created()
        cppnp_atomic_store32(&self._wanted, 0)
        if not self._loop.closed:
            self._loop.run_or_queue(self._disconnect_in_loop)

    def stop(self):
        """Stop connecting and retrying (also during a backoff delay), and force-close the
        connection if there is one (queued output is dropped and counted).  No reconnect
        follows.  Idempotent.

        Thread-safe.
        """
        self._check_created()
        cppnp_atomic_store32(&self._wanted, 0)
        if not self._loop.closed:
            self._loop.run_or_queue(self._stop_in_loop)

    # -- loop thread ------------------------------------------------------------------

    def _connect_in_loop(self):
        if not cppnp_atomic_load32(&self._wanted) or self._loop.closed:
            return
        if self._connection is not None or self._connector.active():
            return
        self._connector.start()

    def _disconnect_in_loop(self):
        self._connector.stop()
        conn = self._connection
        if conn is not None:
            conn.shutdown()
        self._maybe_detach()

    def _stop_in_loop(self):
        self._connector.stop()
        conn = self._connection
        if conn is not None:
            conn.force_close()
        self._maybe_detach()

    cdef int _new_connection(self, int fd, const sockaddr_storage* peer) except -1:
        cdef TcpConnection conn
        cdef IdleWheel wheel
        if not cppnp_atomic_load32(&self._wanted):
            close_fd(fd)          # disconnect()/stop() raced with the connect
            self._maybe_detach()
            return 0
        if self._tcp_nodelay:
            try:
                set_bool_opt(fd, IPPROTO_TCP, TCP_NODELAY, True)
            except OSError:
                pass        # the peer may already be gone; the first read will tell
        conn = new_connection(self._loop, fd, self, self._handlers, peer, self._name)
        if self._tls is not None:
            conn._tls = self._tls.new_session()
        if self._idle_timeout > 0:
            if self._idle is None:      # the loop thread's, made at the first connection
                wheel = new_idle_wheel(self._loop, self._idle_timeout)
                with cython.critical_section(self):     # stats() reads it anywhere
                    self._idle = wheel
            conn.set_idle_wheel(self._idle)
        with cython.critical_section(self):
            self._connection = conn
        cppnp_counter_add(&self._connections_made, 1)
        conn.start()
        return 0

    cdef int remove_connection(self, TcpConnection conn) except -1:
        with cython.critical_section(self):
            if self._connection is conn:
                self._connection = None
        if cppnp_atomic_load32(&self._wanted) and self._retry and not self._loop.closed:
            self._connector.restart()
        elif cppnp_atomic_load32(&self._wanted):
            cppnp_atomic_store32(&self._wanted, 0)      # retry off: one connection
        self._maybe_detach()
        return 0

    cdef int tls_failed(self, TcpConnection conn, object exc) except -1:
        # The handshake failed or timed out: an attempt that failed (a certificate that
        # does not verify is not retried).  remove_connection() follows.
        self._connect_error(exc, self._retry
                            and not isinstance(exc, _ssl.SSLCertVerificationError))
        return 0

    cdef int _connect_error(self, object exc, bint will_retry) except -1:
        cppnp_counter_add(&self._connect_errors, 1)
        if not will_retry:
            cppnp_atomic_store32(&self._wanted, 0)
        if self._on_connect_error is not None:
            try:
                self._on_connect_error(self, exc)
            except Exception:
                self._loop.report_error("on_connect_error of %r" % (self,))
        else:
            try:
                _logger.warning("%s: connect failed: %s", self._name, exc)
            except Exception:
                pass
        self._maybe_detach()
        return 0

    cdef int _maybe_detach(self) except -1:
        if self._connection is None and not self._connector.active() \
                and not cppnp_atomic_load32(&self._wanted):
            self._loop.detach(self)
        return 0

    cdef int on_loop_closed(self) except -1:
        cdef TcpConnection conn
        cppnp_atomic_store32(&self._wanted, 0)
        self._connector.stop()
        conn = self._connection
        with cython.critical_section(self):
            self._connection = None
        if conn is not None:
            conn.on_loop_closed()
        return 0
