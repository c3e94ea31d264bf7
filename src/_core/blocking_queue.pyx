# cython: language_level=3, embedsignature=True, cdivision=True
"""BlockingQueue: the worker pool's mutex-guarded queue, idle workers parked (internal)."""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport int64_t

from _core.includes.consts cimport WAKE_RECHECK_MS, WAKE_STALL, grown_capacity


@cython.auto_pickle(False)
@cython.final
cdef class BlockingQueue:
    """The worker pool's task queue (internal)."""

    def __cinit__(self):
        pthread_mutex_init(&self._mutex, NULL)
        self._ready = True

    def __dealloc__(self):
        cdef Py_ssize_t i
        if not self._ready:
            return
        for i in range(self._count):
            Py_DECREF(<object>self._ring[(self._head + i) % self._cap])
        PyMem_RawFree(self._ring)
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

    cdef Parker* _detach(self, Py_ssize_t n) noexcept nogil:
        cdef Parker* chain = NULL
        cdef Parker* tail = NULL
        cdef Parker* p
        while n > 0 and self._idle != NULL:
            p = self._idle
            self._idle = p.next
            p.next = NULL
            if tail == NULL:
                chain = p
            else:
                tail.next = p
            tail = p
            self._nidle -= 1
            self._signals += 1
            n -= 1
        return chain

    cdef int push(self, PyObject* item, bint notify, bint internal) noexcept:
        cdef Parker* woken = NULL
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
        self._count += 1
        self._pushes += 1
        if notify:
            woken = self._detach(1)
            if woken == NULL:
                self._skipped += 1
        pthread_mutex_unlock(&self._mutex)
        _unpark_all(woken)
        return 0

    cdef int notify(self, Py_ssize_t keep) noexcept:
        cdef Parker* woken = NULL
        pthread_mutex_lock(&self._mutex)
        if self._count > keep:
            woken = self._detach(self._count - keep)
            if woken == NULL:
                self._skipped += 1
        pthread_mutex_unlock(&self._mutex)
        _unpark_all(woken)
        return 0

    cdef int notify_lazy(self, double now) noexcept nogil:
        cdef Parker* woken = NULL
        cdef int recheck = -1
        pthread_mutex_lock(&self._mutex)
        if self._count:
            if self._nonempty_since == 0.0:
                self._nonempty_since = now      # the first loop pass to see it queued
            if self._workers - self._nidle <= 0:
                woken = self._detach(1)             # nobody is awake
            elif now - self._nonempty_since >= WAKE_STALL and self._nidle > 0:
                # The awake workers are not keeping up (a slow task, or work that runs in
                # parallel): wake one for every queued item.
                woken = self._detach(self._count)
                self._stall_wakeups += 1
                self._nonempty_since = now          # the next ones need another stall
            else:
                self._lazy_skipped += 1
            if self._nidle > 0:
                recheck = WAKE_RECHECK_MS
        pthread_mutex_unlock(&self._mutex)
        _unpark_all(woken)
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
        out[5] = self._nidle
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef PyObject* _pop(self) noexcept nogil:
        # Under _mutex, with _count > 0.
        cdef PyObject* item = self._ring[self._head]
        self._head = (self._head + 1) % self._cap
        self._count -= 1
        if self._count == 0:
            self._nonempty_since = 0.0      # emptied: a stall starts over
        return item

    cdef PyObject* take(self) noexcept nogil:
        cdef PyObject* item = NULL
        cdef Parker me
        pthread_mutex_lock(&self._mutex)
        while self._count == 0 and not self._closed:
            me.woken = 0
            me.next = self._idle
            self._idle = &me
            self._nidle += 1
            pthread_mutex_unlock(&self._mutex)
            park(&me)           # until a wakeup took us off the idle stack
            pthread_mutex_lock(&self._mutex)
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
        cdef Parker* woken
        pthread_mutex_lock(&self._mutex)
        self._closed = True
        woken = self._detach(self._nidle)
        pthread_mutex_unlock(&self._mutex)
        _unpark_all(woken)
        return 0


cdef void _unpark_all(Parker* chain) noexcept nogil:
    cdef Parker* nxt
    while chain != NULL:
        nxt = chain.next        # read before the unpark: the parker's frame may then go
        unpark(chain)
        chain = nxt
