# cython: language_level=3, embedsignature=True, cdivision=True
"""TimerQueue: min-heap of (deadline, sequence) with lazy cancel (loop thread only)."""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from libc.math cimport ceil, floor, isinf
from libc.stdint cimport int64_t

DEF MIN_COMPACT = 64


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
        self._dead = 0
        self._timers = {}

    def __dealloc__(self):
        PyMem_RawFree(self._heap)

    def __len__(self):
        return len(self._timers)

    cdef int _push(self, double when, int64_t seq) except -1:
        cdef Py_ssize_t i, parent
        cdef TimerEntry e
        cdef TimerEntry* grown
        if self._size == self._cap:
            grown = <TimerEntry*>PyMem_RawRealloc(
                self._heap, (self._cap * 2 + 16) * sizeof(TimerEntry))
            if grown == NULL:
                raise MemoryError()
            self._heap = grown
            self._cap = self._cap * 2 + 16
        e.when = when
        e.seq = seq
        i = self._size
        self._size += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _less(&e, &self._heap[parent]):
                break
            self._heap[i] = self._heap[parent]
            i = parent
        self._heap[i] = e
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
        self._size -= 1
        if self._size > 0:
            self._heap[0] = self._heap[self._size]
            self._sift_down(0)

    cdef int _compact(self) except -1:
        """Drop dead entries and re-heapify (asyncio's rule: when over half is dead)."""
        cdef Py_ssize_t i, j = 0
        timers = self._timers
        for i in range(self._size):
            if self._heap[i].seq in timers:
                self._heap[j] = self._heap[i]
                j += 1
        self._size = j
        self._dead = 0
        i = self._size // 2 - 1
        while i >= 0:
            self._sift_down(i)
            i -= 1
        return 0

    cdef int add(self, int64_t seq, double when, double interval, object callback) except -1:
        self._timers[seq] = [callback, interval]
        self._push(when, seq)
        return 0

    cdef bint cancel(self, int64_t seq) except -1:
        if self._timers.pop(seq, None) is None:
            return False
        self._dead += 1
        if self._dead > MIN_COMPACT and self._dead * 2 > self._size:
            self._compact()
        return True

    cdef object take(self, int64_t seq):
        cdef list entry = self._timers.get(seq)
        if entry is None:
            return None
        if entry[1] == 0.0:
            del self._timers[seq]
        return entry[0]

    cdef int timeout_ms(self, double now) except -2:
        cdef double delta
        # Dead entries at the top would only cause an early wakeup: drop them first.
        while self._size and self._heap[0].seq not in self._timers:
            self._pop()
            self._dead -= 1
        if self._size == 0:
            return -1
        if isinf(self._heap[0].when):
            return -1
        delta = (self._heap[0].when - now) * 1000.0
        if delta <= 0:
            return 0
        if delta >= 2147483647.0:
            return 2147483647
        # Round up: waking a fraction of a millisecond early would spin.
        return <int>ceil(delta)

    cdef list pop_expired(self, double now):
        cdef TimerEntry top
        cdef list expired = []
        cdef double interval, nxt
        cdef list entry
        timers = self._timers
        while self._size and self._heap[0].when <= now:
            top = self._heap[0]
            self._pop()
            entry = timers.get(top.seq)
            if entry is None:
                self._dead -= 1
                continue
            interval = entry[1]
            if interval > 0:
                # No drift: the next deadline is the previous deadline plus the interval,
                # skipping whole periods the loop missed (one catch-up fire, not a burst).
                nxt = top.when + interval
                if nxt <= now:
                    nxt = top.when + (floor((now - top.when) / interval) + 1) * interval
                self._push(nxt, top.seq)
            expired.append(top.seq)
        return expired

    cdef int restore(self, list seqs, double now) except -1:
        cdef int64_t seq
        for seq in seqs:
            entry = self._timers.get(seq)
            if entry is not None and entry[1] == 0.0:
                self._push(now, seq)
        return 0

    def _heap_size(self):
        """Heap entries, live and dead (for tests of the compaction bound)."""
        return self._size
