# cython: language_level=3, embedsignature=True
"""Socket helpers: accept4, sockaddr conversion, options (internal)."""

from libc.string cimport memset

from _core.includes.linux cimport (
    AF_INET, AF_INET6, AF_UNIX, EINTR, INET6_ADDRSTRLEN, SO_ERROR, SOCK_CLOEXEC,
    SOCK_NONBLOCK, SOL_SOCKET, accept4, errno, getsockopt, inet_ntop, ntohs, setsockopt,
    sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, sockaddr_un, socklen_t, strnlen,
)

import errno as _errno
import os
import socket
import stat


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
    if sa.sa_family == AF_UNIX:
        return _unix_name(<const sockaddr_un*>sa)
    return None


cdef object _unix_name(const sockaddr_un* un):
    cdef Py_ssize_t n, size = sizeof(un.sun_path)
    if un.sun_path[0] != 0:
        n = strnlen(un.sun_path, size)
        return os.fsdecode(un.sun_path[:n])
    # Abstract (NUL first; the zero fill past the length ends the name) or unnamed.
    n = size
    while n > 1 and un.sun_path[n - 1] == 0:
        n -= 1
    if n <= 1:
        return ""
    return un.sun_path[:n]


cdef object unix_path(object address):
    if isinstance(address, (str, bytes)):
        path = address
        text = os.fsdecode(path)
        if "/" not in text and not text.startswith("\0"):
            # "host:port" is a mistake for (host, port), not a file name: no path.
            _, sep, tail = text.rpartition(":")
            if sep and tail.isdigit():
                return None
        return path
    if isinstance(address, os.PathLike):
        path = os.fspath(address)
        if isinstance(path, (str, bytes)):
            return path
    return None


cdef int clear_stale_unix(object path) except -1:
    if not path or path[0] in (0, "\0"):
        return 0        # abstract namespace: no file
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(_errno.EEXIST, "%r exists and is not a socket: not removed"
                              % (path,))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err == _errno.ECONNREFUSED:
        try:
            os.unlink(path)         # stale: left by a process that is gone
        except FileNotFoundError:
            pass
        return 0
    if err == 0 or err == _errno.EAGAIN:
        raise OSError(_errno.EADDRINUSE, "%r: a live server listens on this socket: not "
                      "removed" % (path,))
    raise OSError(err, "%r: cannot tell whether the socket is in use: %s"
                  % (path, os.strerror(err)))


cdef int accept_nonblocking(int fd, sockaddr_storage* addr, int* err) noexcept:
    cdef socklen_t alen
    cdef int connfd
    # The listening fd is non-blocking: accept4 never waits, so the GIL is kept.
    while True:
        alen = sizeof(sockaddr_storage)
        connfd = accept4(fd, <sockaddr*>addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if connfd >= 0 or errno != EINTR:
            break
    if connfd >= 0 and alen < sizeof(sockaddr_storage):
        # Zero the rest: an AF_UNIX address's length is not kept with it.
        memset((<char*>addr) + alen, 0, sizeof(sockaddr_storage) - alen)
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
