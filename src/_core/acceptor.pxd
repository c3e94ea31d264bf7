# Acceptor: the listening socket and its accept loop (muduo's Acceptor).  Internal.
#
# Owns the listening fd (Channel.fd, registered with the loop for EPOLLIN), the spare fd
# spent to shed a connection when the process is out of fds (muduo's idleFd trick), the
# pause-and-retry after an accept error that would repeat at once, and the accept
# counters.  Each accepted socket (non-blocking, close-on-exec, TCP_NODELAY/SO_KEEPALIVE
# as configured) is handed to its owner through on_accept(owner, fd, peer): TcpServer
# makes the connection.  The acceptor knows nothing of connections.
#
# Unix domain sockets: listen() takes a path (str/bytes/os.PathLike) or an abstract name
# (leading NUL).  A socket file left by a dead process (a connect is refused) is removed
# first; a live one or a file that is not a socket makes listen() raise.  unix_mode (if
# >= 0) is chmod()ed on the file before listen(); close() unlinks the file if it is still
# the one we bound (same device and inode).  TCP options are not set on AF_UNIX sockets.
#
# Threads: listen() and close() run under the owner's lock, from any thread (close() on
# the loop thread, or any thread once the loop is closed); everything else is the loop
# thread's.  The counters are written by the loop and read anywhere (relaxed atomics).
from libc.stdint cimport int64_t

from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.linux cimport sockaddr_storage

# Called (loop thread) with each accepted socket; the callee owns *fd* from then on.
ctypedef int (*AcceptFn)(object owner, int fd, const sockaddr_storage* peer) except -1


cdef class Acceptor(Channel):
    cdef:
        EventLoop _loop
        object _owner
        AcceptFn _on_accept
        str _name                       # for log lines
        bint _tcp_nodelay
        bint _keepalive
        bint _unix                      # listening on an AF_UNIX socket
        int unix_mode                   # chmod the socket file to this, or -1
        object _unix_file               # (path, st_dev, st_ino) of our socket file, or None
        int _idle_fd                    # /dev/null, spent to shed a connection on EMFILE
        bint _paused                    # listener unpolled after an accept error
        int64_t _retry_timer            # the timer that resumes accepting, or 0
        double _last_error_log
        int64_t enabled                 # atomic: the owner wants connections accepted
        int64_t listening               # atomic: the listening socket is open
        int64_t accepted                # counters (relaxed)
        int64_t accept_errors
        int64_t shed_connections

    # Bind and listen on *address* now (errors raise); returns the bound address.
    cdef object listen(self, object address, bint reuse_port, int backlog)
    cdef object _listen_unix(self, object path, int backlog)
    # Start polling the listener (loop thread).
    cdef int start_polling(self) except -1
    # Close the listener and the spare fd, cancel a retry; idempotent.
    cdef int close(self) except -1
    cdef int _accept_some(self) except -1
    cdef int _shed_one(self, int err) except -1
    cdef int _pause(self) except -1
    cdef int _log_error(self, int err) except -1


cdef Acceptor new_acceptor(EventLoop loop, object owner, AcceptFn on_accept, str name,
                           bint tcp_nodelay, bint keepalive)
