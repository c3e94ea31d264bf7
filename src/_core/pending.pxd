# PendingFunctors: the loop's mutex-protected functor vector and its eventfd wakeup
# (the seed's _pendingFunctors / QueueLoop / DoPendingFunctors).
#
# Items are stored flat as (fn, arg) pairs.  Any thread may append; only the loop thread
# swaps the list out (under the lock) and runs it (outside the lock).  The eventfd is
# written only when a thread other than the loop appends and no wakeup is outstanding
# since the last swap: many appends between two loop passes cost one write().
cimport cython
from libc.stdint cimport int64_t


cdef class PendingFunctors:
    cdef:
        cython.pymutex _lock
        list _items
        bint _wake_outstanding
        readonly int wakeup_fd
        bint _closed
        int64_t _dropped        # functors refused or discarded by close() (under _lock)
        # Atomic: the loop is (about to be) blocked in epoll_wait; set under _lock (so an
        # append either sees it or is seen by begin_poll), cleared without it (end_poll).
        int64_t _polling
        # Counters (written under _lock, read from any thread):
        int64_t _wakeups        # eventfd writes by append()
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
    # A snapshot of the counters: (wakeups, wakeups_skipped, batches, batch_items, batch_max).
    cdef tuple counters(self)
    cdef int wakeup(self) except -1
    cdef void _write_wakeup(self) noexcept
    cdef int drain_wakeup(self) except -1
    cdef int close(self) except -1
    # Written under the lock, read from any thread.
    cdef int64_t dropped_count(self) noexcept
