# PendingFunctors: the loop's mutex-protected functor vector and its eventfd wakeup
# (the seed's _pendingFunctors / QueueLoop / DoPendingFunctors).
#
# Items are stored flat as (fn, arg) pairs.  Any thread may append; only the loop thread
# swaps the list out (under the lock) and runs it (outside the lock).  The eventfd is
# written only when a thread other than the loop appends and no wakeup is outstanding
# since the last swap: many appends between two loop passes cost one write().
cimport cython
from libc.stdint cimport int64_t

from _core.includes.sys cimport cppnp_atomic_load

# PendingFunctors._polling.
cdef enum:
    POLL_OFF = 0
    POLL_WAKE = 1
    POLL_SLICED = 2


cdef class PendingFunctors:
    cdef:
        cython.pymutex _lock
        list _items
        bint _wake_outstanding
        readonly int wakeup_fd
        bint _closed
        int64_t _dropped        # functors refused or discarded by close() (under _lock)
        # Atomic: the loop is (about to be) blocked in epoll_wait -- POLL_WAKE: an append
        # from another thread writes the eventfd; POLL_SLICED: the loop wakes every few
        # ms to look at _deferred, so a ThreadPool worker may defer its write to the end
        # of its batch.  Set under _lock (so an append either sees it or is seen by
        # begin_poll/set_poll_mode), cleared without it (end_poll).
        int64_t _polling
        # Atomic: a worker deferred the wakeup this append would have written (cleared by
        # swap(), or when the worker writes it: flush_deferred).
        int64_t _deferred
        # Counters (written under _lock, read from any thread):
        int64_t _wakeups        # eventfd writes by append() (and deferred ones)
        int64_t _wakeups_deferred  # wakeups a worker deferred to the end of its batch
        int64_t _wakeups_skipped  # appends from other threads that needed no write
        int64_t _batches        # swaps that took at least one functor
        int64_t _batch_items    # functors taken by those swaps
        int64_t _batch_max      # the most functors one swap took

    # Returns 1 if queued, 0 if the queue is closed (the functor is dropped and counted).
    cdef int append(self, object fn, object arg, bint from_loop_thread) except -1
    cdef list swap(self)
    cdef int put_back(self, list items) except -1
    # The loop thread, just before epoll_wait with a timeout: returns True (and stays
    # "not polling") if functors are queued, else marks the loop polling, so that the next
    # append from another thread writes the eventfd.  end_poll() once epoll_wait returned.
    cdef bint begin_poll(self) except -1
    cdef int end_poll(self) except -1
    # The polling loop, without the GIL, between two epoll_wait slices: switch between
    # POLL_WAKE and POLL_SLICED (under _lock).  Returns True if a deferred wakeup is
    # outstanding: the loop must not block.
    cdef bint set_poll_mode(self, int64_t mode) noexcept nogil
    # A deferred wakeup is outstanding (the sliced loop stops polling).
    cdef inline bint deferred(self) noexcept nogil:
        return cppnp_atomic_load(&self._deferred) != 0
    # Write the wakeup a worker deferred, unless the loop took the functors meanwhile.
    cdef void flush_deferred(self) noexcept nogil
    # A snapshot of the counters: (wakeups, wakeups_skipped, batches, batch_items,
    # batch_max, wakeups_deferred).
    cdef tuple counters(self)
    cdef int wakeup(self) except -1
    cdef void _write_wakeup(self) noexcept nogil
    cdef int drain_wakeup(self) except -1
    cdef int close(self) except -1
    # Written under the lock, read from any thread.
    cdef int64_t dropped_count(self) noexcept


# Deferred wakeups (a ThreadPool worker, GIL builds): between defer_begin() and
# defer_stop() -- one batch of tasks, run while the worker holds the GIL -- a send to a
# loop that polls in slices (POLL_SLICED) records the loop instead of writing its eventfd:
# woken now, the loop could only block on the GIL the worker holds.  The worker writes
# them with defer_flush() after it released the GIL, then drops its references with
# defer_release() (with the GIL).  A sliced loop looks at _deferred every slice, so a task
# that blocks after a send delays its reply by one slice at most (flush_replies() in a task
# sends at once).
cdef void defer_begin() noexcept nogil
cdef void defer_stop() noexcept nogil
cdef void defer_flush() noexcept nogil
cdef void defer_release() noexcept
