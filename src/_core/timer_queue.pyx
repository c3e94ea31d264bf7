# cython: language_level=3, embedsignature=True, cdivision=True
"""TimerQueue: min-heap of (deadline, sequence) with lazy cancel (loop thread only)."""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.math cimport ceil, floor, INFINITY, isinf, nextafter
from libc.stdint cimport int64_t

from _core.includes.consts cimport MIN_COMPACT, grown_capacity
from _core.includes.sys cimport cppnp_relaxed_load, cppnp_relaxed_store


cdef inline bint _less(TimerEntry* a, TimerEntry* b) noexcept nogil:
    # Equal deadlines fire in insertion order: the sequence breaks ties.
    return a.when < b.when or (a.when == b.when and a.seq < b.seq)


@cython.auto_pickle(False)
@cython.final
cdef class TimerQueue:
    """The loop's timers.  Internal: use EventLoop.run_at/run_after/run_every."""

    def __cinit__(self):
        self._heap = NULL
        self._size = 0
        self._cap = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._size):
            Py_DECREF(<object>self._heap[i].callback)
        PyMem_RawFree(self._heap)
        cppnp_id_set_free(&self._live)

    cdef int64_t live_count(self) noexcept:
        return cppnp_relaxed_load(&self._live_count)

    cdef int clear(self) except -1:
        """Drop every timer (the loop is closing)."""
        cdef Py_ssize_t i, n = self._size
        self._size = 0
        cppnp_id_set_free(&self._live)
        cppnp_relaxed_store(&self._live_count, 0)
        for i in range(n):
            Py_DECREF(<object>self._heap[i].callback)
        return 0

    cdef int _push(self, TimerEntry* e) except -1:
        cdef Py_ssize_t i, parent
        cdef TimerEntry* grown
        cdef Py_ssize_t newcap
        if self._size == self._cap:
            newcap = grown_capacity(self._cap)
            grown = <TimerEntry*>PyMem_RawRealloc(self._heap, newcap * sizeof(TimerEntry))
            if grown == NULL:
                raise MemoryError()
            self._heap = grown
            self._cap = newcap
        i = self._size
        self._size += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _less(e, &self._heap[parent]):
                break
            self._heap[i] = self._heap[parent]
            i = parent
        self._heap[i] = e[0]
        return 0

    cdef void _sift_down(self, Py_ssize_t i) noexcept nogil:
        cdef TimerEntry e = self._heap[i]
        cdef Py_ssize_t child
        while True:
            child = 2 * i + 1
            if child >= self._size:
                break
            if child + 1 < self._size and _less(&self._heap[child + 1], &self._heap[child]):
                child += 1
            if not _less(&self._heap[child], &e):
                break
            self._heap[i] = self._heap[child]
            i = child
        self._heap[i] = e

    cdef void _pop(self) noexcept nogil:
        """Remove the top entry (the caller has taken or released its reference)."""
        self._size -= 1
        if self._size > 0:
            self._heap[0] = self._heap[self._size]
            self._sift_down(0)

    cdef int _compact(self) except -1:
        """Drop dead entries and re-heapify."""
        cdef Py_ssize_t i, j = 0
        cdef list dead = []
        for i in range(self._size):
            if cppnp_id_set_contains(&self._live, self._heap[i].seq):
                self._heap[j] = self._heap[i]
                j += 1
            else:
                dead.append(<object>self._heap[i].callback)
                Py_DECREF(<object>self._heap[i].callback)
        self._size = j
        i = self._size // 2 - 1
        while i >= 0:
            self._sift_down(i)
            i -= 1
        return 0    # `dead` releases the callbacks last, after the heap is consistent

    cdef int add(self, int64_t seq, double when, double interval, object callback) except -1:
        cdef TimerEntry e
        e.when = when
        e.seq = seq
        e.interval = interval
        e.callback = <PyObject*>callback
        if cppnp_id_set_add(&self._live, seq) < 0:
            raise MemoryError()
        self._push(&e)
        Py_INCREF(callback)
        cppnp_relaxed_store(&self._live_count, self._live.count)
        return 0

    cdef bint cancel(self, int64_t seq) except -1:
        if not cppnp_id_set_remove(&self._live, seq):
            return False
        cppnp_relaxed_store(&self._live_count, self._live.count)
        if self._size - <Py_ssize_t>self._live.count > MIN_COMPACT \
                and (self._size - <Py_ssize_t>self._live.count) * 2 > self._size:
            self._compact()
        return True

    cdef int timeout_ms(self, double now) except -2:
        cdef double delta
        cdef object cb
        # Dead entries at the top would only cause an early wakeup: drop them first.
        while self._size and not cppnp_id_set_contains(&self._live, self._heap[0].seq):
            cb = <object>self._heap[0].callback
            Py_DECREF(cb)
            self._pop()
            cb = None
        if self._size == 0:
            return -1
        if isinf(self._heap[0].when) and self._heap[0].when > 0:
            return -1           # +inf never fires
        delta = (self._heap[0].when - now) * 1000.0
        if delta <= 0:
            return 0
        if delta >= 2147483647.0:
            return 2147483647
        # Round up: waking a fraction of a millisecond early would spin.
        return <int>ceil(delta)

    cdef object pop_due(self, double now, int64_t cutoff):
        cdef TimerEntry top
        cdef double nxt
        cdef object cb
        while self._size:
            top = self._heap[0]
            if top.when > now or top.seq >= cutoff:
                return None
            cb = <object>top.callback      # a new reference; the heap's one is below
            if not cppnp_id_set_remove(&self._live, top.seq):
                Py_DECREF(cb)              # cancelled: drop the heap's reference
                self._pop()
                cb = None
                continue
            if top.interval > 0:
                # No drift: the next deadline is the previous one plus the interval,
                # skipping whole periods the loop missed (one catch-up fire, not a burst).
                nxt = top.when + top.interval
                if nxt <= now:
                    nxt = top.when + (floor((now - top.when) / top.interval) + 1) * top.interval
                # Rounding (or an interval below the resolution of a double this large)
                # can leave the deadline at or before now: it must be after now, or the
                # timer would fire again in this pass, forever.
                if not nxt > now or isinf(nxt):
                    nxt = nextafter(now, INFINITY)
                cppnp_id_set_add(&self._live, top.seq)
                self._heap[0].when = nxt
                self._sift_down(0)         # the entry keeps its reference
            else:
                Py_DECREF(cb)              # the heap's reference goes; `cb` keeps one
                self._pop()
                cppnp_relaxed_store(&self._live_count, self._live.count)
            return cb
        return None

    def _heap_size(self):
        """Heap entries, live and dead (for tests of the compaction bound)."""
        return self._size
