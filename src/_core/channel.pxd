# Channel: something registered with the loop's epoll (muduo's Channel).  Internal.
#
# The loop stores the Channel itself in epoll_event.data.ptr (the channels set keeps it
# alive while registered), and `registered` says whether it is in the epoll set.  An
# event left in the current epoll batch for a channel that remove_channel() took out is
# invalidated in the batch (EventLoop.remove_channel), so an fd closed and reopened
# meanwhile never gets a stale event (libuv's uv__platform_invalidate_fd problem).  A
# Channel does not own its fd.
#
# A Channel is a WorkOwner (task.pxd): a ThreadPool can count work against it.  Only a
# channel whose counts_work() says so (TcpConnection) is treated as an owner.
from libc.stdint cimport int64_t, uint32_t

from _core.task cimport WorkOwner


cdef class Channel(WorkOwner):
    cdef:
        int fd
        uint32_t interest         # EPOLL* bits currently registered
        bint registered           # in the loop's epoll set
        # IdleWheel (idle_wheel.pxd), loop thread: the wheel tick of the last input while
        # a wheel watches the channel, else -1.
        int64_t idle_tick

    # Called by the loop thread with the returned epoll events.
    cdef int handle_event(self, uint32_t revents) except -1
    # Called by the loop thread for a (self, arg) pair queued in the pending functors
    # (EventLoop.queue(channel, arg)): a channel's one allocation-free functor.
    # TcpConnection: arg is an accepted send from another thread (bytes).
    cdef int run_functor(self, object arg) except -1
    # Called when the loop closes while the channel is still registered.
    cdef int on_loop_closed(self) except -1
    # Called by the loop thread when an IdleWheel found no input for *timeout* seconds
    # (the wheel no longer watches the channel).  TcpConnection: force_close().
    cdef int idle_expired(self, double timeout) except -1


# Something the loop runs once just before it next blocks in epoll_wait
# (EventLoop.add_before_poll): the reactor's generic hook, e.g. the ThreadPool's "wake
# the workers for the tasks added in this iteration".
#
# A hook added with EventLoop.add_release_hook instead runs released(now) with the GIL
# released, just before epoll_wait (so a thread it wakes finds the GIL free): C data only,
# no Python objects.  It returns -1, or the milliseconds after which it must run again
# (the poll's timeout is capped to that and the hook stays registered).  before_poll() is
# its fallback when the loop stops running with the hook still registered.
cdef class PollHook:
    cdef int before_poll(self) except -1
    cdef int released(self, double now) noexcept nogil
