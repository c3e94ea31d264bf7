# TcpConnection: one accepted TCP connection (muduo's TcpConnection).
#
# The state machine (_state, an atomic ConnState).  Each transition is made in one place,
# named on the arrow; only shutdown() and force_close() move the state from another
# thread (a CAS out of CONNECTED), every other transition is the loop thread's.
#
#                start()
#   CONNECTING ----------> CONNECTED --- shutdown() / force_close() ---> DISCONNECTING
#                              |                                              |
#                              |                 accepted output written, and | _send_fin()
#                              |                 not force_close()            v
#                              |                                           FIN_SENT
#                              |                                              |
#                              +------ _close_socket(reason), from any of ----+
#                              |       CONNECTED, DISCONNECTING, FIN_SENT: a peer reset
#                              |       or socket error, force_close(), or the peer
#                              |       closed and every reply was written
#                              v
#                         DISCONNECTED --- no task in flight, no reply queued ---> RELEASED
#                                          _release(): on_close, forgotten by the server
#   (EventLoop.close(): on_loop_closed() goes from any state to RELEASED, no callbacks.)
#
#   CONNECTING     accepted; not yet shown to the user (on_connection not called).
#   CONNECTED      socket open: send() is accepted, input is delivered.
#   DISCONNECTING  shutdown() or force_close() was called: send() is dropped and counted.
#                  Output accepted before is still written; then our FIN (shutdown) or
#                  the close (force_close, queued to the loop).  Input is still delivered.
#   FIN_SENT       our side is shut (SHUT_WR); input is delivered until the peer closes.
#   DISCONNECTED   the socket is closed (_close_reason says why); the connection waits here
#                  until no ThreadPool task that refers to it is in flight (the release
#                  wait: not TCP's CLOSE_WAIT).  send() is dropped and counted.
#   RELEASED       on_close ran; the server forgot the connection.  Everything is a no-op.
#
# The peer's FIN is not a state of ours: _peer_closed (atomic) records it in any open
# state.  Replies are still written after it; once no task is in flight, no reply is
# queued and the output is written, _finish() closes the socket (reason CLOSE_PEER) and
# releases at once.  _reading (atomic) is the user's flow-control switch, orthogonal too.
#
# Lifetime (the seed's _theothersideisclosed + _pacCount).  A connection counts the tasks
# handed to a ThreadPool that refer to it and have not finished (_pending_tasks, atomic).
# It is released only when (the peer closed, or the socket is closed) AND _pending_tasks
# == 0 AND no accepted send is still queued (_queued_sends == 0).  A worker's reply is
# counted in _queued_sends before its task is counted finished, so when the loop sees
# _pending_tasks == 0 every reply of a finished task is already counted.  The loop stores
# "release wanted" (_peer_closed, or the state DISCONNECTED) and then reads the count; a
# worker decrements and then reads them: with sequentially consistent atomics one of the
# two sees the other.  The decision is taken by a functor (_finish_in_loop), so user callbacks
# never run from inside send().
#
# Sends are accepted or refused when send() is called: a thread other than the loop counts
# the send in _queued_sends *before* it reads the state, so the loop never sends the FIN
# (or releases) while an accepted send is on its way, and a send that sees DISCONNECTING
# is refused (the loop counts the drop and uncounts it: _dropped_in_loop).
#
# send(data, after_tasks=True) holds the data in _held until the tasks counted on the
# connection when it was called have finished (_tasks_started at the call, compared with
# _tasks_finished).  A task that finishes queues _flush_held_in_loop after its replies
# (they are queued before its work_released), so held data goes out after them.  Held data counts as
# queued sends; while some is held, later loop-thread sends queue behind it.
#
# Write coalescing (redis's handleClientsWithPendingWrites): a send on the loop thread
# (a callback's, or a worker's drained in the functor pass) of at most COALESCE_MAX bytes,
# with no output queued, is appended to the output buffer and the connection is put on the
# loop's WriteFlusher (_flush_queued); later sends of the same iteration append behind it.
# Just before the loop polls again the flusher writes each connection's output with one
# send() (_flush); what the kernel does not take waits for EPOLLOUT as usual.  Same bytes,
# same order; the FIN (shutdown) and the release wait for the flush as for any queued
# output; force_close() flushes first (one attempt), so what was sent before it is still
# offered to the kernel.  A larger send with nothing queued is written at once (no copy).
from libc.stdint cimport int32_t, int64_t, uint32_t

from _core.buffer cimport Buffer
from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.handler cimport Handlers
from _core.idle_wheel cimport IdleWheel
from _core.includes.linux cimport sockaddr_storage
from _core.tls cimport TlsSession


cdef enum ConnState:
    CONNECTING = 0
    CONNECTED = 1
    DISCONNECTING = 2
    FIN_SENT = 3
    DISCONNECTED = 4
    RELEASED = 5


# Why the socket was closed (the first reason recorded wins).
cdef enum CloseReason:
    CLOSE_NONE = 0
    CLOSE_PEER = 1          # orderly: the peer closed and every reply was written
    CLOSE_RESET = 2         # peer reset, hang-up or another socket error
    CLOSE_FORCED = 3        # force_close() (also TcpServer.stop()); set at the call
    CLOSE_LOOP = 4          # the EventLoop was closed under the connection


cdef class ConnectionOwner(Channel):
    # Called by a connection when it is released (loop thread).
    cdef int remove_connection(self, TcpConnection conn) except -1
    # A TLS connection failed before its handshake completed (loop thread): *exc* is the
    # ssl.SSLError, TimeoutError or ConnectionError.  The default does nothing.
    cdef int tls_failed(self, TcpConnection conn, object exc) except -1


cdef class TcpConnection(Channel):
    cdef:
        EventLoop _loop
        ConnectionOwner _owner
        Handlers _handlers
        int32_t _state              # atomic ConnState (see the diagram above)
        int32_t _close_reason       # atomic CloseReason
        int32_t _peer_closed        # atomic: read returned 0 (the peer's FIN)
        int32_t _reading            # atomic: the user wants input (stop/start_reading)
        bint _finish_queued         # loop thread: a _finish_in_loop is queued
        bint _delivery_queued       # loop thread: a _deliver_in_loop is queued
        bint _flush_queued          # loop thread: on the loop's WriteFlusher (see below)
        Buffer _input
        Buffer _output
        list _held                  # loop thread: [target, bytes, ...] or None
        int64_t _held_target        # atomic: target of the first held send, 0 if none
        int64_t _pending_tasks      # atomic: pool tasks referring to this connection
        int64_t _tasks_started      # atomic: total work_added() calls
        int64_t _tasks_finished     # atomic: total work_released() calls
        int64_t _queued_sends       # atomic: accepted sends not yet written (queued, held)
        int64_t _high_water_mark    # atomic
        int64_t _output_len         # relaxed mirror of len(_output), for other threads
        int64_t _input_len          # relaxed mirror of len(_input) after each delivery
        int64_t _bytes_received     # counters: written by the loop, read anywhere
        int64_t _bytes_sent
        int64_t _dropped_sends
        int64_t _dropped_bytes
        sockaddr_storage _peer
        # Computed on first use inside a critical section on the connection (other
        # threads may ask at the same time; the loop closes the fd inside one too).
        object _peer_address
        object _local_address
        object _name
        object _context             # the user's; read and replaced in a critical section
        object _prefix
        IdleWheel _idle             # loop thread: the wheel watching us, or None
        int64_t _id                 # unique in the process (the id property)
        # TLS (tls.pxd), or None for a plain connection.  Set by the owner before start(),
        # then used on the loop thread only; _shown: on_connection was called (a TLS
        # connection that fails its handshake gets neither on_connection nor on_close).
        TlsSession _tls
        bint _shown
        object __weakref__

    cdef int start(self) except -1
    # Close the connection when it receives nothing for the wheel's timeout (idle_wheel.pxd).
    # Before start() (any thread that owns the new connection), or on the loop thread.
    cdef int set_idle_wheel(self, IdleWheel wheel) except -1
    cdef int _leave_idle(self) except -1
    cdef int _check_created(self) except -1
    cdef object _peer_tuple(self)
    # Pool accounting: the WorkOwner interface (task.pxd), any thread.  counts_work() is
    # True; work_added()/work_released(): a task referring to this connection was
    # added/finished; work_cancelled(): True once the socket was closed by a peer reset or
    # socket error, or force_close() was called (also when the loop closed under it):
    # queued work for it can be discarded.  Not after an orderly close: a half-closed peer
    # gets all its replies.
    cdef bint _release_wanted(self) noexcept
    cdef int _write(self, const char* p, Py_ssize_t n) except -1
    cdef int _write_raw(self, const char* p, Py_ssize_t n) except -1
    cdef int _show(self) except -1
    # TLS hooks (loop thread): ciphertext in -> plaintext before on_message; plaintext
    # from send() -> ciphertext appended to the output; close_notify before the FIN.
    cdef int _tls_step(self) except -1
    cdef int _tls_flush(self) except -1
    cdef int _tls_fail(self, object exc, bint timeout) except -1
    cdef int _flush(self) except -1
    cdef int _write_bytes(self, object data) except -1
    cdef int _hold(self, object data, int64_t target) except -1
    cdef int _arm_held(self) except -1
    cdef int _flush_held(self, int64_t finished) except -1
    cdef int _send_done(self) except -1
    cdef int _drop(self, Py_ssize_t nbytes) noexcept
    cdef int _update_interest(self) except -1
    cdef int _set_reading(self, bint on) except -1
    cdef int _handle_read(self) except -1
    cdef int _deliver(self) except -1
    cdef int _queue_delivery(self) except -1
    cdef int _handle_write(self) except -1
    cdef int _fault(self, int err) except -1
    cdef int _send_fin(self) except -1
    cdef int _close_socket(self, int reason) except -1
    cdef int _try_finish(self) except -1
    cdef int _finish(self) except -1
    cdef int _release(self) except -1
    cdef int _queue_write_complete(self) except -1


cdef TcpConnection new_connection(EventLoop loop, int fd, ConnectionOwner owner,
                                  Handlers handlers, const sockaddr_storage* peer, str prefix)
