# cython: language_level=3, embedsignature=True
"""EventLoopThreadPool: the io loop threads of a TcpServer (see event_loop_pool.pxd)."""

cimport cython
from libc.stdint cimport int64_t

from _core.event_loop cimport EventLoop, log_exception
from _core.includes.consts cimport IO_JOIN_TIMEOUT, IO_START_TIMEOUT
from _core.includes.sys cimport cppnp_atomic_add, cppnp_atomic_load, cppnp_atomic_store
from _core.tcp_connection cimport ConnectionOwner, TcpConnection

import logging
import threading

cdef object _logger = logging.getLogger("cppnp")

# How long start() waits for a thread's loop, and stop() for a thread to end (seconds,
# includes/consts.pxd).  A thread that does not end in time (a callback blocked on it) is
# logged, not waited for.


@cython.auto_pickle(False)
@cython.final
cdef class IoLoop(ConnectionOwner):
    """One io loop thread of a TcpServer and the connections it serves (internal)."""

    def __cinit__(self):
        self.fd = -1
        self._conns = {}

    def __repr__(self):
        return "<IoLoop %s connections=%d>" % (self._name, self.count())

    @property
    def loop(self):
        """The EventLoop of this thread (None before it started).  Thread-safe."""
        return self._loop

    @property
    def connection_count(self):
        """Connections handed to this loop and not yet released.  Thread-safe."""
        return self.count()

    cdef int64_t count(self) noexcept:
        return cppnp_atomic_load(&self._count)

    def _main(self):
        # The thread: make the loop here (a loop belongs to the thread that creates it),
        # run it until stop(), close it here.
        cdef EventLoop loop
        try:
            loop = EventLoop()
            loop.attach(self)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._loop = loop
        self._ready.set()
        try:
            while not cppnp_atomic_load(&self._stopping):
                try:
                    loop.loop()
                except BaseException:
                    # KeyboardInterrupt / SystemExit out of a callback: on the base loop it
                    # stops loop(); here nobody could run this loop again, so its
                    # connections would hang.  Log it and keep serving.
                    if cppnp_atomic_load(&self._stopping):
                        break
                    log_exception("Exception left the io loop %s (still serving)",
                                  self._name)
        finally:
            loop.close()

    cdef int adopt(self, TcpConnection conn) except -1:
        cppnp_atomic_add(&self._count, 1)
        if not self._loop.queue(self, conn):
            cppnp_atomic_add(&self._count, -1)
            return 0
        return 1

    cdef int run_functor(self, object arg) except -1:
        cdef TcpConnection conn
        if type(arg) is TcpConnection:
            # On the io loop: the connection's whole life starts here.
            conn = <TcpConnection>arg
            self._conns[conn.id] = conn
            conn.start()
            # TcpServer.stop() sets _closing, then force-closes the connections it knows;
            # force_close() is a no-op before start().  We store CONNECTED (start()) then
            # read _closing: with sequentially consistent atomics one side sees the other.
            if cppnp_atomic_load(&self._closing):
                conn.force_close()
        else:
            # On the base loop: the server forgets a connection released on this loop.
            conn = <TcpConnection>arg[0]
            if self._server is not None:
                self._server.remove_connection(conn)
        return 0

    cdef int remove_connection(self, TcpConnection conn) except -1:
        # The connection was released on this (io) loop: on_close has run.
        if self._conns.pop(conn.id, None) is not None:
            cppnp_atomic_add(&self._count, -1)
        self._base.queue(self, (conn,))    # dropped (and counted) if the base loop closed
        return 0

    cdef int on_loop_closed(self) except -1:
        # This loop is closing (in its thread): release what is left, without callbacks.
        cdef TcpConnection conn
        for conn in list(self._conns.values()):
            conn.on_loop_closed()
        self._conns.clear()
        cppnp_atomic_store(&self._count, 0)
        return 0


@cython.auto_pickle(False)
@cython.final
cdef class EventLoopThreadPool:
    """N EventLoops, each in its own thread, serving a TcpServer's connections (internal;
    muduo's EventLoopThreadPool).  See ``TcpServer(..., io_threads=N)``."""

    def __cinit__(self):
        self._loops = []
        self._lock = threading.Lock()

    def __init__(self, EventLoop base not None, int nthreads, str name):
        if nthreads < 1:
            raise ValueError("an EventLoopThreadPool needs at least one thread")
        self._base = base
        self._nthreads = nthreads
        self._name = name

    def __repr__(self):
        return "<EventLoopThreadPool %s threads=%d>" % (self._name, self._nthreads)

    @property
    def loops(self):
        """The io loops (EventLoop), in thread order; empty before start().  Thread-safe."""
        return [(<IoLoop>io)._loop for io in self._loops]

    def connection_counts(self):
        """Connections on each io loop, in thread order.  Thread-safe."""
        return [(<IoLoop>io).count() for io in self._loops]

    cdef int start(self, ConnectionOwner server) except -1:
        cdef IoLoop io
        cdef list loops = []
        cdef int i
        with self._lock:
            if cppnp_atomic_load(&self._state) != 0:
                raise RuntimeError("EventLoopThreadPool.start() called twice")
            try:
                for i in range(self._nthreads):
                    io = IoLoop.__new__(IoLoop)
                    io.index = i
                    io._base = self._base
                    io._server = server
                    io._name = "%s-io%d" % (self._name, i)
                    io._ready = threading.Event()
                    io._thread = threading.Thread(target=io._main, name=io._name, daemon=True)
                    loops.append(io)
                    io._thread.start()
                for io in loops:
                    if not io._ready.wait(IO_START_TIMEOUT):
                        raise RuntimeError("io loop thread %s did not start within %s s"
                                           % (io._name, IO_START_TIMEOUT))
                    if io._error is not None:
                        raise RuntimeError("io loop thread %s failed to start: %s"
                                           % (io._name, io._error)) from io._error
            except BaseException:
                _stop_loops(loops)
                cppnp_atomic_store(&self._state, 2)
                raise
            self._loops = loops
            cppnp_atomic_store(&self._state, 1)
        return 0

    cdef IoLoop next_loop(self):
        # Least connections, ties broken round-robin: with equal lifetimes this is
        # round-robin; when some connections live long and others churn, new ones go to
        # the loops that have fewest.
        cdef int n = self._nthreads, i, start = <int>self._next
        cdef IoLoop best = <IoLoop>self._loops[start], io
        cdef int64_t best_count = best.count(), c
        self._next = (start + 1) % n
        for i in range(1, n):
            io = <IoLoop>self._loops[(start + i) % n]
            c = io.count()
            if c < best_count:
                best = io
                best_count = c
        return best

    cdef int close_all(self) except -1:
        cdef IoLoop io
        for io in self._loops:
            cppnp_atomic_store(&io._closing, 1)
        return 0

    cdef int stop(self) except -1:
        cdef list loops
        with self._lock:
            if cppnp_atomic_load(&self._state) == 2:
                return 0
            cppnp_atomic_store(&self._state, 2)
            loops = self._loops
        _stop_loops(loops)
        return 0


cdef int _stop_loops(list loops) except -1:
    """Quit each loop and join its thread (each loop closes in its own thread, releasing
    what is left on it without callbacks).  From an io loop thread, that thread is not
    joined: it ends when the current callback returns."""
    cdef IoLoop io
    me = threading.get_ident()
    for io in loops:
        cppnp_atomic_store(&io._stopping, 1)
        if io._thread is not None and io._thread.ident is not None:
            io._ready.wait(IO_START_TIMEOUT)    # (start() failed) the loop may still be coming
        if io._loop is not None:
            io._loop.quit()
    for io in loops:
        t = io._thread
        if t is None or t.ident is None or t.ident == me:
            continue
        t.join(IO_JOIN_TIMEOUT)
        if t.is_alive():
            try:
                _logger.warning("io loop thread %s did not stop within %s s", io._name,
                                IO_JOIN_TIMEOUT)
            except Exception:
                pass
    for io in loops:
        io._server = None        # no cycle through the server once stopped
    return 0
