# cython: language_level=3, embedsignature=True
"""Socket helpers: accept4, sockaddr conversion, options (internal)."""

from _core.includes.linux cimport (
    AF_INET, AF_INET6, EINTR, INET6_ADDRSTRLEN, SO_ERROR, SOCK_CLOEXEC, SOCK_NONBLOCK,
    SOL_SOCKET, accept4, errno, getsockopt, inet_ntop, ntohs, setsockopt, sockaddr,
    sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
)

import os


cdef object sockaddr_to_tuple(const sockaddr* sa):
    cdef char text[INET6_ADDRSTRLEN + 1]
    cdef const sockaddr_in* v4
    cdef const sockaddr_in6* v6
    if sa.sa_family == AF_INET:
        v4 = <const sockaddr_in*>sa
        if inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode("ascii"), ntohs(v4.sin_port))
    if sa.sa_family == AF_INET6:
        v6 = <const sockaddr_in6*>sa
        if inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode("ascii"), ntohs(v6.sin6_port), v6.sin6_flowinfo, v6.sin6_scope_id)
    return None


cdef int accept_nonblocking(int fd, sockaddr_storage* addr, int* err) noexcept:
    cdef socklen_t alen
    cdef int connfd
    # The listening fd is non-blocking: accept4 never waits, so the GIL is kept.
    while True:
        alen = sizeof(sockaddr_storage)
        connfd = accept4(fd, <sockaddr*>addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if connfd >= 0 or errno != EINTR:
            break
    if connfd < 0:
        err[0] = errno
    return connfd


cdef int set_bool_opt(int fd, int level, int opt, bint on) except -1:
    cdef int value = 1 if on else 0
    if setsockopt(fd, level, opt, &value, sizeof(value)) < 0:
        raise OSError(errno, "setsockopt() failed: " + os.strerror(errno))
    return 0


cdef int socket_error(int fd) noexcept:
    cdef int value = 0
    cdef socklen_t n = sizeof(value)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &n) < 0:
        return errno
    return value
