# BlockingQueue: the seed's BlockingQueue in C -- a ring of object pointers guarded by a
# pthread mutex + condition variable.  Workers wait with the GIL released.
#
# Lock rule: no code path holds _mutex while it needs the GIL (critical sections touch only
# C data), so taking _mutex while holding the GIL cannot deadlock.  References: put()
# increfs before storing; take() hands the reference over to the caller.
from cpython.ref cimport PyObject


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_signal(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)


cdef class BlockingQueue:
    cdef:
        pthread_mutex_t _mutex
        pthread_cond_t _not_empty
        PyObject** _ring
        Py_ssize_t _cap
        Py_ssize_t _head
        Py_ssize_t _count
        Py_ssize_t _waiters
        bint _closed
        bint _ready

    # Append (never blocks).  notify=False leaves waking a worker to notify().
    cdef int put(self, object item, bint notify) except -1
    # Wake as many waiting workers as there are items (after puts with notify=False).
    cdef int notify(self) noexcept
    # Block (call without the GIL) until items are queued; move up to max_items of them,
    # at most ceil(count / share), into out.  Returns 0 once closed and empty.
    cdef Py_ssize_t take(self, PyObject** out, Py_ssize_t max_items,
                         Py_ssize_t share) noexcept nogil
    cdef int close(self) noexcept
    # Remove and return every queued item.
    cdef list drain(self)
    cdef Py_ssize_t size(self) noexcept
