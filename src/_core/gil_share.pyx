# cython: language_level=3, embedsignature=True
"""GIL sharing between loop threads and ThreadPool workers (see gil_share.pxd)."""

from libc.stdint cimport int64_t

from _core.includes.consts cimport (
    HAND_OVER_SPINS, LOOP_SLICE, WORKER_SLICE, YIELD_SPINS,
)
from _core.includes.sys cimport cppnp_atomic_add, cppnp_atomic_load, cppnp_monotonic

import sys

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #define CPPNP_GIL_MAY_BE_OFF 1
    #else
    #define CPPNP_GIL_MAY_BE_OFF 0
    #endif
    """
    const bint GIL_MAY_BE_OFF "CPPNP_GIL_MAY_BE_OFF"

# Loop threads between epoll_wait's return and getting the GIL back.
cdef int64_t _loops_wanting = 0
# Workers about to take the GIL (counted only while some loop shares: _sharing_loops).
cdef int64_t _workers_wanting = 0
# Loops running with a GIL to share; 0 on a free-threaded build with the GIL off.
cdef int64_t _sharing_loops = 0
# sys._is_gil_enabled (3.13+): False on a free-threaded build running with the GIL off.
cdef object _is_gil_enabled = getattr(sys, "_is_gil_enabled", None)


cdef inline void _spin_while_at_least(int64_t* counter, int64_t floor,
                                      int max_spins) noexcept nogil:
    """The one spin wait: yield the CPU while *counter* >= *floor*, at most *max_spins*
    times (the other side may be waiting for a GIL some third thread holds)."""
    cdef int spins = 0
    while cppnp_atomic_load(counter) >= floor and spins < max_spins:
        sched_yield()
        spins += 1


cdef bint loop_share_begin() except -1:
    if GIL_MAY_BE_OFF and _is_gil_enabled is not None and not _is_gil_enabled():
        return False
    cppnp_atomic_add(&_sharing_loops, 1)
    return True


cdef void loop_share_end(bint sharing) noexcept nogil:
    if sharing:
        cppnp_atomic_add(&_sharing_loops, -1)


cdef void loop_wants_gil(bint sharing) noexcept nogil:
    if sharing:
        cppnp_atomic_add(&_loops_wanting, 1)


cdef void loop_has_gil(bint sharing) noexcept nogil:
    if sharing:
        cppnp_atomic_add(&_loops_wanting, -1)


cdef int loop_share_slice(bint sharing, double* slice_start) except -1:
    cdef int64_t before
    if sharing and cppnp_atomic_load(&_workers_wanting) > 0 \
            and cppnp_monotonic() - slice_start[0] >= LOOP_SLICE:
        with nogil:
            # Wait (bounded) until a waiting worker has taken the GIL, then announce
            # that we want it back (the worker steps aside after its own slice).
            before = cppnp_atomic_load(&_workers_wanting)
            _spin_while_at_least(&_workers_wanting, before, HAND_OVER_SPINS)
            cppnp_atomic_add(&_loops_wanting, 1)
        cppnp_atomic_add(&_loops_wanting, -1)
        slice_start[0] = cppnp_monotonic()
    return 0


cdef bint worker_wants_gil() noexcept nogil:
    if cppnp_atomic_load(&_sharing_loops) == 0:
        return False
    _spin_while_at_least(&_loops_wanting, 1, YIELD_SPINS)
    cppnp_atomic_add(&_workers_wanting, 1)
    return True


cdef void worker_has_gil(bint counted) noexcept nogil:
    if counted:
        cppnp_atomic_add(&_workers_wanting, -1)


cdef int worker_share_slice(double* slice_start) except -1:
    cdef bint counted
    if cppnp_atomic_load(&_loops_wanting) > 0 \
            and cppnp_monotonic() - slice_start[0] >= WORKER_SLICE:
        with nogil:
            counted = worker_wants_gil()
        worker_has_gil(counted)
        slice_start[0] = cppnp_monotonic()
    return 0
