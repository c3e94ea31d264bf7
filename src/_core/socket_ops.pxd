# Socket operations shared by the acceptor and connections (loop thread).
from _core.includes.linux cimport sockaddr, sockaddr_storage, socklen_t

# (host, port) for AF_INET, (host, port, flowinfo, scope_id) for AF_INET6, the path (str)
# for AF_UNIX ("" for an unnamed socket, bytes starting with NUL for an abstract name:
# as Python's socket module), else None.  An AF_UNIX address must be zero-filled past its
# length (accept_nonblocking does it).
cdef object sockaddr_to_tuple(const sockaddr* sa)
# A Unix socket address: str/bytes/os.PathLike -> str or bytes (os.fspath), else None
# (also for a str/bytes without "/" that looks like "host:port": a mistake, not a file).
cdef object unix_path(object address)
# Before binding a Unix socket path (any thread, never blocks): remove a stale socket
# file (a connect is refused: no one listens); raise for a live one or a non-socket.
cdef int clear_stale_unix(object path) except -1
# accept4(SOCK_NONBLOCK|SOCK_CLOEXEC) on a non-blocking listener, EINTR retried.
# Returns the fd, or -1 with *err set.
cdef int accept_nonblocking(int fd, sockaddr_storage* addr, int* err) noexcept
cdef int set_bool_opt(int fd, int level, int opt, bint on) except -1
cdef int socket_error(int fd) noexcept
