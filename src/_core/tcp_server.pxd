# TcpServer: an Acceptor (acceptor.pxd: the listening socket) and the connections it
# accepted (muduo's TcpServer).
#
# States (_state, atomic; changed under _lock by start(), stop(), stop_accepting() from any
# thread; the loop closes the listener):
#   SERVER_NEW --start()--> SERVER_STARTED --stop_accepting()--> SERVER_NOT_ACCEPTING
#        \                        |                                    |
#         +------------------------+-------------- stop() -------------+--> SERVER_STOPPED
# While started, or while it has connections, the server is attached to the loop (the
# loop tells it when it closes); once its listener is closed and its last connection is
# released it detaches, so nothing of a stopped server stays alive.
#
# io_threads > 0 (see event_loop_pool.pxd): start() starts the io loops; each accepted
# connection is handed to one (its owner is that IoLoop, which forwards the release back
# to remove_connection() on this loop).  The io loops are stopped (quit + joined) when the
# server detaches, or when its loop closes (before the table is cleared).
from libc.stdint cimport int64_t

from _core.acceptor cimport Acceptor
from _core.event_loop cimport EventLoop
from _core.event_loop_pool cimport EventLoopThreadPool
from _core.handler cimport Handlers
from _core.includes.linux cimport sockaddr_storage
from _core.tcp_connection cimport ConnectionOwner, TcpConnection
from _core.tls cimport TlsConfig


cdef enum ServerState:
    SERVER_NEW = 0
    SERVER_STARTED = 1          # listening
    SERVER_NOT_ACCEPTING = 2    # stop_accepting(): listener closed, connections carry on
    SERVER_STOPPED = 3          # stop(): listener closed, connections force-closed


cdef class TcpServer(ConnectionOwner):
    cdef:
        EventLoop _loop
        object _address                # what the user asked for
        object _bound                  # what the socket is bound to
        object _handler
        Handlers _handlers
        str _name                      # the name property
        bint _reuse_port
        int _backlog
        Acceptor _acceptor             # the listening socket (made by __init__)
        bint _initialized              # __init__ ran: it runs once
        int64_t _state                 # atomic ServerState
        object _lock                   # threading.Lock: start/stop vs the listener's fd
        dict _connections              # id -> TcpConnection (loop thread)
        int64_t _n_connections         # len(_connections), readable from any thread
        int _io_threads                # io loop threads asked for (0: serve on _loop)
        EventLoopThreadPool _pool      # the io loops from start() until stopped, or None
        TlsConfig _tls                 # ssl=: read-only after __init__, or None
        double _idle_timeout           # seconds; 0: off
        # loop -> IdleWheel: made on the base loop thread, read in a critical section
        dict _wheels
        object __weakref__

    # The Acceptor accepted *fd* from *peer* (loop thread): make and start its connection.
    cdef int _new_connection(self, int fd, const sockaddr_storage* peer) except -1
    cdef bint _stop_to(self, int64_t state) except -1
    cdef int _in_loop_or_closed(self, object fn) except -1
    cdef int _stop_io_loops(self) except -1
    cdef int _watch_idle(self, TcpConnection conn, EventLoop loop) except -1
    cdef int _close_listener(self) except -1
    cdef int _check_created(self) except -1
    cdef int _maybe_detach(self) except -1
