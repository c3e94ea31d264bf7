# Socket operations shared by the acceptor and connections (loop thread).
from _core.includes.linux cimport sockaddr, sockaddr_storage, socklen_t

# (host, port) for AF_INET, (host, port, flowinfo, scope_id) for AF_INET6, else None.
cdef object sockaddr_to_tuple(const sockaddr* sa)
# accept4(SOCK_NONBLOCK|SOCK_CLOEXEC) on a non-blocking listener, EINTR retried.
# Returns the fd, or -1 with *err set.
cdef int accept_nonblocking(int fd, sockaddr_storage* addr, int* err) noexcept
cdef int set_bool_opt(int fd, int level, int opt, bint on) except -1
cdef int socket_error(int fd) noexcept
