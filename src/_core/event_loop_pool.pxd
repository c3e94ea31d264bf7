# EventLoopThreadPool: N EventLoops, each in a thread of its own, that a TcpServer hands
# its accepted connections to (muduo's EventLoopThreadPool + TcpServer::setThreadNum).
#
# Threads and ownership:
#   - The base loop (the server's) accepts and owns the server's connection table.
#   - Each IoLoop is one loop thread.  It is the ConnectionOwner of the connections it
#     serves: adopt() (base loop thread) counts the connection and queues its start() to
#     the io loop; the connection's release calls remove_connection() on the io loop,
#     which forgets it there and queues the server's remove_connection() back to the base
#     loop (muduo: removeConnection in the server loop, connectDestroyed in the io loop).
#   - The IoLoop is attached to its loop, so closing that loop releases (without
#     callbacks) the connections still on it, as EventLoop.close() does for a server.
#   - stop() (any thread but an io loop thread) quits every io loop and joins its thread;
#     each loop is closed in its own thread.
from libc.stdint cimport int64_t

from _core.event_loop cimport EventLoop
from _core.tcp_connection cimport ConnectionOwner, TcpConnection


cdef class IoLoop(ConnectionOwner):
    cdef:
        readonly int index
        EventLoop _loop                 # set by the thread before _ready is set
        EventLoop _base
        ConnectionOwner _server         # forgets connections on the base loop; None once stopped
        object _thread                  # threading.Thread
        object _ready                   # threading.Event: the loop exists (or failed)
        object _error                   # what made the thread fail to start, or None
        int64_t _stopping               # atomic: stop() asked the thread to end
        int64_t _closing                # atomic: the server force-closes its connections
        int64_t _count                  # atomic: connections adopted and not yet released
        dict _conns                     # id -> TcpConnection (io loop thread only)
        str _name

    # Base loop thread: count *conn* and queue its start() to this loop.  Returns 0 if the
    # loop is closed (nothing counted; the caller drops the connection).
    cdef int adopt(self, TcpConnection conn) except -1
    cdef int64_t count(self) noexcept


cdef class EventLoopThreadPool:
    cdef:
        EventLoop _base
        str _name
        int _nthreads
        list _loops                     # IoLoop, fixed once started
        int64_t _state                  # atomic: 0 new, 1 started, 2 stopped
        int64_t _next                   # base loop thread: where the tie-break starts
        object _lock                    # threading.Lock: start() vs stop()

    cdef int start(self, ConnectionOwner server) except -1
    # The server is force-closing its connections (TcpServer.stop()): a connection whose
    # start() is still queued to an io loop is force-closed right after it starts.
    cdef int close_all(self) except -1
    # Base loop thread: the IoLoop with the fewest connections (ties: round-robin).
    cdef IoLoop next_loop(self)
    cdef int stop(self) except -1
