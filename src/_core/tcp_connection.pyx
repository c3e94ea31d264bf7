# cython: language_level=3, embedsignature=True
"""TcpConnection: one accepted TCP connection (state machine: see tcp_connection.pxd)."""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memcpy

from _core.buffer cimport Buffer
from _core.channel cimport Channel, PollHook
from _core.event_loop cimport EventLoop
from _core.handler cimport Handlers, no_handlers
from _core.idle_wheel cimport IdleWheel
from _core.includes.consts cimport (
    COALESCE_MAX, DEFAULT_HIGH_WATER_MARK, KEEP_INPUT_CAPACITY,
)
from _core.includes.linux cimport (
    EAGAIN, EINTR, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLPRI, IPPROTO_TCP,
    MSG_NOSIGNAL, SHUT_WR, SO_KEEPALIVE, SOL_SOCKET, TCP_NODELAY, close, errno,
    getsockname, send, shutdown, sockaddr, sockaddr_storage, socklen_t,
)
from _core.includes.sys cimport (
    cppnp_atomic_add, cppnp_atomic_cas32, cppnp_atomic_load, cppnp_atomic_load32,
    cppnp_atomic_store, cppnp_atomic_store32, cppnp_counter_add, cppnp_relaxed_load,
    cppnp_relaxed_store,
)
from _core.socket_ops cimport set_bool_opt, sockaddr_to_tuple, socket_error
from _core.tls cimport TlsSession, count_handshake_timeout, count_tls_error

import logging
import os
import ssl as _ssl

cdef object _logger = logging.getLogger("cppnp")
cdef int64_t _live_connections = 0
cdef int64_t _next_id = 0

# Work queued to the loop thread is a named ``*_in_loop`` method (muduo's xxxInLoop), run
# by the loop's pending functors; an accepted send from another thread is queued as the
# pair (connection, bytes) and written by run_functor (no allocation beyond the bytes).


cdef dict _STATE_NAMES = {
    CONNECTING: "connecting", CONNECTED: "connected", DISCONNECTING: "disconnecting",
    FIN_SENT: "fin-sent", DISCONNECTED: "disconnected", RELEASED: "released",
}


def live_connections():
    """Return how many TcpConnection objects are alive (a leak check for tests).

    Thread-safe.
    """
    return cppnp_atomic_load(&_live_connections)


@cython.auto_pickle(False)
cdef class ConnectionOwner(Channel):
    cdef int remove_connection(self, TcpConnection conn) except -1:
        return 0

    cdef int tls_failed(self, TcpConnection conn, object exc) except -1:
        return 0


cdef TcpConnection new_connection(EventLoop loop, int fd, ConnectionOwner owner,
                                  Handlers handlers, const sockaddr_storage* peer, str prefix):
    cdef TcpConnection c = TcpConnection.__new__(TcpConnection)
    c._loop = loop
    c.fd = fd
    c._owner = owner
    c._handlers = handlers
    c._state = CONNECTING
    c._reading = 1
    memcpy(&c._peer, peer, sizeof(sockaddr_storage))
    c._prefix = prefix
    c._id = cppnp_atomic_add(&_next_id, 1)
    return c


@cython.auto_pickle(False)
@cython.final
cdef class WriteFlusher(PollHook):
    """The loop's connections with coalesced output to write before it polls (internal,
    loop thread only; see "Write coalescing" in tcp_connection.pxd)."""
    cdef EventLoop _loop
    cdef list _conns

    cdef int before_poll(self) except -1:
        cdef list conns = self._conns
        cdef TcpConnection conn
        self._conns = []
        for conn in conns:
            if conn._flush_queued:
                try:
                    conn._flush()
                except Exception:
                    self._loop.report_error("writing the output of %r" % (conn,))
        return 0


cdef int _queue_flush(TcpConnection conn) except -1:
    """Put *conn* on its loop's WriteFlusher (loop thread)."""
    cdef EventLoop loop = conn._loop
    cdef WriteFlusher f = loop._write_flusher
    if f is None:
        f = WriteFlusher.__new__(WriteFlusher)
        f._loop = loop
        f._conns = []
        loop._write_flusher = f
    if not f._conns:
        loop.add_before_poll(f)
    f._conns.append(conn)
    conn._flush_queued = True
    return 0


cdef inline bint _socket_open(int64_t state) noexcept nogil:
    return state == CONNECTED or state == DISCONNECTING or state == FIN_SENT


@cython.auto_pickle(False)
@cython.final
cdef class TcpConnection(Channel):
    """One TCP connection accepted by a TcpServer, or made by a TcpClient (muduo's
    TcpConnection).

    Created by the server or the client, never by users.  Call order of the handler's callbacks:
    ``on_connection -> [on_message | on_write_complete | on_high_water_mark]* -> on_close``,
    all on the loop thread.  ``send``, ``shutdown``, ``force_close`` and the reading and
    option switches are thread-safe: from another thread they are queued to the loop.

    States (``repr()`` shows them): connecting -> connected -> [disconnecting ->
    fin-sent] -> disconnected -> released.  ``shutdown()`` and ``force_close()`` leave
    "connected" at once, from any thread: later sends are dropped and counted.

    Lifetime: the connection is released (socket closed, ``on_close`` called once) when
    the peer has closed, or the socket failed, or ``force_close()`` ran -- and no ThreadPool
    task that refers to it is still in flight.  After a half-close (peer ``SHUT_WR``) the
    replies of those tasks are still written, in order.  Replies after the socket failed
    or closed are dropped and counted in ``dropped_sends`` / ``dropped_bytes``.

    TLS (the server's or client's ``ssl=``): on_connection runs after the handshake, so
    user code never sends before it; on_message gets plaintext; send() from any thread
    is encrypted on the loop thread, in order; shutdown() sends close_notify, then the
    FIN.  ``bytes_sent``/``bytes_received`` and the output size count ciphertext.
    """

    def __cinit__(self):
        self._input = Buffer()
        self._output = Buffer()
        self._high_water_mark = DEFAULT_HIGH_WATER_MARK
        self._state = CONNECTING
        cppnp_atomic_add(&_live_connections, 1)

    def __init__(self, *args, **kwargs):
        raise TypeError("TcpConnection objects are created by TcpServer, not directly")

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)      # never closed by the loop (e.g. never started)
        cppnp_atomic_add(&_live_connections, -1)

    def __repr__(self):
        state = _STATE_NAMES.get(cppnp_atomic_load32(&self._state), "?")
        return "<TcpConnection %s %s peer=%r>" % (self.name, state, self.peer_address)

    cdef int start(self) except -1:
        """CONNECTING -> CONNECTED: register with the loop, call on_connection (loop thread).
        A TLS connection starts its handshake: on_connection runs once it completes."""
        cppnp_atomic_store32(&self._state, CONNECTED)
        self._update_interest()
        if self._idle is not None:
            self._idle.watch(self)
        if self._tls is not None:
            self._tls.timer_id = self._loop.run_after(self._tls.config.handshake_timeout,
                                                      self._tls_timeout_in_loop)
            self._tls_step()        # the client's hello
            return 0
        self._show()
        return 0

    cdef int _show(self) except -1:
        self._shown = True
        if self._handlers.on_connection is not None:
            try:
                self._handlers.on_connection(self)
            except Exception:
                self._loop.report_error("on_connection of %r" % (self,))
        return 0

    cdef int set_idle_wheel(self, IdleWheel wheel) except -1:
        if cppnp_atomic_load32(&self._state) == CONNECTING:
            self._idle = wheel              # start() watches
            return 0
        self._loop.assert_in_loop_thread("TcpConnection.set_idle_wheel")
        self._leave_idle()
        if wheel is not None and _socket_open(cppnp_atomic_load32(&self._state)):
            self._idle = wheel
            wheel.watch(self)
        return 0

    cdef int _leave_idle(self) except -1:
        cdef IdleWheel wheel = self._idle
        if wheel is not None:
            self._idle = None
            wheel.leave(self)
        return 0

    cdef int idle_expired(self, double timeout) except -1:
        # The wheel no longer watches us.  Receive-idle: also with a task in flight (its
        # replies are dropped and counted; on_close waits for it as after any force_close).
        self._idle = None
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        if _logger.isEnabledFor(logging.DEBUG):
            try:
                _logger.debug("connection %s: nothing received for %g s, closing",
                              self.name, timeout)
            except Exception:
                pass
        self.force_close()
        return 0

    cdef int _check_created(self) except -1:
        if self._loop is None:
            raise RuntimeError("this TcpConnection was not created by a TcpServer")
        return 0

    # -- state --------------------------------------------------------------------------

    @property
    def connected(self):
        """True while the socket is open: also after the peer half-closed, and after
        shutdown() (until both sides have closed).

        Thread-safe.
        """
        return _socket_open(cppnp_atomic_load32(&self._state))

    @property
    def id(self):
        """A number unique among the process's connections (it is in ``name``).

        Thread-safe.
        """
        return self._id

    @property
    def peer_closed(self):
        """True once the peer has closed its sending side (read returned EOF).

        Thread-safe.
        """
        return cppnp_atomic_load32(&self._peer_closed) != 0

    @property
    def closed(self):
        """True once the connection has been released (on_close has run).

        Thread-safe.
        """
        return cppnp_atomic_load32(&self._state) == RELEASED

    @property
    def name(self):
        """A name unique in the process: ``<server>-<peer>#<id>``.

        Thread-safe.
        """
        with cython.critical_section(self):
            if self._name is None:
                peer = self._peer_tuple()
                if peer is None:
                    where = "?"
                elif not isinstance(peer, tuple):
                    where = "unix"      # an AF_UNIX peer: usually unnamed
                elif ":" in peer[0]:
                    where = "[%s]:%d" % (peer[0], peer[1])
                else:
                    where = "%s:%d" % (peer[0], peer[1])
                self._name = "%s-%s#%d" % (self._prefix, where, self._id)
            name = self._name
        return name

    cdef object _peer_tuple(self):
        # Caller holds the critical section on self.
        if self._peer_address is None and self._loop is not None:
            self._peer_address = sockaddr_to_tuple(<sockaddr*>&self._peer)
        return self._peer_address

    @property
    def peer_address(self):
        """The peer's address: ``(host, port)`` (IPv6: ``(host, port, flow, scope)``); for a
        Unix socket its path (str, ``""`` if unnamed; bytes for an abstract name).

        Thread-safe.
        """
        with cython.critical_section(self):
            peer = self._peer_tuple()
        return peer

    @property
    def local_address(self):
        """The local address of the socket (None once closed, if never asked before).

        Thread-safe.
        """
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        cdef bint ok = False
        with cython.critical_section(self):
            # The loop closes the fd inside a critical section on the connection too, so
            # the fd cannot be closed (and its number reused) under getsockname().
            if self._local_address is None and self.fd >= 0 \
                    and _socket_open(cppnp_atomic_load32(&self._state)):
                ok = getsockname(self.fd, <sockaddr*>&ss, &n) == 0
            if ok:
                self._local_address = sockaddr_to_tuple(<sockaddr*>&ss)
            local = self._local_address
        return local

    @property
    def context(self):
        """Free for the application (e.g. per-connection state); None at first.

        Thread-safe.
        """
        with cython.critical_section(self):
            value = self._context
        return value

    @context.setter
    def context(self, value):
        with cython.critical_section(self):
            old = self._context
            self._context = value
        old = None      # the old value is released outside the critical section

    @property
    def loop(self):
        """The EventLoop the connection belongs to.

        Thread-safe.
        """
        return self._loop

    @property
    def fileno(self):
        """The socket's fd, or -1 once closed.  For inspection only: never close it.

        Thread-safe.
        """
        cdef int fd
        with cython.critical_section(self):
            fd = self.fd
        return fd

    @property
    def pending_tasks(self):
        """ThreadPool tasks referring to this connection that have not finished.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._pending_tasks)

    @property
    def output_bytes(self):
        """Bytes queued in the output buffer, not yet accepted by the kernel.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._output_len)

    @property
    def input_bytes(self):
        """Bytes received and left in the input buffer by on_message.

        Exact on the loop thread; from other threads, the value after the loop's last
        read or delivery.

        Thread-safe.
        """
        if self._loop is not None and self._loop.in_loop_thread():
            return len(self._input)
        return cppnp_relaxed_load(&self._input_len)

    @property
    def input_buffer(self):
        """The input Buffer passed to on_message.

        Loop thread only.
        """
        self._check_created()
        self._loop.assert_in_loop_thread("TcpConnection.input_buffer")
        return self._input

    @property
    def bytes_received(self):
        """Bytes read from the socket.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._bytes_received)

    @property
    def bytes_sent(self):
        """Bytes handed to the kernel.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._bytes_sent)

    @property
    def dropped_sends(self):
        """Sends dropped because the connection was closing or closed.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._dropped_sends)

    @property
    def dropped_bytes(self):
        """Bytes of the dropped sends (and of output dropped by a close).

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._dropped_bytes)

    @property
    def high_water_mark(self):
        """The output-buffer size at which on_high_water_mark fires.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._high_water_mark)

    def set_high_water_mark(self, Py_ssize_t nbytes):
        """Call on_high_water_mark when queued output crosses *nbytes* upwards.

        Thread-safe.
        """
        if nbytes <= 0:
            raise ValueError("high water mark must be > 0, got %d" % nbytes)
        cppnp_atomic_store(&self._high_water_mark, nbytes)

    # -- sending ------------------------------------------------------------------------

    def send(self, data, *, bint after_tasks=False):
        """Send *data* (bytes-like; str is encoded as UTF-8).

        Never blocks.  On the loop thread a send of up to 16 KiB is coalesced: appended
        to the output buffer and written, with the other sends of the same loop
        iteration, by one send() call just before the loop polls again (a larger one is
        written at once if nothing is queued before it); ``EventLoop.stats()`` counts
        ``write_calls`` and ``coalesced_sends``.  What the kernel does not take is queued
        in the output buffer and written when the socket is writable.  Only a connected
        connection accepts data: after shutdown() or force_close(), or once the socket
        is closed, the data is dropped and counted in ``dropped_sends`` /
        ``dropped_bytes`` (no exception).
        From a non-loop thread the data is copied and the write is queued to the loop;
        what one thread sends goes out in the order it sent it.

        ``after_tasks=True``: the data goes out after the replies of the ThreadPool tasks
        counted on this connection (``pending_tasks``) when send() is called, e.g. a
        loop-thread answer that must not overtake replies still being computed.  With
        no task in flight it is sent as usual.  Until it is written, later sends from the
        loop thread queue behind it (sends from other threads do not: they include the
        replies it waits for).  Exact for the connection's keyed tasks (the default for
        ``Task(handler, msg, conn)``: they finish in order); for tasks with other keys it
        waits until as many tasks have finished.  Data held when the connection closes is
        dropped and counted.

        Thread-safe.
        """
        self._check_created()
        cdef Py_buffer view
        cdef Py_ssize_t n
        cdef int64_t target = 0
        if isinstance(data, str):
            data = (<str>data).encode("utf-8")
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except BufferError as exc:
            raise TypeError("send() needs a contiguous bytes-like object: %s" % exc) from None
        try:
            n = view.len
            if n == 0:
                return
            if self._loop.in_loop_thread():
                if cppnp_atomic_load32(&self._state) != CONNECTED:
                    self._drop(n)
                elif self._held is None and not after_tasks:
                    self._write(<const char*>view.buf, n)
                else:
                    if after_tasks:
                        target = cppnp_atomic_load(&self._tasks_started)
                    # Finished first, then queued sends: a worker counts its reply in
                    # _queued_sends before it counts its task finished.
                    if self._held is None \
                            and cppnp_atomic_load(&self._tasks_finished) >= target \
                            and cppnp_atomic_load(&self._queued_sends) == 0:
                        self._write(<const char*>view.buf, n)
                    else:
                        cppnp_atomic_add(&self._queued_sends, 1)
                        self._hold(PyBytes_FromStringAndSize(<const char*>view.buf, n),
                                   target)
                return
            if type(data) is not bytes:
                data = PyBytes_FromStringAndSize(<const char*>view.buf, n)
        finally:
            PyBuffer_Release(&view)
        # Another thread.  Counted before the state is read (and so before the caller's
        # task is counted finished): see the notes in tcp_connection.pxd.
        cppnp_atomic_add(&self._queued_sends, 1)
        if cppnp_atomic_load32(&self._state) != CONNECTED:
            queued = self._loop.queue(self._dropped_in_loop, n)
        elif after_tasks:
            queued = self._loop.queue(self._send_after_in_loop,
                                      (cppnp_atomic_load(&self._tasks_started), data))
        else:
            queued = self._loop.queue(self, data)       # run_functor writes it
        if not queued:
            cppnp_atomic_add(&self._queued_sends, -1)   # the loop is closed: dropped

    # -- TLS (tls.pxd): loop thread only ---------------------------------------------------

    @property
    def ssl_object(self):
        """The ssl.SSLObject of a TLS connection (peer certificate: ``getpeercert()``,
        ``selected_alpn_protocol()``, ``version()``...), or None for a plain connection.
        Complete from on_connection on (it runs after the handshake).  Read the property
        from any thread; call the SSLObject's methods on the loop thread (the loop drives
        it).

        Thread-safe.
        """
        cdef TlsSession tls = self._tls
        return tls.obj if tls is not None else None

    cdef int _tls_step(self) except -1:
        """New ciphertext arrived (or the handshake starts): advance the handshake,
        decrypt into the input buffer, send what OpenSSL wants sent, then call
        on_connection (handshake complete) and on_message (plaintext)."""
        cdef TlsSession tls = self._tls
        cdef bint was_done = tls.handshake_done
        cdef Py_ssize_t got = 0
        cdef list pending
        try:
            tls.feed_raw()
            if tls.handshake():
                got = tls.read_plain(self._input)
        except _ssl.SSLError as exc:
            self._tls_flush()       # an alert for the peer, if any
            self._tls_fail(exc, False)
            return 0
        self._tls_flush()
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        if tls.handshake_done and not was_done:
            if tls.timer_id:
                self._loop.cancel_timer(tls.timer_id)
                tls.timer_id = 0
            pending = tls.pending
            tls.pending = None
            if pending:
                for data in pending:
                    self._write_bytes(data)
            self._show()
        if got > 0 and _socket_open(cppnp_atomic_load32(&self._state)):
            if self._handlers.discard_input:
                self._input.clear()
            elif cppnp_atomic_load32(&self._reading):
                self._deliver()
        if tls.peer_close_notify and not cppnp_atomic_load32(&self._peer_closed) \
                and _socket_open(cppnp_atomic_load32(&self._state)):
            cppnp_atomic_store32(&self._peer_closed, 1)     # the peer's TLS-level EOF
            self._update_interest()
            self._try_finish()
        return 0

    cdef int _tls_flush(self) except -1:
        """Append the ciphertext OpenSSL produced to the output (in order)."""
        cdef bytes data = self._tls.take_output()
        if data:
            self._write_raw(<const char*>data, len(data))
        return 0

    cdef int _tls_fail(self, object exc, bint timeout) except -1:
        """A TLS error or handshake timeout: log, count, close this connection only."""
        cdef TlsSession tls = self._tls
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        if timeout:
            count_handshake_timeout(tls.config)
        else:
            count_tls_error(tls.config)
        try:
            _logger.warning("connection %s: %s: %s", self.name,
                            "TLS handshake failed" if not tls.handshake_done else "TLS error",
                            exc)
        except Exception:
            pass            # a failing log handler must not stop the teardown
        if not tls.handshake_done and self._owner is not None:
            self._owner.tls_failed(self, exc)
        self._close_socket(CLOSE_RESET)
        self._try_finish()
        return 0

    def _tls_timeout_in_loop(self):
        # The handshake timer fired (it is cancelled when the handshake completes).
        cdef TlsSession tls = self._tls
        tls.timer_id = 0
        if not tls.handshake_done:
            self._tls_fail(TimeoutError("TLS handshake timed out after %gs"
                                        % tls.config.handshake_timeout), True)

    cdef int _drop(self, Py_ssize_t nbytes) noexcept:
        cppnp_counter_add(&self._dropped_sends, 1)
        cppnp_counter_add(&self._dropped_bytes, nbytes)
        self._loop.count_drop(nbytes)
        return 0

    cdef int _write(self, const char* p, Py_ssize_t n) except -1:
        """Write accepted data now (encrypted first on a TLS connection); queue what the
        kernel does not take (loop thread)."""
        cdef TlsSession tls = self._tls
        cdef int64_t state
        if tls is None:
            return self._write_raw(p, n)
        state = cppnp_atomic_load32(&self._state)
        if state != CONNECTED and state != DISCONNECTING:
            self._drop(n)
            return 0
        if not tls.handshake_done:
            if tls.pending is None:
                tls.pending = []
            tls.pending.append(PyBytes_FromStringAndSize(p, n))
            return 0
        try:
            tls.encrypt(p, n)
        except _ssl.SSLError as exc:
            self._drop(n)
            self._tls_fail(exc, False)
            return 0
        return self._tls_flush()

    cdef int _write_raw(self, const char* p, Py_ssize_t n) except -1:
        """Write bytes as they are now; queue what the kernel does not take."""
        cdef Py_ssize_t written = 0, old, mark
        cdef int fd = self.fd
        cdef int64_t state = cppnp_atomic_load32(&self._state)
        # FIN_SENT cannot hold accepted data (the FIN waits for it); DISCONNECTED has no
        # socket.
        if state != CONNECTED and state != DISCONNECTING:
            self._drop(n)
            return 0
        old = len(self._output)
        if self._flush_queued or (old == 0 and n <= COALESCE_MAX):
            # Coalesce: written by _flush() before the loop polls again.
            if self._flush_queued:
                self._loop.count_coalesced()
            else:
                _queue_flush(self)
            self._output.append_ptr(p, n)
            cppnp_relaxed_store(&self._output_len, old + n)
            return 0
        if old == 0:
            self._loop.count_write_call()
            while True:     # non-blocking: never waits, so the GIL is kept
                written = send(fd, p, n, MSG_NOSIGNAL)
                if written >= 0 or errno != EINTR:
                    break
            if written < 0:
                if errno != EAGAIN:
                    self._drop(n)
                    self._fault(errno)
                    return 0
                written = 0
            cppnp_counter_add(&self._bytes_sent, written)
            if written == n:
                self._queue_write_complete()
                return 0
        old = len(self._output)
        self._output.append_ptr(p + written, n - written)
        cppnp_relaxed_store(&self._output_len, old + (n - written))
        mark = cppnp_atomic_load(&self._high_water_mark)
        if self._handlers.on_high_water_mark is not None and old < mark <= old + (n - written):
            self._loop.queue(self._high_water_in_loop, old + (n - written))
        if not (self.interest & EPOLLOUT):
            self._update_interest()
        return 0

    cdef int _flush(self) except -1:
        """Write the coalesced output with one send() (the WriteFlusher, loop thread)."""
        cdef int err = 0
        cdef Py_ssize_t n, left, mark
        self._flush_queued = False
        if not _socket_open(cppnp_atomic_load32(&self._state)) or len(self._output) == 0:
            return 0        # closed meanwhile (the output was dropped and counted)
        self._loop.count_write_call()
        n = self._output.write_fd(self.fd, &err)
        if n < 0:
            if err != EAGAIN and err != EINTR:
                self._fault(err)
                return 0
            n = 0
        cppnp_counter_add(&self._bytes_sent, n)
        left = len(self._output)
        cppnp_relaxed_store(&self._output_len, left)
        if left == 0:
            if self._output._cap > KEEP_INPUT_CAPACITY:
                self._output.release_storage()
            self._queue_write_complete()
            self._try_finish()
            return 0
        # As if it had been one send: the output went from empty to *left* queued bytes.
        mark = cppnp_atomic_load(&self._high_water_mark)
        if self._handlers.on_high_water_mark is not None and left >= mark:
            self._loop.queue(self._high_water_in_loop, left)
        self._update_interest()
        return 0

    cdef int _write_bytes(self, object data) except -1:
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._write(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _send_done(self) except -1:
        """An accepted send counted in _queued_sends was written or dropped (loop thread)."""
        if cppnp_atomic_add(&self._queued_sends, -1) == 0 \
                and (cppnp_atomic_load32(&self._state) != CONNECTED
                     or cppnp_atomic_load32(&self._peer_closed)):
            self._try_finish()      # the FIN or the release may have waited for it
        return 0

    # -- sends held behind the tasks in flight (loop thread) ------------------------------

    cdef int _hold(self, object data, int64_t target) except -1:
        """Keep accepted *data* (counted in _queued_sends) until _tasks_finished >= target."""
        if self._held is None:
            self._held = [target, data]
            self._arm_held()
            return 0
        if target < <int64_t>self._held[len(self._held) - 2]:
            target = self._held[len(self._held) - 2]    # never ahead of earlier data
        self._held.append(target)
        self._held.append(data)
        return 0

    cdef int _arm_held(self) except -1:
        """The first held send changed: tell work_released() what it waits for, and flush
        at once (queued behind the replies already queued) if that has happened."""
        cdef int64_t target, finished
        if not self._held:
            self._held = None
            cppnp_atomic_store(&self._held_target, 0)
            return 0
        target = self._held[0]
        cppnp_atomic_store(&self._held_target, target if target > 0 else 1)
        finished = cppnp_atomic_load(&self._tasks_finished)
        if finished >= target:
            self._loop.queue(self._flush_held_in_loop, finished)
        return 0

    cdef int _flush_held(self, int64_t finished) except -1:
        """Write the held sends whose tasks had finished when *finished* was read: their
        replies were queued before that and have been written by now."""
        cdef bint popped = False
        while self._held and <int64_t>self._held[0] <= finished:
            data = self._held[1]
            del self._held[:2]
            popped = True
            try:
                self._write_bytes(data)
            finally:
                self._send_done()
        if popped:
            self._arm_held()
        return 0

    # -- closing ------------------------------------------------------------------------

    def shutdown(self):
        """Half-close: send our FIN once the output accepted so far is written; keep
        reading.

        CONNECTED -> DISCONNECTING at once: sends after this are dropped and counted.  The
        connection is released when the peer closes too.  A no-op once disconnecting or
        closed.

        Thread-safe.
        """
        self._check_created()
        if not cppnp_atomic_cas32(&self._state, CONNECTED, DISCONNECTING):
            return
        self._loop.run_or_queue(self._shutdown_in_loop)

    def force_close(self):
        """Close the socket, dropping queued output (counted).

        From now on sends are dropped and counted (CONNECTED -> DISCONNECTING at once);
        the socket itself is closed by the loop, in a functor (also when called on the
        loop thread: the connection stays usable until the current callback returns).
        on_close runs once no ThreadPool task for this connection is in flight.  A no-op
        once closed.

        Thread-safe.
        """
        self._check_created()
        cdef int64_t state = cppnp_atomic_load32(&self._state)
        if not _socket_open(state):
            return
        cppnp_atomic_cas32(&self._close_reason, CLOSE_NONE, CLOSE_FORCED)
        cppnp_atomic_cas32(&self._state, CONNECTED, DISCONNECTING)
        self._loop.queue(self._force_close_in_loop)

    def stop_reading(self):
        """Stop reading input (flow control); a peer reset is still noticed.

        Thread-safe.
        """
        self._check_created()
        self._loop.run_or_queue(self._set_reading_in_loop, False)

    def start_reading(self):
        """Resume reading input after stop_reading().

        Input already in the input buffer is delivered again (on_message runs once more,
        from the loop's functor pass: never from inside start_reading()), so requests
        left there while reading was stopped are not stuck until the peer sends more.

        Thread-safe.
        """
        self._check_created()
        self._loop.run_or_queue(self._set_reading_in_loop, True)

    @property
    def reading(self):
        """True unless stop_reading() is in effect.

        Thread-safe.
        """
        return cppnp_atomic_load32(&self._reading) != 0

    def set_tcp_nodelay(self, bint on):
        """Set TCP_NODELAY (on by default for accepted connections; TcpServer's
        ``tcp_nodelay`` sets it for every connection).  ``set_tcp_no_delay`` is an alias.

        Thread-safe.
        """
        self._check_created()
        self._loop.run_or_queue(self._set_tcp_nodelay_in_loop, on)

    def set_keepalive(self, bint on):
        """Set SO_KEEPALIVE (TcpServer's ``keepalive`` sets it for every connection).
        ``set_keep_alive`` is an alias.

        Thread-safe.
        """
        self._check_created()
        self._loop.run_or_queue(self._set_keepalive_in_loop, on)

    # -- pool accounting: the WorkOwner interface (task.pxd), any thread -----------------

    cdef bint counts_work(self) noexcept:
        return True

    cdef int work_added(self) noexcept:
        cppnp_atomic_add(&self._tasks_started, 1)
        cppnp_atomic_add(&self._pending_tasks, 1)
        return 0

    cdef int work_released(self) except -1:
        # Held sends first: _flush_held_in_loop is queued behind this task's replies.
        cdef int64_t finished = cppnp_atomic_add(&self._tasks_finished, 1)
        cdef int64_t held = cppnp_atomic_load(&self._held_target)
        if held > 0 and finished >= held:
            self._loop.queue(self._flush_held_in_loop, finished)
        # The loop stores "release wanted" then reads the count; we decrement then read
        # it: with sequentially consistent atomics one of the two sees the other.
        if cppnp_atomic_add(&self._pending_tasks, -1) == 0 and self._release_wanted():
            self._loop.queue(self._finish_in_loop)
        return 0

    cdef bint work_cancelled(self) noexcept:
        return cppnp_atomic_load32(&self._close_reason) >= CLOSE_RESET

    cdef bint _release_wanted(self) noexcept:
        cdef int64_t state = cppnp_atomic_load32(&self._state)
        return state == DISCONNECTED or (
            state != RELEASED and cppnp_atomic_load32(&self._peer_closed) != 0)

    # -- loop-side machinery ------------------------------------------------------------

    cdef int _update_interest(self) except -1:
        cdef uint32_t interest = 0
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        if cppnp_atomic_load32(&self._reading) and not cppnp_atomic_load32(&self._peer_closed):
            interest |= EPOLLIN
        if len(self._output) and not self._flush_queued:
            interest |= EPOLLOUT        # (coalesced output: _flush() writes it first)
        self._loop.update_channel(self, interest)
        return 0

    cdef int _set_reading(self, bint on) except -1:
        cdef int64_t was = cppnp_atomic_load32(&self._reading)
        cppnp_atomic_store32(&self._reading, on)
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        self._update_interest()
        if on and not was and len(self._input):
            self._queue_delivery()
        return 0

    cdef int handle_event(self, uint32_t revents) except -1:
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        if revents & EPOLLERR:
            self._fault(socket_error(self.fd))
            return 0
        if revents & (EPOLLIN | EPOLLPRI):
            self._handle_read()
        if revents & EPOLLOUT and _socket_open(cppnp_atomic_load32(&self._state)):
            self._handle_write()
        if (revents & EPOLLHUP) and not (revents & EPOLLIN) \
                and _socket_open(cppnp_atomic_load32(&self._state)):
            if not cppnp_atomic_load32(&self._reading) \
                    and not cppnp_atomic_load32(&self._peer_closed):
                # Both directions are down but the user paused reading: unread data may
                # still be in the socket.  EPOLLHUP cannot be masked, so leave epoll until
                # start_reading() (which reads what is left, then the EOF).
                self._loop.remove_channel(self)
            else:
                self._fault(0)
        return 0

    cdef int _handle_read(self) except -1:
        cdef int err = 0
        cdef Py_ssize_t n
        if self._tls is not None:
            n = self._tls.raw.read_fd(self.fd, &err)
            if n > 0:
                cppnp_counter_add(&self._bytes_received, n)
                if self._idle is not None:
                    self._idle.touch(self)
                self._tls_step()
                return 0
            if n == 0 and not self._tls.handshake_done:
                self._tls_fail(ConnectionAbortedError(
                    "the peer closed the connection during the TLS handshake"), False)
                return 0
        else:
            n = self._input.read_fd(self.fd, &err)
        if n > 0:
            cppnp_counter_add(&self._bytes_received, n)
            if self._idle is not None:
                self._idle.touch(self)
            if self._handlers.discard_input:
                self._input.clear()
            else:
                self._deliver()
        elif n == 0:
            cppnp_atomic_store32(&self._peer_closed, 1)
            self._update_interest()
            self._try_finish()
        elif err != EAGAIN and err != EINTR:
            self._fault(err)
        return 0

    cdef int _deliver(self) except -1:
        """Hand the input buffer to on_message.  If KeyboardInterrupt or SystemExit leaves
        on_message (Ctrl-C handled at its first bytecode), what is buffered stays and is
        delivered when the loop runs again."""
        try:
            self._handlers.on_message(self, self._input)
        except Exception:
            self._loop.report_error("on_message of %r" % (self,))
        except BaseException:
            self._queue_delivery()
            cppnp_relaxed_store(&self._input_len, len(self._input))
            raise
        if len(self._input) == 0 and self._input._cap > KEEP_INPUT_CAPACITY:
            self._input.release_storage()
        cppnp_relaxed_store(&self._input_len, len(self._input))
        return 0

    cdef int _queue_delivery(self) except -1:
        if not self._delivery_queued:
            self._delivery_queued = True
            self._loop.queue(self._deliver_in_loop)
        return 0

    cdef int _handle_write(self) except -1:
        cdef int err = 0
        cdef Py_ssize_t n
        self._loop.count_write_call()
        n = self._output.write_fd(self.fd, &err)
        if n < 0:
            if err != EAGAIN and err != EINTR:
                self._fault(err)
            return 0
        cppnp_counter_add(&self._bytes_sent, n)
        cppnp_relaxed_store(&self._output_len, len(self._output))
        if len(self._output) == 0:
            self._output.release_storage()
            self._update_interest()
            self._queue_write_complete()
            self._try_finish()
        return 0

    cdef int _fault(self, int err) except -1:
        """The socket failed (reset, EPIPE, hang-up...): close it, drop queued output."""
        if not _socket_open(cppnp_atomic_load32(&self._state)):
            return 0
        if self._tls is not None and not self._tls.handshake_done:
            # A failed handshake: counted, logged, reported to a client's owner.
            self._tls_fail(ConnectionResetError(
                err, os.strerror(err) if err else "connection lost during the TLS handshake"),
                False)
            return 0
        if err and _logger.isEnabledFor(logging.DEBUG):
            try:
                _logger.debug("connection %s: %s", self.name, os.strerror(err))
            except Exception:
                pass            # a failing log handler must not stop the teardown
        self._close_socket(CLOSE_RESET)
        self._try_finish()
        return 0

    cdef int _send_fin(self) except -1:
        """DISCONNECTING -> FIN_SENT: the accepted output is written; shut our side."""
        cppnp_atomic_store32(&self._state, FIN_SENT)
        shutdown(self.fd, SHUT_WR)
        return 0

    cdef int _close_socket(self, int reason) except -1:
        """(any open state) -> DISCONNECTED: drop queued and held output (counted), leave
        epoll, close the fd."""
        cdef Py_ssize_t queued = len(self._output)
        cdef list held = self._held
        cdef Py_ssize_t i
        if queued:
            self._drop(queued)
            self._output.clear()
        self._output.release_storage()
        cppnp_relaxed_store(&self._output_len, 0)
        cppnp_atomic_cas32(&self._close_reason, CLOSE_NONE, reason)
        cppnp_atomic_store32(&self._state, DISCONNECTED)
        self._held = None
        cppnp_atomic_store(&self._held_target, 0)
        if held:
            for i in range(1, len(held), 2):
                self._drop(len(held[i]))
            cppnp_atomic_add(&self._queued_sends, -(len(held) // 2))
        if self._tls is not None and self._tls.timer_id:
            self._loop.cancel_timer(self._tls.timer_id)
            self._tls.timer_id = 0
        self._loop.remove_channel(self)
        with cython.critical_section(self):
            if self.fd >= 0:
                close(self.fd)
                self.fd = -1
        return 0

    cdef int _try_finish(self) except -1:
        """Something changed that may let the connection advance: send the FIN, or decide
        on the release in a functor."""
        cdef int64_t state = cppnp_atomic_load32(&self._state)
        if state == DISCONNECTING and len(self._output) == 0 \
                and cppnp_atomic_load(&self._queued_sends) == 0 \
                and cppnp_atomic_load32(&self._close_reason) == CLOSE_NONE:
            if self._tls is not None and self._tls.handshake_done \
                    and not self._tls.close_notify_sent:
                # TLS: our close_notify goes out before the FIN (_handle_write calls
                # back here once it is written).
                self._tls.close_notify()
                self._tls_flush()
            if cppnp_atomic_load32(&self._state) == DISCONNECTING and len(self._output) == 0:
                self._send_fin()
        if not self._finish_queued and self._release_wanted():
            self._finish_queued = True
            self._loop.queue(self._finish_in_loop)
        return 0

    cdef int _finish(self) except -1:
        cdef int64_t state = cppnp_atomic_load32(&self._state)
        cdef int err = 0
        cdef Py_ssize_t n
        self._finish_queued = False
        if state == RELEASED:
            return 0
        if state != DISCONNECTED:
            if not cppnp_atomic_load32(&self._peer_closed):
                return 0
            if len(self._output):
                return 0        # _handle_write calls _try_finish once drained
        if cppnp_atomic_load(&self._pending_tasks) > 0:
            return 0            # the last work_released() queues _finish_in_loop
        if cppnp_atomic_load(&self._queued_sends) > 0:
            return 0            # replies still queued or held: the last one calls back
        if state != DISCONNECTED:
            if self._tls is not None and self._tls.handshake_done \
                    and not self._tls.close_notify_sent:
                self._tls.close_notify()    # TLS: our close_notify before the close
                self._tls_flush()
                if len(self._output):       # coalesced: write it now, the close is next
                    n = self._output.write_fd(self.fd, &err)
                    if n > 0:
                        cppnp_counter_add(&self._bytes_sent, n)
            self._close_socket(CLOSE_PEER)
        self._release()
        return 0

    cdef int _release(self) except -1:
        """DISCONNECTED -> RELEASED: on_close, and the server forgets the connection."""
        cdef Handlers handlers = self._handlers
        cppnp_atomic_store32(&self._state, RELEASED)
        self._leave_idle()
        self._input.clear()
        self._input.release_storage()
        cppnp_relaxed_store(&self._input_len, 0)
        try:
            if handlers.on_close is not None and self._shown:
                try:
                    handlers.on_close(self)
                except Exception:
                    self._loop.report_error("on_close of %r" % (self,))
        finally:
            if self._owner is not None:
                self._owner.remove_connection(self)
                self._owner = None
        return 0

    cdef int run_functor(self, object arg) except -1:
        # An accepted send from another thread (queued by send() as (self, bytes)).
        try:
            self._write_bytes(arg)
        finally:
            self._send_done()
        return 0

    cdef int _queue_write_complete(self) except -1:
        if self._handlers.on_write_complete is not None:
            self._loop.queue(self._write_complete_in_loop)
        return 0

    # -- work queued to the loop thread: one named method each (muduo's xxxInLoop) -------

    def _finish_in_loop(self):
        # Decide whether the connection can be released (_try_finish, work_released).
        self._finish()

    def _write_complete_in_loop(self):
        # Call on_write_complete only if it is still true: a later send may have queued
        # output meanwhile, or workers' sends may still be on their way to the loop (the
        # last of them to be written queues another one).  This is what makes "stop_reading
        # on high water, start_reading on write complete" bound the output with a worker
        # pool too.
        if _socket_open(cppnp_atomic_load32(&self._state)) and len(self._output) == 0 \
                and self._shown and cppnp_atomic_load(&self._queued_sends) <= 0 \
                and self._handlers.on_write_complete is not None:
            try:
                self._handlers.on_write_complete(self)
            except Exception:
                self._loop.report_error("on_write_complete of %r" % (self,))

    def _high_water_in_loop(self, queued):
        if _socket_open(cppnp_atomic_load32(&self._state)) \
                and self._handlers.on_high_water_mark is not None:
            try:
                self._handlers.on_high_water_mark(self, queued)
            except Exception:
                self._loop.report_error("on_high_water_mark of %r" % (self,))

    def _dropped_in_loop(self, Py_ssize_t nbytes):
        # A send refused at the call on another thread: count the drop, uncount the send.
        try:
            self._drop(nbytes)
        finally:
            self._send_done()

    def _send_after_in_loop(self, tuple value):
        # send(after_tasks=True) from another thread: value is (target, bytes).
        cdef int64_t state = cppnp_atomic_load32(&self._state)
        target, data = value
        if state == CONNECTED or state == DISCONNECTING:
            self._hold(data, target)        # stays counted in _queued_sends
        else:
            try:
                self._drop(len(data))
            finally:
                self._send_done()

    def _flush_held_in_loop(self, int64_t finished):
        self._flush_held(finished)

    def _deliver_in_loop(self):
        # Hand input already buffered to on_message (start_reading, an interrupted one).
        self._delivery_queued = False
        if _socket_open(cppnp_atomic_load32(&self._state)) \
                and cppnp_atomic_load32(&self._reading) \
                and len(self._input) and not self._handlers.discard_input:
            self._deliver()

    def _shutdown_in_loop(self):
        # After shutdown(): the FIN goes out once the accepted output is written.
        self._try_finish()

    def _force_close_in_loop(self):
        if self._flush_queued:
            self._flush()       # what was sent before force_close() gets its one attempt
        if _socket_open(cppnp_atomic_load32(&self._state)):
            self._close_socket(CLOSE_FORCED)
            self._try_finish()

    def _set_reading_in_loop(self, bint on):
        self._set_reading(on)

    def _set_tcp_nodelay_in_loop(self, bint on):
        if _socket_open(cppnp_atomic_load32(&self._state)):
            set_bool_opt(self.fd, IPPROTO_TCP, TCP_NODELAY, on)

    def _set_keepalive_in_loop(self, bint on):
        if _socket_open(cppnp_atomic_load32(&self._state)):
            set_bool_opt(self.fd, SOL_SOCKET, SO_KEEPALIVE, on)

    cdef int on_loop_closed(self) except -1:
        """The loop is closing: close the socket and release, without callbacks."""
        if _socket_open(cppnp_atomic_load32(&self._state)):
            self._close_socket(CLOSE_LOOP)
        else:
            cppnp_atomic_cas32(&self._close_reason, CLOSE_NONE, CLOSE_LOOP)
        cppnp_atomic_store32(&self._state, RELEASED)
        self._idle = None           # the loop's timers are gone: nothing to leave
        self._owner = None
        self._handlers = no_handlers()     # break cycles through the user's handler
        self._held = None
        self._input.clear()
        self._input.release_storage()
        cppnp_relaxed_store(&self._input_len, 0)
        return 0

    # -- seed-compatible names: same objects as the snake_case methods --
    Send = send
    forceClose = force_close
    setTcpNoDelay = set_tcp_nodelay
    # -- older names kept as aliases (same objects) --
    set_tcp_no_delay = set_tcp_nodelay
    set_keep_alive = set_keepalive
