# Connector: one outgoing connection being made (muduo's Connector).  Internal.
#
# A non-blocking connect() on the loop thread: the socket is polled for EPOLLOUT and
# SO_ERROR says how it went.  A host name is resolved by getaddrinfo() in a short-lived
# worker thread (the loop never blocks on DNS; an IP literal needs no resolution); the
# result comes back to the loop as a functor (a Unix socket path is given as host with
# port None), tagged with the attempt's generation so a result that arrives after stop()
# is ignored.  A name's addresses are tried in getaddrinfo's order within one attempt (as
# asyncio's create_connection does): the attempt fails, with the last address's error,
# only when every address failed.  A failed attempt (refused, unreachable, timed out
# after connect_timeout, DNS) is reported to the owner through on_error; with retry on,
# the next attempt is made after a delay that starts at retry_initial and
# doubles up to retry_max, with jitter (each delay is drawn from [0.75 d, d], never
# below retry_initial).  A connected socket is handed to the owner (on_connected), which
# owns the fd from then on; the Connector is then idle until start() or restart().
#
# Threads: every method is the loop thread's (the owner queues to the loop); only the
# resolver thread runs _resolve_worker, which touches nothing but its arguments and
# queues its result.  The counters are written by the loop, read anywhere (relaxed).
from libc.stdint cimport int64_t

from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.linux cimport sockaddr_storage

# Called (loop thread) with a connected socket; the callee owns *fd* from then on.
ctypedef int (*ConnectedFn)(object owner, int fd, const sockaddr_storage* peer) except -1
# Called (loop thread) for each failed attempt; *will_retry*: another attempt is scheduled.
ctypedef int (*ConnectErrorFn)(object owner, object exc, bint will_retry) except -1


cdef enum ConnectorState:
    CONNECTOR_IDLE = 0          # nothing in progress (stopped, connected, or gave up)
    CONNECTOR_RESOLVING = 1     # getaddrinfo running in a worker thread
    CONNECTOR_CONNECTING = 2    # connect() in progress: polled for EPOLLOUT
    CONNECTOR_WAITING = 3       # the retry timer is armed


cdef class Connector(Channel):
    cdef:
        EventLoop _loop
        object _owner
        ConnectedFn _on_connected
        ConnectErrorFn _on_error
        object _host
        object _port
        object _literal                 # (family, sockaddr) for an IP literal, else None
        list _addrs                     # the resolved addresses not tried yet, or None
        bint _retry
        double _retry_initial
        double _retry_max
        double _delay                   # the next retry's upper bound
        double _connect_timeout         # 0: none
        object _sock                    # the socket being connected (Python socket)
        int _state                      # ConnectorState (loop thread)
        int64_t _generation             # bumped by stop(): stale DNS results are ignored
        int64_t _retry_timer
        int64_t _timeout_timer
        int64_t attempts                # counters (relaxed)
        int64_t failures

    cdef int start(self) except -1
    # After a connection closed: the next attempt after a first backoff delay.
    cdef int restart(self) except -1
    # Cancel whatever is in progress (timers, the socket, a pending DNS result).
    cdef int stop(self) except -1
    cdef bint active(self) noexcept
    cdef int _attempt(self) except -1
    cdef int _connect(self, int family, object addr) except -1
    cdef int _connected(self) except -1
    cdef int _failed(self, object exc) except -1
    cdef int _schedule_retry(self) except -1
    cdef int _close_sock(self) except -1


cdef Connector new_connector(EventLoop loop, object owner, ConnectedFn on_connected,
                             ConnectErrorFn on_error, object host, object port, bint retry,
                             double retry_initial, double retry_max, double connect_timeout)
