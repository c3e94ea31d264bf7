# IdleWheel: close connections that received nothing for a while (muduo's idle-connection
# example, the lazy variant): a timing wheel of N + 2 buckets, one periodic timer.
#
# Loop thread only: a wheel belongs to one EventLoop and every method runs on its thread
# (a TcpServer with io_threads makes one wheel per io loop).  Nothing is shared with other
# threads except the expired counter (relaxed atomic, read anywhere).
#
# O(1) per message: the watched Channel stores the wheel tick of its last input in
# Channel.idle_tick (touch(): one store, no list operation).  Each watched channel is in
# exactly one bucket, the one of the tick at which it may expire.  When a bucket comes up,
# each channel in it either expired (its idle_tick + N + 1 <= now: idle_expired() is
# called) or is moved to the bucket of its new deadline.  A channel is closed between
# `timeout` and `timeout + tick` seconds after its last input (tick = timeout / N).
#
# The timer runs only while the wheel watches something: watch() of the first channel
# starts it, leave() of the last one cancels it and empties the buckets.
#
# Reuse (e.g. a TcpClient's connection): make one wheel per loop with
# new_idle_wheel(loop, timeout), and give it to each connection with
# TcpConnection.set_idle_wheel(wheel) (before start(), or on the loop thread after): the
# connection then touches it on input and leaves it when it is released.  A Channel
# subclass of your own: watch(ch), touch(ch) on input, leave(ch) when done, and implement
# Channel.idle_expired().
from libc.stdint cimport int64_t

from _core.channel cimport Channel
from _core.event_loop cimport EventLoop


cdef class IdleWheel:
    cdef:
        EventLoop _loop
        double _timeout             # seconds
        double _tick                # seconds per tick: _timeout / _n
        int64_t _n                  # ticks per timeout
        int64_t now                 # the current tick (loop thread)
        list _buckets               # _n + 2 lists of Channels
        int64_t _members            # channels watched (loop thread)
        object _timer               # the run_every() id, or None
        int64_t _expired            # counter: channels expired (relaxed, any thread)
        object __weakref__

    # Start watching *ch* (loop thread); its idle time starts now.  A no-op if watched.
    cdef int watch(self, Channel ch) except -1
    # Stop watching *ch* (loop thread), e.g. when it is released.  A no-op if not watched.
    cdef int leave(self, Channel ch) except -1
    # *ch* received input (loop thread): O(1).
    cdef inline void touch(self, Channel ch) noexcept:
        if ch.idle_tick >= 0:
            ch.idle_tick = self.now
    cdef int _tick_once(self) except -1
    cdef int64_t expired_count(self) noexcept


# A wheel for *loop* closing channels after *timeout* seconds without input (any thread:
# it touches the loop only when its first channel is watched, on the loop thread).
cdef IdleWheel new_idle_wheel(EventLoop loop, double timeout)
