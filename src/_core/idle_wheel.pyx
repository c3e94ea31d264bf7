# cython: language_level=3, embedsignature=True
"""IdleWheel: the timing wheel that closes idle connections (see idle_wheel.pxd)."""

cimport cython
from libc.stdint cimport int64_t

from _core.channel cimport Channel
from _core.event_loop cimport EventLoop
from _core.includes.consts cimport IDLE_WHEEL_TICKS, MIN_INTERVAL
from _core.includes.sys cimport cppnp_counter_add, cppnp_relaxed_load


cdef IdleWheel new_idle_wheel(EventLoop loop, double timeout):
    cdef IdleWheel w = IdleWheel.__new__(IdleWheel)
    w._loop = loop
    w._timeout = timeout
    w._n = IDLE_WHEEL_TICKS
    w._tick = timeout / w._n
    if w._tick < MIN_INTERVAL:
        w._tick = MIN_INTERVAL
    w._buckets = [[] for _ in range(w._n + 2)]
    return w


@cython.auto_pickle(False)
@cython.final
cdef class IdleWheel:
    """A timing wheel closing idle channels of one loop (internal; see idle_wheel.pxd)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("IdleWheel objects are made by the core (new_idle_wheel)")

    cdef int watch(self, Channel ch) except -1:
        if ch.idle_tick >= 0:
            return 0
        self._loop.assert_in_loop_thread("IdleWheel.watch")
        ch.idle_tick = self.now
        (<list>self._buckets[(self.now + self._n + 1) % (self._n + 2)]).append(ch)
        self._members += 1
        if self._timer is None:
            self._timer = self._loop.run_every(self._tick, self._on_tick)
        return 0

    cdef int leave(self, Channel ch) except -1:
        # The channel stays in its bucket until it comes up (dropped there): O(1).
        cdef list b
        if ch.idle_tick < 0:
            return 0
        ch.idle_tick = -1
        self._members -= 1
        if self._members == 0:
            if self._timer is not None:
                timer, self._timer = self._timer, None
                if not self._loop.closed:
                    self._loop.cancel_timer(timer)
            for b in self._buckets:
                del b[:]
        return 0

    def _on_tick(self):
        self._tick_once()

    cdef int _tick_once(self) except -1:
        cdef int64_t r = self._n + 2, due
        cdef Channel ch
        cdef list expired = []
        self.now += 1
        cdef list bucket = self._buckets[self.now % r]
        self._buckets[self.now % r] = []
        for ch in bucket:
            if ch.idle_tick < 0:
                continue                    # left: forgotten here
            due = ch.idle_tick + self._n + 1
            if due <= self.now:
                expired.append(ch)
            else:
                (<list>self._buckets[due % r]).append(ch)
        for ch in expired:
            self.leave(ch)
            cppnp_counter_add(&self._expired, 1)
            try:
                ch.idle_expired(self._timeout)
            except Exception:
                self._loop.report_error("idle close of %r" % (ch,))
        return 0

    cdef int64_t expired_count(self) noexcept:
        return cppnp_relaxed_load(&self._expired)

    @property
    def timeout(self):
        """The idle timeout in seconds.

        Thread-safe.
        """
        return self._timeout

    @property
    def tick(self):
        """Seconds per wheel tick (a channel is closed within one tick after its deadline).

        Thread-safe.
        """
        return self._tick

    @property
    def expired(self):
        """How many channels this wheel closed for being idle.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._expired)
