# cython: language_level=3, embedsignature=True, cdivision=True
"""BlockingQueue: mutex + condition variable queue for the worker pool (internal)."""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport int64_t

from _core.includes.sys cimport cppnp_monotonic

from _core.includes.consts cimport WAKE_RECHECK_MS, WAKE_STALL, grown_capacity


@cython.auto_pickle(False)
@cython.final
cdef class BlockingQueue:
    """The worker pool's task queue (internal)."""

    def __cinit__(self):
        pthread_mutex_init(&self._mutex, NULL)
        pthread_cond_init(&self._not_empty, NULL)
        self._ready = True

    def __dealloc__(self):
        cdef Py_ssize_t i
        if not self._ready:
            return
        for i in range(self._count):
            Py_DECREF(<object>self._ring[(self._head + i) % self._cap])
        PyMem_RawFree(self._ring)
        pthread_cond_destroy(&self._not_empty)
        pthread_mutex_destroy(&self._mutex)

    def __len__(self):
        return self.size()

    cdef Py_ssize_t size(self) noexcept:
        cdef Py_ssize_t n
        pthread_mutex_lock(&self._mutex)
        n = self._count
        pthread_mutex_unlock(&self._mutex)
        return n

    cdef bint closed(self) noexcept:
        cdef bint c
        pthread_mutex_lock(&self._mutex)
        c = self._closed
        pthread_mutex_unlock(&self._mutex)
        return c

    cdef Py_ssize_t _wake(self, Py_ssize_t n) noexcept nogil:
        # Under _mutex: wake up to n waiting workers that have no wakeup on its way;
        # returns how many were signalled.
        cdef Py_ssize_t idle = self._waiters - self._signalled
        cdef Py_ssize_t _i
        if n > idle:
            n = idle
        if n <= 0:
            return 0
        for _i in range(n):
            pthread_cond_signal(&self._not_empty)
        self._signalled += n
        self._signals += n
        return n

    cdef int push(self, PyObject* item, bint notify, bint internal) noexcept:
        cdef PyObject** grown
        cdef Py_ssize_t i, newcap
        pthread_mutex_lock(&self._mutex)
        if self._closed and not internal:
            pthread_mutex_unlock(&self._mutex)
            return 1
        if self._count == self._cap:
            newcap = grown_capacity(self._cap)
            grown = <PyObject**>PyMem_RawRealloc(self._ring, newcap * sizeof(PyObject*))
            if grown == NULL:
                pthread_mutex_unlock(&self._mutex)
                return -1
            # Unwrap the ring into the larger block: move the wrapped prefix to the end.
            for i in range(self._head + self._count - self._cap):
                grown[self._cap + i] = grown[i]
            self._ring = grown
            self._cap = newcap
        Py_INCREF(<object>item)
        self._ring[(self._head + self._count) % self._cap] = item
        if self._count == 0:
            self._nonempty_since = cppnp_monotonic()
        self._count += 1
        self._pushes += 1
        if notify and self._wake(1) == 0:
            self._skipped += 1
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef int notify(self, Py_ssize_t keep) noexcept:
        pthread_mutex_lock(&self._mutex)
        if self._count > keep and self._wake(self._count - keep) == 0:
            self._skipped += 1
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef int notify_lazy(self, double now) noexcept nogil:
        cdef Py_ssize_t idle, awake
        cdef int recheck = -1
        pthread_mutex_lock(&self._mutex)
        if self._count:
            idle = self._waiters - self._signalled
            awake = self._workers - idle
            if awake <= 0:
                self._wake(1)
            elif now - self._nonempty_since >= WAKE_STALL and idle > 0:
                self._wake(1)
                self._stall_wakeups += 1
                self._nonempty_since = now      # the next one needs another stall
            else:
                self._lazy_skipped += 1
            if self._waiters - self._signalled > 0:
                recheck = WAKE_RECHECK_MS
        pthread_mutex_unlock(&self._mutex)
        return recheck

    cdef int add_worker(self, int delta) noexcept nogil:
        pthread_mutex_lock(&self._mutex)
        self._workers += delta
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef int counters(self, int64_t* out) noexcept:
        pthread_mutex_lock(&self._mutex)
        out[0] = self._pushes
        out[1] = self._signals
        out[2] = self._skipped
        out[3] = self._lazy_skipped
        out[4] = self._stall_wakeups
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef PyObject* _pop(self) noexcept nogil:
        # Under _mutex, with _count > 0.
        cdef PyObject* item = self._ring[self._head]
        self._head = (self._head + 1) % self._cap
        self._count -= 1
        return item

    cdef PyObject* take(self) noexcept nogil:
        cdef PyObject* item = NULL
        pthread_mutex_lock(&self._mutex)
        while self._count == 0 and not self._closed:
            self._waiters += 1
            pthread_cond_wait(&self._not_empty, &self._mutex)
            self._waiters -= 1
            if self._signalled > 0:
                self._signalled -= 1
        if self._count:
            item = self._pop()
        pthread_mutex_unlock(&self._mutex)
        return item

    cdef PyObject* try_take(self) noexcept nogil:
        cdef PyObject* item = NULL
        pthread_mutex_lock(&self._mutex)
        if self._count:
            item = self._pop()
        pthread_mutex_unlock(&self._mutex)
        return item

    cdef int close(self) noexcept:
        pthread_mutex_lock(&self._mutex)
        self._closed = True
        self._signalled = self._waiters
        pthread_cond_broadcast(&self._not_empty)
        pthread_mutex_unlock(&self._mutex)
        return 0
