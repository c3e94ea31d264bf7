# TimerQueue: a min-heap of (deadline, sequence) in C memory plus a dict of live timers.
#
# Loop thread only: other threads reach it through the loop's pending functors.  A timer id
# is its sequence number, unique for the life of the process (so a stale id can never
# cancel a newer timer).  Cancel removes the dict entry; the heap entry is dropped lazily
# when it reaches the top, and the heap is compacted when over half of it is dead.
from libc.stdint cimport int64_t


cdef struct TimerEntry:
    double when
    int64_t seq


cdef class TimerQueue:
    cdef:
        TimerEntry* _heap
        Py_ssize_t _size
        Py_ssize_t _cap
        Py_ssize_t _dead          # heap entries whose timer was cancelled
        dict _timers              # seq -> [callback, interval]

    cdef int _push(self, double when, int64_t seq) except -1
    cdef void _sift_down(self, Py_ssize_t i) noexcept nogil
    cdef void _pop(self) noexcept nogil
    cdef int _compact(self) except -1
    cdef int add(self, int64_t seq, double when, double interval, object callback) except -1
    cdef bint cancel(self, int64_t seq) except -1
    # Milliseconds until the earliest deadline, clamped to [0, 2**31-1]; -1 if none.
    cdef int timeout_ms(self, double now) except -2
    # Pops the ids of every timer due at *now*; repeating timers are
    # re-armed before their callback runs.  The loop runs the list (see EventLoop).
    cdef list pop_expired(self, double now)
    # The callback of a popped timer if it is still live (None if it was cancelled since);
    # a one-shot timer is forgotten here, just before its callback runs.
    cdef object take(self, int64_t seq)
    # Re-arm popped one-shot timers that did not run (an exception cut the pass short).
    cdef int restore(self, list seqs, double now) except -1
