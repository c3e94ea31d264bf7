# TimerQueue: a min-heap of (deadline, sequence) in C memory (muduo's TimerQueue).
#
# Loop thread only: other threads reach it through the loop's pending functors.  A timer
# id is its sequence number, unique for the life of the loop (a stale id can never cancel
# a newer timer).  Heap entries own a reference to their callback.  A C hash set holds the
# live ids: cancel removes the id and the heap entry is dropped lazily when it reaches
# the top; the heap is compacted once over half of it is dead (asyncio's rule).
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t


cdef extern from "id_set.h":
    ctypedef struct cppnp_id_set:
        size_t count
    void cppnp_id_set_free(cppnp_id_set* s)
    int cppnp_id_set_add(cppnp_id_set* s, int64_t id)
    bint cppnp_id_set_contains(const cppnp_id_set* s, int64_t id)
    bint cppnp_id_set_remove(cppnp_id_set* s, int64_t id)


cdef struct TimerEntry:
    double when
    int64_t seq
    double interval         # > 0: repeating
    PyObject* callback      # owned reference


cdef class TimerQueue:
    cdef:
        TimerEntry* _heap
        Py_ssize_t _size
        Py_ssize_t _cap
        cppnp_id_set _live
        int64_t _live_count     # relaxed mirror of _live.count, for other threads

    cdef int _push(self, TimerEntry* e) except -1
    cdef void _sift_down(self, Py_ssize_t i) noexcept nogil
    cdef void _pop(self) noexcept nogil
    cdef int _compact(self) except -1
    cdef int add(self, int64_t seq, double when, double interval, object callback) except -1
    cdef bint cancel(self, int64_t seq) except -1
    # Milliseconds until the earliest deadline, clamped to [0, 2**31-1]; -1 if none.
    cdef int timeout_ms(self, double now) except -2
    # The callback of the earliest live timer due at *now* whose id is below *cutoff*
    # (timers added during this pass wait for the next one), or None.  A one-shot timer is
    # forgotten here; a repeating one is re-armed first, so it can cancel itself, with a
    # deadline after *now*: it never fires twice in one pass.
    cdef object pop_due(self, double now, int64_t cutoff)
    # How many timers are live (any thread).
    cdef int64_t live_count(self) noexcept
    cdef int clear(self) except -1
