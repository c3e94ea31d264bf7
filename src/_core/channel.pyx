# cython: language_level=3, embedsignature=True
"""Channel: base of everything the loop polls; PollHook: run before the loop polls
(internal)."""

cimport cython
from libc.stdint cimport uint32_t

from _core.task cimport WorkOwner


@cython.auto_pickle(False)
cdef class Channel(WorkOwner):
    """Base class of the objects registered with an EventLoop's epoll (internal)."""

    def __cinit__(self):
        self.fd = -1
        self.interest = 0
        self.registered = False
        self.idle_tick = -1

    cdef int handle_event(self, uint32_t revents) except -1:
        return 0

    cdef int run_functor(self, object arg) except -1:
        return 0

    cdef int on_loop_closed(self) except -1:
        return 0

    cdef int idle_expired(self, double timeout) except -1:
        return 0


@cython.auto_pickle(False)
cdef class PollHook:
    """Base class of the loop's before-poll hooks (internal)."""

    cdef int before_poll(self) except -1:
        return 0

    cdef int released(self, double now) noexcept nogil:
        return -1
