# cython: language_level=3, embedsignature=True
"""Acceptor: the listening socket and its accept loop (internal; see acceptor.pxd)."""

cimport cython
from libc.stdint cimport uint32_t

from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.consts cimport (
    ACCEPT_LOG_INTERVAL, ACCEPT_RETRY_DELAY, MAX_ACCEPTS_PER_EVENT,
)
from _core.includes.linux cimport (
    ECONNABORTED, EAGAIN, EINTR, EMFILE, ENFILE, EPOLLIN, EPROTO, EPERM, IPPROTO_TCP,
    O_CLOEXEC, O_RDONLY, SO_KEEPALIVE, SOL_SOCKET, TCP_NODELAY, open,
    sockaddr_storage,
)
from _core.includes.linux cimport close as close_fd
from _core.includes.sys cimport (
    cppnp_atomic_load, cppnp_atomic_store, cppnp_counter_add, cppnp_monotonic,
)
from _core.socket_ops cimport accept_nonblocking, clear_stale_unix, set_bool_opt, unix_path

import logging
import os
import socket

cdef object _logger = logging.getLogger("cppnp")


cdef int _unlink_if_ours(object made) except -1:
    # Remove our socket file, unless another server replaced it meanwhile.
    path, dev, ino = made
    try:
        st = os.lstat(path)
        if st.st_dev == dev and st.st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
    return 0


cdef inline int _open_spare() noexcept:
    return open(b"/dev/null", O_RDONLY | O_CLOEXEC)


@cython.auto_pickle(False)
@cython.final
cdef class Acceptor(Channel):
    """The listening socket of a TcpServer (internal)."""

    def __cinit__(self):
        self._idle_fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close_fd(self.fd)
        if self._idle_fd >= 0:
            close_fd(self._idle_fd)

    def __repr__(self):
        return "<Acceptor %s fd=%d>" % (self._name, self.fd)

    cdef object listen(self, object address, bint reuse_port, int backlog):
        path = unix_path(address)
        if path is not None:
            return self._listen_unix(path, backlog)
        host, port = address
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
            bound = sock.getsockname()
        except BaseException:
            sock.close()
            raise
        self.fd = sock.detach()
        cppnp_atomic_store(&self.listening, 1)
        # Without a spare fd (-1) the acceptor rests instead of shedding on EMFILE.
        self._idle_fd = _open_spare()
        return bound

    cdef object _listen_unix(self, object path, int backlog):
        abstract = path[0] in (0, "\0")
        clear_stale_unix(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        made = None
        try:
            sock.bind(path)
            if not abstract:
                st = os.stat(path)
                made = (path, st.st_dev, st.st_ino)
                if self.unix_mode >= 0:
                    os.chmod(path, self.unix_mode)
            sock.listen(backlog)
            sock.setblocking(False)
            bound = sock.getsockname()
        except BaseException:
            sock.close()
            if made is not None:
                _unlink_if_ours(made)
            raise
        self._unix = True
        self._unix_file = made
        self.fd = sock.detach()
        cppnp_atomic_store(&self.listening, 1)
        self._idle_fd = _open_spare()
        return bound

    cdef int start_polling(self) except -1:
        if self.fd >= 0 and cppnp_atomic_load(&self.enabled) and not self._paused:
            self._loop.update_channel(self, EPOLLIN)
        return 0

    cdef int close(self) except -1:
        cppnp_atomic_store(&self.enabled, 0)
        if self.fd >= 0:
            self._loop.remove_channel(self)
            close_fd(self.fd)
            self.fd = -1
            cppnp_atomic_store(&self.listening, 0)
            if self._unix_file is not None:
                made = self._unix_file
                self._unix_file = None
                _unlink_if_ours(made)
        if self._idle_fd >= 0:
            close_fd(self._idle_fd)
            self._idle_fd = -1
        if self._retry_timer:
            self._loop.cancel_timer(self._retry_timer)
            self._retry_timer = 0
        self._paused = False
        return 0

    cdef int handle_event(self, uint32_t revents) except -1:
        if cppnp_atomic_load(&self.enabled):
            self._accept_some()     # else stop() / stop_accepting() pending: accept no more
        return 0

    cdef int on_loop_closed(self) except -1:
        self.close()
        return 0

    cdef int _accept_some(self) except -1:
        cdef sockaddr_storage peer
        cdef int err = 0, connfd
        for _ in range(MAX_ACCEPTS_PER_EVENT):
            if self.fd < 0 or not cppnp_atomic_load(&self.enabled):
                return 0
            connfd = accept_nonblocking(self.fd, &peer, &err)
            if connfd < 0:
                if err == EAGAIN or err == EINTR:
                    return 0
                if err == ECONNABORTED or err == EPROTO or err == EPERM:
                    cppnp_counter_add(&self.accept_errors, 1)
                    continue            # the peer gave up before we accepted: next one
                if (err == EMFILE or err == ENFILE) and self._idle_fd >= 0:
                    self._shed_one(err)
                    return 0
                # Out of fds with no spare, or out of kernel memory: the backlog stays
                # readable, so stop polling the listener for a while instead of spinning.
                cppnp_counter_add(&self.accept_errors, 1)
                self._log_error(err)
                self._pause()
                return 0
            cppnp_counter_add(&self.accepted, 1)
            try:
                if self._unix:
                    pass        # no TCP options on a Unix socket
                elif self._tcp_nodelay:
                    set_bool_opt(connfd, IPPROTO_TCP, TCP_NODELAY, True)
                if self._keepalive:
                    set_bool_opt(connfd, SOL_SOCKET, SO_KEEPALIVE, True)
            except OSError:
                pass        # the peer may already be gone; the first read will tell
            self._on_accept(self._owner, connfd, &peer)
        return 0

    cdef int _shed_one(self, int err) except -1:
        """Out of fds: accept the pending connection on the spare fd and close it at once
        (muduo's idleFd trick), so the listener does not spin on a readable backlog."""
        cdef sockaddr_storage peer
        cdef int e = 0, connfd
        cppnp_counter_add(&self.accept_errors, 1)
        self._log_error(err)
        if self._idle_fd < 0:
            return 0
        close_fd(self._idle_fd)
        self._idle_fd = -1
        connfd = accept_nonblocking(self.fd, &peer, &e)
        if connfd >= 0:
            close_fd(connfd)
            cppnp_counter_add(&self.shed_connections, 1)
        self._idle_fd = _open_spare()
        return 0

    cdef int _pause(self) except -1:
        if self.fd >= 0 and not self._paused:
            self._paused = True
            self._loop.update_channel(self, 0)
            self._retry_timer = self._loop.run_after(ACCEPT_RETRY_DELAY, self._resume)
        return 0

    def _resume(self):
        # The accept-retry timer (cancelled when the listener closes).
        self._retry_timer = 0
        self._paused = False
        if self.fd < 0 or not cppnp_atomic_load(&self.enabled):
            return
        if self._idle_fd < 0:
            self._idle_fd = _open_spare()
        self._loop.update_channel(self, EPOLLIN)

    cdef int _log_error(self, int err) except -1:
        cdef double now = cppnp_monotonic()
        if now - self._last_error_log >= ACCEPT_LOG_INTERVAL:     # at most one a second
            self._last_error_log = now
            try:
                _logger.warning("%s: accept() failed: %s", self._name, os.strerror(err))
            except Exception:
                pass        # a failing log handler must not stop the acceptor
        return 0


cdef Acceptor new_acceptor(EventLoop loop, object owner, AcceptFn on_accept, str name,
                           bint tcp_nodelay, bint keepalive):
    cdef Acceptor a = Acceptor.__new__(Acceptor)
    a._loop = loop
    a._owner = owner
    a._on_accept = on_accept
    a._name = name
    a._tcp_nodelay = tcp_nodelay
    a._keepalive = keepalive
    a.unix_mode = -1
    return a
