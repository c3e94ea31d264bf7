# cython: language_level=3, embedsignature=True
"""PendingFunctors: mutex-guarded functor list + eventfd wakeup (internal)."""

cimport cython
from libc.stdint cimport int64_t, uint64_t

from _core.includes.sys cimport (
    cppnp_atomic_load, cppnp_atomic_store, cppnp_relaxed_load, cppnp_relaxed_store,
)

from _core.includes.linux cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, EINTR, errno, eventfd, read, write,
)
from _core.includes.linux cimport close as close_fd


@cython.auto_pickle(False)
@cython.final
cdef class PendingFunctors:
    """The loop's cross-thread functor queue.  Internal: use EventLoop.queue_in_loop."""

    def __cinit__(self):
        self._items = []
        self._wake_outstanding = False
        self.wakeup_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.wakeup_fd < 0:
            import os
            raise OSError(errno, "eventfd() failed: " + os.strerror(errno))

    def __dealloc__(self):
        if self.wakeup_fd >= 0:
            close_fd(self.wakeup_fd)

    def __len__(self):
        with self._lock:
            return len(self._items) // 2

    cdef int append(self, object fn, object arg, bint from_loop_thread) except -1:
        with self._lock:
            if self._closed:
                # The loop is gone: nothing will ever run it.
                cppnp_relaxed_store(&self._dropped, self._dropped + 1)
                return 0
            self._items.append(fn)
            self._items.append(arg)
            # The loop thread itself never needs a wakeup: it checks for items (under this
            # lock, begin_poll) before it polls.  Another thread wakes it only while it
            # polls, once per swap at most.  The write happens under the lock so that
            # close() can never race it onto a reused fd number.
            if not from_loop_thread:
                if cppnp_atomic_load(&self._polling) and not self._wake_outstanding:
                    self._wake_outstanding = True
                    self._write_wakeup()
                    self._wakeups += 1
                else:
                    self._wakeups_skipped += 1
        return 1

    cdef list swap(self):
        cdef list items
        cdef Py_ssize_t n
        with self._lock:
            items = self._items
            self._items = []
            self._wake_outstanding = False
            n = len(items) // 2
            if n:
                self._batches += 1
                self._batch_items += n
                if n > self._batch_max:
                    self._batch_max = n
        return items

    cdef int put_back(self, list items) except -1:
        """Put unrun items back at the front (a BaseException interrupted the pass)."""
        with self._lock:
            self._items[:0] = items
        return 0

    cdef bint begin_poll(self) except -1:
        with self._lock:
            if len(self._items) != 0:
                return True
            cppnp_atomic_store(&self._polling, 1)
        return False

    cdef int end_poll(self) except -1:
        # Without the lock (the loop would contend with the appender that just woke it):
        # an append that still sees 1 only writes one needless wakeup; one that sees 0
        # leaves its functor to the loop, which is awake and checks before it polls.
        cppnp_atomic_store(&self._polling, 0)
        return 0

    cdef tuple counters(self):
        cdef int64_t w, ws, b, bi, bm
        with self._lock:
            w = self._wakeups
            ws = self._wakeups_skipped
            b = self._batches
            bi = self._batch_items
            bm = self._batch_max
        return (w, ws, b, bi, bm)

    cdef int wakeup(self) except -1:
        with self._lock:
            self._write_wakeup()
        return 0

    cdef void _write_wakeup(self) noexcept:
        # Caller holds the lock.  A non-blocking 8-byte eventfd write: it cannot block, so
        # the GIL is kept.  EAGAIN means the counter is saturated: the loop is awake anyway.
        cdef uint64_t one = 1
        if self.wakeup_fd >= 0:
            while write(self.wakeup_fd, &one, sizeof(one)) < 0 and errno == EINTR:
                pass

    cdef int drain_wakeup(self) except -1:
        cdef uint64_t value
        cdef int fd = self.wakeup_fd
        while read(fd, &value, sizeof(value)) < 0 and errno == EINTR:   # non-blocking
            pass
        return 0

    cdef int close(self) except -1:
        cdef list items
        with self._lock:
            self._closed = True
            items = self._items
            self._items = []
            cppnp_relaxed_store(&self._dropped, self._dropped + len(items) // 2)
            if self.wakeup_fd >= 0:
                close_fd(self.wakeup_fd)
                self.wakeup_fd = -1
        return 0

    cdef int64_t dropped_count(self) noexcept:
        return cppnp_relaxed_load(&self._dropped)
