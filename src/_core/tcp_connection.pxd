# TcpConnection: one accepted TCP connection (muduo's TcpConnection).
#
# Lifetime (the seed's _theothersideisclosed + _pacCount).  A connection counts the tasks
# handed to a ThreadPool that refer to it and have not finished (_pending_tasks, atomic).
# It is released -- fd closed, on_close called once, forgotten by its server -- only when
#   (the peer closed, or a fault or force_close() closed the socket) AND _pending_tasks == 0
#   AND (for a peer that only half-closed) every queued reply has been written.
# A worker's reply is counted in _queued_sends before its task is counted finished, so when
# the loop sees _pending_tasks == 0 every reply of a finished task is already counted: the
# release also waits for _queued_sends == 0.  The decision is taken by a functor
# (OP_FINISH), so user callbacks never run from inside send().
from libc.stdint cimport int64_t, uint32_t

from _core.buffer cimport Buffer
from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.linux cimport sockaddr_storage


cdef enum ConnState:
    CONNECTED = 1       # socket open
    CLOSED_WAIT = 2     # socket closed; waiting for tasks in flight before release
    RELEASED = 3        # on_close ran; gone from the server


cdef class Handlers:
    """The user's callbacks, resolved once per server (None where not overridden)."""
    cdef:
        object on_connection
        object on_message
        object on_write_complete
        object on_high_water_mark
        object on_close
        bint discard_input


cdef class ConnectionOwner(Channel):
    # Called by a connection when it is released (loop thread).
    cdef int remove_connection(self, TcpConnection conn) except -1


cdef class TcpConnection(Channel):
    cdef:
        EventLoop _loop
        ConnectionOwner _owner
        Handlers _handlers
        int _state
        bint _peer_closed           # read returned 0 (FIN)
        bint _reading               # the user wants input (stop_reading/start_reading)
        bint _shutdown_requested    # shutdown(): SHUT_WR once the output buffer drains
        bint _shut_wr_done
        bint _finish_queued
        Buffer _input
        Buffer _output
        int64_t _pending_tasks      # atomic: pool tasks referring to this connection
        int64_t _queued_sends       # atomic: sends queued by other threads, not yet written
        int64_t _release_wanted     # atomic: the loop waits for both counts to reach 0
        Py_ssize_t _high_water_mark
        sockaddr_storage _peer
        object _peer_address
        object _local_address
        object _name
        object _prefix
        readonly int64_t id
        readonly unsigned long long bytes_received
        readonly unsigned long long bytes_sent
        readonly unsigned long long dropped_sends
        readonly unsigned long long dropped_bytes
        public object context
        object __weakref__

    cdef int start(self) except -1
    cdef int _check_created(self) except -1
    cdef int task_started(self) noexcept
    cdef int task_finished(self) except -1
    cdef bint work_cancelled(self) noexcept
    cdef int _send_in_loop(self, const char* p, Py_ssize_t n) except -1
    cdef int _drop(self, Py_ssize_t nbytes) noexcept
    cdef int _update_interest(self) except -1
    cdef int _handle_read(self) except -1
    cdef int _handle_write(self) except -1
    cdef int _fault(self, int err) except -1
    cdef int _close_socket(self) except -1
    cdef int _try_finish(self) except -1
    cdef int _finish(self) except -1
    cdef int _release(self) except -1
    cdef int _do_op(self, int op, object value) except -1


cdef TcpConnection new_connection(EventLoop loop, int fd, ConnectionOwner owner,
                                  Handlers handlers, const sockaddr_storage* peer, str prefix)
cdef Handlers resolve_handlers(object handler)
