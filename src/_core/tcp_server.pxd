# TcpServer: a listening socket (muduo's Acceptor) and the connections it accepted.
from _core.event_loop cimport EventLoop
from _core.tcp_connection cimport ConnectionOwner, Handlers, TcpConnection


cdef class TcpServer(ConnectionOwner):
    cdef:
        EventLoop _loop
        object _address                # what the user asked for
        object _bound                  # what the socket is bound to
        object _handler
        Handlers _handlers
        readonly str name
        bint _reuse_port
        int _backlog
        bint _tcp_nodelay
        bint _keepalive
        bint _started
        bint _stopped                  # stop(): listener closed, connections force-closed
        bint _listener_closed          # stop_accepting() or stop()
        bint _paused                   # listener unpolled after an accept error
        int _idle_fd                   # /dev/null, spent to shed a connection on EMFILE
        dict _connections              # id -> TcpConnection
        double _last_emfile_log
        readonly unsigned long long accepted
        readonly unsigned long long accept_errors
        readonly unsigned long long shed_connections
        object __weakref__

    cdef int _accept_some(self) except -1
    cdef int _listen_in_loop(self) except -1
    cdef int _close_listener(self) except -1
    cdef int _check_created(self) except -1
    cdef int _stop_in_loop(self) except -1
    cdef int _shed_one(self, int err) except -1
    cdef int _pause_accepting(self) except -1
    cdef _log_accept_error(self, int err)
