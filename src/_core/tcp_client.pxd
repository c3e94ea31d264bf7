# TcpClient: one outgoing connection, made (and remade) by a Connector (connector.pxd),
# served as an ordinary TcpConnection (muduo's TcpClient).
#
# _wanted (atomic) is the user's wish: set by connect(), cleared by disconnect() and
# stop(), from any thread; the loop acts on it in the *_in_loop functors.  The Connector
# and the reconnect decision are the loop thread's.  _connection is written by the loop
# inside a critical section on the client and read anywhere inside one.  The client is
# attached to its loop (the loop tells it when it closes) from connect() until it is
# neither connecting nor connected.
from libc.stdint cimport int32_t, int64_t

from _core.connector cimport Connector
from _core.event_loop cimport EventLoop
from _core.handler cimport Handlers
from _core.idle_wheel cimport IdleWheel
from _core.includes.linux cimport sockaddr_storage
from _core.tcp_connection cimport ConnectionOwner, TcpConnection
from _core.tls cimport TlsConfig


cdef class TcpClient(ConnectionOwner):
    cdef:
        EventLoop _loop
        object _address
        object _handler
        Handlers _handlers
        object _on_connect_error
        object _name
        bint _retry
        bint _tcp_nodelay
        bint _initialized
        Connector _connector
        TlsConfig _tls                  # ssl=: read-only after __init__, or None
        double _idle_timeout            # seconds, read-only after __init__; 0: off
        IdleWheel _idle                 # loop thread: made at the first connection, or None
        TcpConnection _connection
        int32_t _wanted                 # atomic: connect() asked, no disconnect()/stop()
        int64_t _connections_made       # relaxed counters
        int64_t _connect_errors

    cdef int _check_created(self) except -1
    cdef int _new_connection(self, int fd, const sockaddr_storage* peer) except -1
    cdef int _connect_error(self, object exc, bint will_retry) except -1
    cdef int tls_failed(self, TcpConnection conn, object exc) except -1
    cdef int _maybe_detach(self) except -1
