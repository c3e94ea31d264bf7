# Channel: something registered with the loop's epoll (muduo's Channel).  Internal.
#
# The loop identifies a registration by a 64-bit token it never reuses (stored in
# epoll_event.data), not by the fd: an event left in the current epoll batch for an fd
# that was closed and reopened meanwhile finds no channel and is dropped (libuv's
# uv__platform_invalidate_fd problem).  A Channel does not own its fd.
from libc.stdint cimport uint32_t, uint64_t


cdef class Channel:
    cdef:
        int fd
        uint32_t interest         # EPOLL* bits currently registered
        uint64_t token            # 0 while not registered

    # Called by the loop thread with the returned epoll events.
    cdef int handle_event(self, uint32_t revents) except -1
    # Called by the loop thread for a (self, arg) pair queued in the pending functors.
    cdef int run_functor(self, object arg) except -1
    # Called when the loop closes while the channel is still registered.
    cdef int on_loop_closed(self) except -1
