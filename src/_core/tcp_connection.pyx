# cython: language_level=3, embedsignature=True
"""TcpConnection: one accepted TCP connection."""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memcpy

from _core.buffer cimport Buffer
from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.linux cimport (
    EAGAIN, EINTR, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLPRI, IPPROTO_TCP,
    MSG_NOSIGNAL, SHUT_WR, SO_KEEPALIVE, SOL_SOCKET, TCP_NODELAY, close, errno,
    getsockname, send, shutdown, sockaddr, sockaddr_storage, socklen_t,
)
from _core.includes.sys cimport cppnp_atomic_add, cppnp_atomic_load, cppnp_atomic_store
from _core.includes.sys cimport cppnp_atomic_load_int  # work_cancelled() only
from _core.socket_ops cimport set_bool_opt, sockaddr_to_tuple, socket_error

import logging
import os

cdef object _logger = logging.getLogger("cppnp")
cdef int64_t _live_connections = 0
cdef int64_t _next_id = 0

# Operations queued to the loop as (connection, op) pairs.
cdef enum:
    OP_FINISH = 1
    OP_WRITE_COMPLETE = 2
    OP_SHUTDOWN = 3
    OP_FORCE_CLOSE = 4
    OP_START_READING = 5
    OP_STOP_READING = 6
    OP_NODELAY_ON = 7
    OP_NODELAY_OFF = 8
    OP_HIGH_WATER = 9
    OP_KEEPALIVE_ON = 10
    OP_KEEPALIVE_OFF = 11

# Input buffers above this size are given back to the allocator once drained (a
# connection that keeps receiving large messages keeps a buffer that fits them).
DEF KEEP_INPUT_CAPACITY = 262144


def live_connections():
    """Return how many TcpConnection objects are alive (a leak check for tests)."""
    return cppnp_atomic_load(&_live_connections)


cdef object _resolve(object handler, str name):
    method = getattr(handler, name, None)
    if method is None or getattr(method, "__cppnp_noop__", False):
        return None
    if not callable(method):
        raise TypeError("handler.%s must be callable, got %r" % (name, type(method).__name__))
    return method


cdef Handlers resolve_handlers(object handler):
    cdef Handlers h = Handlers.__new__(Handlers)
    h.on_connection = _resolve(handler, "on_connection")
    h.on_message = _resolve(handler, "on_message")
    h.discard_input = h.on_message is None or getattr(
        h.on_message, "__cppnp_discard__", False)
    if h.discard_input:
        h.on_message = None
    h.on_write_complete = _resolve(handler, "on_write_complete")
    h.on_high_water_mark = _resolve(handler, "on_high_water_mark")
    h.on_close = _resolve(handler, "on_close")
    return h


@cython.auto_pickle(False)
@cython.final
cdef class Handlers:
    pass


cdef Handlers _NO_HANDLERS = Handlers.__new__(Handlers)
_NO_HANDLERS.discard_input = True


@cython.auto_pickle(False)
cdef class ConnectionOwner(Channel):
    cdef int remove_connection(self, TcpConnection conn) except -1:
        return 0


cdef TcpConnection new_connection(EventLoop loop, int fd, ConnectionOwner owner,
                                  Handlers handlers, const sockaddr_storage* peer, str prefix):
    cdef TcpConnection c = TcpConnection.__new__(TcpConnection)
    c._loop = loop
    c.fd = fd
    c._owner = owner
    c._handlers = handlers
    c._state = CONNECTED
    c._reading = True
    memcpy(&c._peer, peer, sizeof(sockaddr_storage))
    c._prefix = prefix
    c.id = cppnp_atomic_add(&_next_id, 1)
    return c


@cython.auto_pickle(False)
@cython.final
cdef class TcpConnection(Channel):
    """One TCP connection accepted by a TcpServer (muduo's TcpConnection).

    Created by the server, never by users.  Call order of the handler's callbacks:
    ``on_connection -> [on_message | on_write_complete | on_high_water_mark]* -> on_close``,
    all on the loop thread.  ``send``, ``shutdown``, ``force_close`` and the reading and
    option switches are thread-safe: from another thread they are queued to the loop.

    Lifetime: the connection is released (socket closed, ``on_close`` called once) when
    the peer has closed, or the socket failed, or ``force_close()`` ran -- and no ThreadPool
    task that refers to it is still in flight.  After a half-close (peer ``SHUT_WR``) the
    replies of those tasks are still written, in order.  Replies after the socket failed
    or closed are dropped and counted in ``dropped_sends`` / ``dropped_bytes``.
    """

    def __cinit__(self):
        self._input = Buffer()
        self._output = Buffer()
        self._high_water_mark = 64 * 1024 * 1024
        self._state = 0
        cppnp_atomic_add(&_live_connections, 1)

    def __init__(self, *args, **kwargs):
        raise TypeError("TcpConnection objects are created by TcpServer, not directly")

    def __dealloc__(self):
        if self.fd >= 0 and self._state == CONNECTED:
            close(self.fd)      # never registered: nothing else owns it
        cppnp_atomic_add(&_live_connections, -1)

    def __repr__(self):
        state = {CONNECTED: "connected", CLOSED_WAIT: "closing",
                 RELEASED: "closed"}.get(self._state, "new")
        return "<TcpConnection %s %s peer=%r>" % (self.name, state, self.peer_address)

    cdef int start(self) except -1:
        """Register with the loop and call on_connection (loop thread)."""
        self._update_interest()
        if self._handlers.on_connection is not None:
            try:
                self._handlers.on_connection(self)
            except Exception:
                self._loop.report_error("on_connection of %r" % (self,))
        return 0

    cdef int _check_created(self) except -1:
        if self._loop is None:
            raise RuntimeError("this TcpConnection was not created by a TcpServer")
        return 0

    # -- state --------------------------------------------------------------------------

    @property
    def connected(self):
        """True until the socket is closed (also after the peer half-closed)."""
        return self._state == CONNECTED

    @property
    def peer_closed(self):
        """True once the peer has closed its sending side (read returned EOF)."""
        return self._peer_closed

    @property
    def closed(self):
        """True once the connection has been released (on_close has run)."""
        return self._state == RELEASED

    @property
    def name(self):
        """A name unique in the process: ``<server>-<peer>#<id>``."""
        if self._name is None:
            peer = self.peer_address
            if peer is None:
                where = "?"
            elif ":" in peer[0]:
                where = "[%s]:%d" % (peer[0], peer[1])
            else:
                where = "%s:%d" % (peer[0], peer[1])
            self._name = "%s-%s#%d" % (self._prefix, where, self.id)
        return self._name

    @property
    def peer_address(self):
        """The peer's address: ``(host, port)`` (IPv6: ``(host, port, flow, scope)``)."""
        if self._peer_address is None:
            self._peer_address = sockaddr_to_tuple(<sockaddr*>&self._peer)
        return self._peer_address

    @property
    def local_address(self):
        """The local address of the socket (None once closed, if never asked before)."""
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        if self._local_address is None and self._state == CONNECTED:
            if getsockname(self.fd, <sockaddr*>&ss, &n) == 0:
                self._local_address = sockaddr_to_tuple(<sockaddr*>&ss)
        return self._local_address

    @property
    def loop(self):
        """The EventLoop the connection belongs to."""
        return self._loop

    @property
    def fileno(self):
        """The socket's fd, or -1 once closed.  For inspection only: never close it."""
        return self.fd

    @property
    def pending_tasks(self):
        """ThreadPool tasks referring to this connection that have not finished."""
        return cppnp_atomic_load(&self._pending_tasks)

    @property
    def output_bytes(self):
        """Bytes queued in the output buffer, not yet accepted by the kernel."""
        return len(self._output)

    @property
    def input_bytes(self):
        """Bytes received and left in the input buffer by on_message."""
        return len(self._input)

    @property
    def input_buffer(self):
        """The input Buffer passed to on_message.  Loop thread only."""
        self._check_created()
        self._loop.assert_in_loop_thread("TcpConnection.input_buffer")
        return self._input

    @property
    def high_water_mark(self):
        """The output-buffer size at which on_high_water_mark fires."""
        return self._high_water_mark

    def set_high_water_mark(self, Py_ssize_t nbytes):
        """Call on_high_water_mark when queued output crosses *nbytes* upwards.  Thread-safe."""
        if nbytes <= 0:
            raise ValueError("high water mark must be > 0, got %d" % nbytes)
        self._high_water_mark = nbytes

    # -- sending ------------------------------------------------------------------------

    def send(self, data):
        """Send *data* (bytes-like; str is encoded as UTF-8).

        Never blocks: what the kernel does not take now is queued in the output buffer
        and written when the socket is writable.  If the connection is closed or the peer
        vanished, the data is dropped and counted (no exception).  From a non-loop thread
        the data is copied and the write is queued to the loop; replies one thread sends
        go out in the order it sent them.  Thread-safe.
        """
        self._check_created()
        cdef Py_buffer view
        if isinstance(data, str):
            data = (<str>data).encode("utf-8")
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except BufferError as exc:
            raise TypeError("send() needs a contiguous bytes-like object: %s" % exc) from None
        try:
            if view.len == 0:
                return
            if self._loop.in_loop_thread():
                self._send_in_loop(<const char*>view.buf, view.len)
                return
            if type(data) is not bytes:
                data = PyBytes_FromStringAndSize(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        # Counted before it is queued (and so before the caller's task is counted
        # finished): see the lifetime notes in tcp_connection.pxd.
        cppnp_atomic_add(&self._queued_sends, 1)
        if not self._loop.queue(self, data):
            cppnp_atomic_add(&self._queued_sends, -1)   # the loop is closed: dropped

    cdef int _drop(self, Py_ssize_t nbytes) noexcept:
        self.dropped_sends += 1
        self.dropped_bytes += nbytes
        self._loop.count_drop(nbytes)
        return 0

    cdef int _send_in_loop(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t written = 0, old
        cdef int fd = self.fd
        if self._state != CONNECTED or self._shut_wr_done:
            self._drop(n)
            return 0
        if len(self._output) == 0:
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
            self.bytes_sent += written
            if written == n:
                if self._handlers.on_write_complete is not None:
                    self._loop.queue(self, OP_WRITE_COMPLETE)
                return 0
        old = len(self._output)
        self._output.append_ptr(p + written, n - written)
        if (self._handlers.on_high_water_mark is not None
                and old < self._high_water_mark <= old + (n - written)):
            self._loop.queue(self, (OP_HIGH_WATER, old + (n - written)))
        if not (self.interest & EPOLLOUT):
            self._update_interest()
        return 0

    # -- closing ------------------------------------------------------------------------

    def shutdown(self):
        """Half-close: send FIN once the queued output is written; keep reading.

        Sends after this are dropped.  The connection is released when the peer closes
        too.  Thread-safe.
        """
        self._check_created()
        self._loop.queue(self, OP_SHUTDOWN)

    def force_close(self):
        """Close the socket now, dropping queued output (counted).  Thread-safe.

        on_close runs once no ThreadPool task for this connection is in flight.
        """
        self._check_created()
        self._loop.queue(self, OP_FORCE_CLOSE)

    def stop_reading(self):
        """Stop reading input (flow control); a peer reset is still noticed.  Thread-safe."""
        self._check_created()
        if self._loop.in_loop_thread():
            self._do_op(OP_STOP_READING, None)
        else:
            self._loop.queue(self, OP_STOP_READING)

    def start_reading(self):
        """Resume reading input after stop_reading().  Thread-safe."""
        self._check_created()
        if self._loop.in_loop_thread():
            self._do_op(OP_START_READING, None)
        else:
            self._loop.queue(self, OP_START_READING)

    @property
    def reading(self):
        """True unless stop_reading() is in effect."""
        return self._reading

    def set_tcp_no_delay(self, bint on):
        """Set TCP_NODELAY (on by default for accepted connections).  Thread-safe."""
        self._check_created()
        op = OP_NODELAY_ON if on else OP_NODELAY_OFF
        if self._loop.in_loop_thread():
            self._do_op(op, None)
        else:
            self._loop.queue(self, op)

    def set_keep_alive(self, bint on):
        """Set SO_KEEPALIVE.  Thread-safe."""
        self._check_created()
        op = OP_KEEPALIVE_ON if on else OP_KEEPALIVE_OFF
        if self._loop.in_loop_thread():
            self._do_op(op, None)
        else:
            self._loop.queue(self, op)

    # -- pool accounting (any thread) ---------------------------------------------------

    cdef int task_started(self) noexcept:
        cppnp_atomic_add(&self._pending_tasks, 1)
        return 0

    cdef int task_finished(self) except -1:
        # The loop stores _release_wanted then reads the count; we decrement then read the
        # flag: with sequentially consistent atomics one of the two sees the other.
        if cppnp_atomic_add(&self._pending_tasks, -1) == 0 \
                and cppnp_atomic_load(&self._release_wanted):
            self._loop.queue(self, OP_FINISH)
        return 0

    cdef bint work_cancelled(self) noexcept:
        # ThreadPool hook (issue 8 item 19): True once the socket was closed by a peer
        # reset, a fault, force_close() or the loop's close(); the pool then discards the
        # connection's queued tasks instead of running them.  False while connected, and
        # for a peer that half-closed (FIN) first: its work still runs and its replies go
        # out (its normal release leaves _peer_closed set too).  Derived from the loop
        # thread's fields: _peer_closed is set before _state leaves CONNECTED and neither
        # changes afterwards, so two atomic reads in this order suffice.  Any thread.
        # (To be re-derived from the connection state machine when it lands.)
        cdef int state = cppnp_atomic_load_int(&self._state)
        return ((state == CLOSED_WAIT or state == RELEASED)
                and not cppnp_atomic_load_int(<int*>&self._peer_closed))

    # -- loop-side machinery ------------------------------------------------------------

    cdef int _update_interest(self) except -1:
        cdef uint32_t interest = 0
        if self._state != CONNECTED:
            return 0
        if self._reading and not self._peer_closed:
            interest |= EPOLLIN
        if len(self._output):
            interest |= EPOLLOUT
        self._loop.update_channel(self, interest)
        return 0

    cdef int handle_event(self, uint32_t revents) except -1:
        if self._state != CONNECTED:
            return 0
        if revents & EPOLLERR:
            self._fault(socket_error(self.fd))
            return 0
        if revents & (EPOLLIN | EPOLLPRI):
            self._handle_read()
        if self._state == CONNECTED and revents & EPOLLOUT:
            self._handle_write()
        if self._state == CONNECTED and (revents & EPOLLHUP) and not (revents & EPOLLIN):
            if not self._reading and not self._peer_closed:
                # Both directions are down but the user paused reading: unread data may
                # still be in the socket.  EPOLLHUP cannot be masked, so leave epoll until
                # start_reading() (which reads what is left, then the EOF).
                self._loop.remove_channel(self)
            else:
                self._fault(0)
        return 0

    cdef int _handle_read(self) except -1:
        cdef int err = 0
        cdef Py_ssize_t n = self._input.read_fd(self.fd, &err)
        if n > 0:
            self.bytes_received += n
            if self._handlers.discard_input:
                self._input.clear()
            else:
                try:
                    self._handlers.on_message(self, self._input)
                except Exception:
                    self._loop.report_error("on_message of %r" % (self,))
            if len(self._input) == 0 and self._input._cap > KEEP_INPUT_CAPACITY:
                self._input.release_storage()
        elif n == 0:
            self._peer_closed = True
            self._update_interest()
            self._try_finish()
        elif err != EAGAIN and err != EINTR:
            self._fault(err)
        return 0

    cdef int _handle_write(self) except -1:
        cdef int err = 0
        cdef Py_ssize_t n = self._output.write_fd(self.fd, &err)
        if n < 0:
            if err != EAGAIN and err != EINTR:
                self._fault(err)
            return 0
        self.bytes_sent += n
        if len(self._output) == 0:
            self._output.release_storage()
            self._update_interest()
            if self._handlers.on_write_complete is not None:
                self._loop.queue(self, OP_WRITE_COMPLETE)
            self._try_finish()
        return 0

    cdef int _fault(self, int err) except -1:
        """The socket failed (reset, EPIPE, ...): close it, drop queued output."""
        if self._state != CONNECTED:
            return 0
        if err and _logger.isEnabledFor(logging.DEBUG):
            try:
                _logger.debug("connection %s: %s", self.name, os.strerror(err))
            except Exception:
                pass            # a failing log handler must not stop the teardown
        self._close_socket()
        self._try_finish()
        return 0

    cdef int _close_socket(self) except -1:
        cdef Py_ssize_t queued = len(self._output)
        if queued:
            self._drop(queued)
            self._output.clear()
        self._output.release_storage()
        self._loop.remove_channel(self)
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        self._state = CLOSED_WAIT
        return 0

    cdef int _try_finish(self) except -1:
        """Something changed that may let the connection finish: decide in a functor."""
        if self._state == CONNECTED and not self._peer_closed:
            if self._shutdown_requested and not self._shut_wr_done \
                    and len(self._output) == 0:
                shutdown(self.fd, SHUT_WR)
                self._shut_wr_done = True
            return 0
        if self._state != RELEASED and not self._finish_queued:
            self._finish_queued = True
            self._loop.queue(self, OP_FINISH)
        return 0

    cdef int _finish(self) except -1:
        self._finish_queued = False
        if self._state == RELEASED:
            return 0
        if self._state == CONNECTED:
            if not self._peer_closed:
                return 0
            if len(self._output):
                return 0        # _handle_write calls _try_finish once drained
        cppnp_atomic_store(&self._release_wanted, 1)
        if cppnp_atomic_load(&self._pending_tasks) > 0:
            return 0            # the last task_finished() queues OP_FINISH
        if cppnp_atomic_load(&self._queued_sends) > 0:
            return 0            # replies still queued: the last one calls _try_finish
        if self._state == CONNECTED:
            self._close_socket()
        self._release()
        return 0

    cdef int _release(self) except -1:
        cdef Handlers handlers = self._handlers
        self._state = RELEASED
        self._input.clear()
        self._input.release_storage()
        try:
            if handlers.on_close is not None:
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
        cdef Py_buffer view
        if type(arg) is bytes:
            PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE)
            try:
                self._send_in_loop(<const char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
                if cppnp_atomic_add(&self._queued_sends, -1) == 0 \
                        and cppnp_atomic_load(&self._release_wanted):
                    self._try_finish()
        elif type(arg) is tuple:
            self._do_op(arg[0], arg[1])
        else:
            self._do_op(arg, None)
        return 0

    cdef int _do_op(self, int op, object value) except -1:
        if op == OP_FINISH:
            self._finish()
        elif op == OP_WRITE_COMPLETE:
            # Only if it is still true: a later send may have queued output meanwhile, or
            # workers' sends may still be on their way to the loop (the last of them to be
            # written queues another one).  This is what makes "stop_reading on high water,
            # start_reading on write complete" bound the output with a worker pool too.
            if self._state == CONNECTED and len(self._output) == 0 \
                    and cppnp_atomic_load(&self._queued_sends) <= 0 \
                    and self._handlers.on_write_complete is not None:
                try:
                    self._handlers.on_write_complete(self)
                except Exception:
                    self._loop.report_error("on_write_complete of %r" % (self,))
        elif op == OP_HIGH_WATER:
            if self._state == CONNECTED and self._handlers.on_high_water_mark is not None:
                try:
                    self._handlers.on_high_water_mark(self, value)
                except Exception:
                    self._loop.report_error("on_high_water_mark of %r" % (self,))
        elif op == OP_SHUTDOWN:
            if self._state == CONNECTED:
                self._shutdown_requested = True
                self._try_finish()
        elif op == OP_FORCE_CLOSE:
            if self._state == CONNECTED:
                self._close_socket()
                self._try_finish()
        elif op == OP_START_READING or op == OP_STOP_READING:
            self._reading = op == OP_START_READING
            self._update_interest()
        elif self._state == CONNECTED:
            if op == OP_NODELAY_ON or op == OP_NODELAY_OFF:
                set_bool_opt(self.fd, IPPROTO_TCP, TCP_NODELAY, op == OP_NODELAY_ON)
            elif op == OP_KEEPALIVE_ON or op == OP_KEEPALIVE_OFF:
                set_bool_opt(self.fd, SOL_SOCKET, SO_KEEPALIVE, op == OP_KEEPALIVE_ON)
        return 0

    cdef int on_loop_closed(self) except -1:
        """The loop is closing: close the socket and release, without callbacks."""
        if self._state == CONNECTED:
            self._close_socket()
        self._state = RELEASED
        self._owner = None
        self._handlers = _NO_HANDLERS      # break cycles through the user's handler
        self._input.clear()
        self._input.release_storage()
        return 0

    # -- seed-compatible names: same objects as the snake_case methods --
    Send = send
    forceClose = force_close
    setTcpNoDelay = set_tcp_no_delay
