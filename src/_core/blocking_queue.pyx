# cython: language_level=3, embedsignature=True, cdivision=True
"""BlockingQueue: mutex + condition variable queue for the worker pool (internal)."""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject


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

    cdef int put(self, object item, bint notify) except -1:
        cdef PyObject** grown
        cdef Py_ssize_t i, newcap
        Py_INCREF(item)
        pthread_mutex_lock(&self._mutex)
        if self._count == self._cap:
            newcap = self._cap * 2 + 64
            grown = <PyObject**>PyMem_RawRealloc(self._ring, newcap * sizeof(PyObject*))
            if grown == NULL:
                pthread_mutex_unlock(&self._mutex)
                Py_DECREF(item)
                raise MemoryError()
            # Unwrap the ring into the larger block: move the wrapped prefix to the end.
            for i in range(self._head + self._count - self._cap):
                grown[self._cap + i] = grown[i]
            self._ring = grown
            self._cap = newcap
        self._ring[(self._head + self._count) % self._cap] = <PyObject*>item
        self._count += 1
        if notify and self._waiters:
            pthread_cond_signal(&self._not_empty)
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef int notify(self) noexcept:
        cdef Py_ssize_t n
        pthread_mutex_lock(&self._mutex)
        n = self._count if self._count < self._waiters else self._waiters
        if n == self._waiters and n:
            pthread_cond_broadcast(&self._not_empty)
        else:
            while n > 0:
                pthread_cond_signal(&self._not_empty)
                n -= 1
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef Py_ssize_t take(self, PyObject** out, Py_ssize_t max_items,
                         Py_ssize_t share) noexcept nogil:
        cdef Py_ssize_t n, i
        pthread_mutex_lock(&self._mutex)
        while self._count == 0 and not self._closed:
            self._waiters += 1
            pthread_cond_wait(&self._not_empty, &self._mutex)
            self._waiters -= 1
        # Share the backlog among the workers: a worker takes its part of it in one go
        # (one GIL acquisition for several tasks) but leaves work for the others.
        n = (self._count + share - 1) // share if share > 1 else self._count
        if n > max_items:
            n = max_items
        for i in range(n):
            out[i] = self._ring[self._head]
            self._head = (self._head + 1) % self._cap
        self._count -= n
        if self._count and self._waiters:
            pthread_cond_signal(&self._not_empty)
        pthread_mutex_unlock(&self._mutex)
        return n

    cdef int close(self) noexcept:
        pthread_mutex_lock(&self._mutex)
        self._closed = True
        pthread_cond_broadcast(&self._not_empty)
        pthread_mutex_unlock(&self._mutex)
        return 0

    cdef list drain(self):
        cdef list items = []
        cdef PyObject* p
        while True:
            pthread_mutex_lock(&self._mutex)
            if self._count == 0:
                pthread_mutex_unlock(&self._mutex)
                break
            p = self._ring[self._head]
            self._head = (self._head + 1) % self._cap
            self._count -= 1
            pthread_mutex_unlock(&self._mutex)
            items.append(<object>p)     # the list takes a new reference ...
            Py_DECREF(<object>p)        # ... and the queue's one is dropped
        return items
