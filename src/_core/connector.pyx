# cython: language_level=3, embedsignature=True
"""Connector: a non-blocking outgoing connect with retry (internal; see connector.pxd)."""

cimport cython
from libc.stdint cimport uint32_t
from libc.string cimport memset

from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.linux cimport EPOLLOUT, getpeername, sockaddr, sockaddr_storage, socklen_t
from _core.includes.sys cimport cppnp_counter_add
from _core.socket_ops cimport socket_error

import errno as _errno
import os
import random
import socket
import threading


cdef object _literal_address(object host, object port):
    """(family, sockaddr) if *host* is an IP literal (or *port* is None: *host* is a Unix
    socket path or abstract name), else None (needs resolution)."""
    if port is None:
        return (socket.AF_UNIX, host)
    try:
        socket.inet_pton(socket.AF_INET, host)
        return (socket.AF_INET, (host, port))
    except (OSError, ValueError):
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return (socket.AF_INET6, (host, port, 0, 0))
    except (OSError, ValueError):
        return None


@cython.auto_pickle(False)
@cython.final
cdef class Connector(Channel):
    """An outgoing connection being made (internal)."""

    def __repr__(self):
        return "<Connector %s:%s state=%d>" % (self._host, self._port, self._state)

    cdef bint active(self) noexcept:
        return self._state != CONNECTOR_IDLE

    cdef int start(self) except -1:
        if self._state != CONNECTOR_IDLE:
            return 0
        self._delay = self._retry_initial
        self._attempt()
        return 0

    cdef int restart(self) except -1:
        if self._state != CONNECTOR_IDLE:
            return 0
        self._delay = self._retry_initial
        self._schedule_retry()
        return 0

    cdef int stop(self) except -1:
        self._generation += 1
        self._addrs = None
        if self._retry_timer:
            self._loop.cancel_timer(self._retry_timer)
            self._retry_timer = 0
        if self._timeout_timer:
            self._loop.cancel_timer(self._timeout_timer)
            self._timeout_timer = 0
        self._close_sock()
        self._state = CONNECTOR_IDLE
        return 0

    cdef int _attempt(self) except -1:
        cppnp_counter_add(&self.attempts, 1)
        if self._literal is not None:
            self._connect(self._literal[0], self._literal[1])
            return 0
        self._state = CONNECTOR_RESOLVING
        t = threading.Thread(target=self._resolve_worker,
                             args=(self._generation, self._host, self._port),
                             name="cppnp-resolve", daemon=True)
        try:
            t.start()
        except RuntimeError as exc:     # can't start a new thread
            self._failed(exc)
        return 0

    def _resolve_worker(self, generation, host, port):
        # A resolver thread: blocking getaddrinfo (it releases the GIL), then hand the
        # result to the loop.  Touches no Connector state.
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
            result = list(dict.fromkeys((info[0], info[4]) for info in infos))
            if not result:
                result = socket.gaierror(socket.EAI_NONAME, "no address for %r" % (host,))
        except Exception as exc:
            result = exc
        self._loop.queue(self._resolved_in_loop, (generation, result))

    def _resolved_in_loop(self, tuple value):
        generation, result = value
        if generation != self._generation or self._state != CONNECTOR_RESOLVING:
            return          # stopped meanwhile
        if isinstance(result, BaseException):
            self._failed(result)
        else:
            self._addrs = result[1:]    # tried in order if the first fails
            self._connect(result[0][0], result[0][1])

    cdef int _connect(self, int family, object addr) except -1:
        cdef int err
        self._state = CONNECTOR_CONNECTING
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._failed(exc)
            return 0
        self._sock = sock
        sock.setblocking(False)         # connect() below never waits
        try:
            err = sock.connect_ex(addr)
        except OSError as exc:          # a bad address for the family
            self._failed(exc)
            return 0
        if err == 0:
            self._connected()
        elif err == _errno.EINPROGRESS or err == _errno.EINTR:
            self.fd = sock.fileno()
            self._loop.update_channel(self, EPOLLOUT)
            if self._connect_timeout > 0:
                self._timeout_timer = self._loop.run_after(self._connect_timeout,
                                                           self._timeout)
        else:
            self._failed(OSError(err, os.strerror(err)))
        return 0

    cdef int handle_event(self, uint32_t revents) except -1:
        cdef int err
        if self._state != CONNECTOR_CONNECTING or self.fd < 0:
            return 0
        err = socket_error(self.fd)
        self._loop.remove_channel(self)
        if self._timeout_timer:
            self._loop.cancel_timer(self._timeout_timer)
            self._timeout_timer = 0
        if err:
            self._failed(OSError(err, os.strerror(err)))
            return 0
        try:
            self_connect = self._sock.getsockname() == self._sock.getpeername()
        except OSError as exc:
            self._failed(exc)
            return 0
        if self_connect:
            # A connect to a free local port can connect to itself (TCP simultaneous
            # open): not a server.  Treat it as refused.
            self._failed(ConnectionRefusedError(_errno.ECONNREFUSED, "self-connect"))
            return 0
        self._connected()
        return 0

    def _timeout(self):
        # The connect_timeout timer.
        self._timeout_timer = 0
        if self._state == CONNECTOR_CONNECTING:
            self._loop.remove_channel(self)
            self._failed(TimeoutError(_errno.ETIMEDOUT, "connect timed out after %gs"
                                      % self._connect_timeout))

    cdef int _connected(self) except -1:
        cdef sockaddr_storage peer
        cdef socklen_t n = sizeof(peer)
        cdef int fd
        memset(&peer, 0, sizeof(peer))
        self._loop.remove_channel(self)
        self.fd = -1
        sock = self._sock
        self._sock = None
        fd = sock.detach()
        getpeername(fd, <sockaddr*>&peer, &n)      # on failure: the family stays 0
        self._state = CONNECTOR_IDLE
        self._on_connected(self._owner, fd, &peer)
        return 0

    cdef int _failed(self, object exc) except -1:
        cdef bint again
        self._close_sock()
        if self._addrs:
            # The name has another address (e.g. localhost: ::1, then 127.0.0.1): try it
            # now, as part of the same attempt; the error reported is the last one's.
            family, addr = self._addrs.pop(0)
            self._connect(family, addr)
            return 0
        cppnp_counter_add(&self.failures, 1)
        again = self._retry
        if again:
            self._schedule_retry()
        else:
            self._state = CONNECTOR_IDLE
        self._on_error(self._owner, exc, again)
        return 0

    cdef int _schedule_retry(self) except -1:
        cdef double delay = self._delay * random.uniform(0.75, 1.0)
        if delay < self._retry_initial:
            delay = self._retry_initial
        self._state = CONNECTOR_WAITING
        self._retry_timer = self._loop.run_after(delay, self._retry_now)
        self._delay = min(self._delay * 2, self._retry_max)
        return 0

    def _retry_now(self):
        # The retry timer.
        self._retry_timer = 0
        if self._state == CONNECTOR_WAITING:
            self._attempt()

    cdef int _close_sock(self) except -1:
        if self.registered:
            self._loop.remove_channel(self)
        self.fd = -1
        sock = self._sock
        self._sock = None
        if sock is not None:
            sock.close()
        return 0

    cdef int on_loop_closed(self) except -1:
        self.stop()
        return 0


cdef Connector new_connector(EventLoop loop, object owner, ConnectedFn on_connected,
                             ConnectErrorFn on_error, object host, object port, bint retry,
                             double retry_initial, double retry_max, double connect_timeout):
    cdef Connector c = Connector.__new__(Connector)
    c._loop = loop
    c._owner = owner
    c._on_connected = on_connected
    c._on_error = on_error
    c._host = host
    c._port = port
    c._literal = _literal_address(host, port)
    c._retry = retry
    c._retry_initial = retry_initial
    c._retry_max = retry_max
    c._delay = retry_initial
    c._connect_timeout = connect_timeout
    return c
