# BlockingQueue: the seed's BlockingQueue in C -- a ring of object pointers guarded by a
# pthread mutex + condition variable.  Workers wait with the GIL released.
#
# Lock rule: no code path holds _mutex while it needs the GIL, runs Python code or
# allocates a Python object (critical sections touch only C data and reference counts that
# cannot reach zero), so taking _mutex while holding the GIL -- or another core lock --
# cannot deadlock.  References: push() increfs what it stores; take()/try_take() hand the
# reference over to the caller.
#
# Wakeups: a push with notify, or notify() (threads that are not a loop), wakes as many
# idle workers as there are queued items, counting only workers with no wakeup on its way
# (_waiters - _signalled).  A loop thread wakes lazily instead (notify_lazy(), called with
# the GIL released just before it polls): one worker when none is awake, and one more
# only when the queue has stayed non-empty for WAKE_STALL seconds -- the awake workers
# are not keeping up (a slow task, or real parallel work) -- rechecking every
# WAKE_RECHECK_MS while items wait and a worker is idle.  Workers take items one at a time
# and wait only when the queue is empty.  So no queued task waits behind a busy worker for
# longer than WAKE_STALL (plus one recheck) while another worker is idle, and a batch of
# instant tasks wakes one worker instead of all of them.
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t


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
        Py_ssize_t _waiters         # workers blocked in take()
        Py_ssize_t _signalled       # wakeups sent to them and not consumed yet
        Py_ssize_t _workers         # threads that consume the queue (add_worker)
        double _nonempty_since      # monotonic: the queue last became non-empty, or the
                                    # last stall wakeup (notify_lazy)
        bint _closed
        bint _ready
        # Counters (under _mutex): items pushed, condition signals sent, and wakeup calls
        # (a push with notify, or notify()) that found items queued but signalled nobody:
        # every idle worker already had a wakeup on its way, or none was idle (the busy
        # ones take the items with try_take/take).
        int64_t _pushes
        int64_t _signals
        int64_t _skipped
        int64_t _lazy_skipped       # notify_lazy() calls that left the items to awake workers
        int64_t _stall_wakeups      # wakeups notify_lazy() sent because of a stall

    # Append *item* (never blocks, never raises, no Python allocation: callable under
    # another core lock).  Returns 0 when stored, 1 when refused because the queue is
    # closed (unless *internal*: a hand-off by a thread that consumes the queue until it
    # is empty, e.g. a worker passing on a strand), -1 when out of memory.
    # notify=False leaves waking a worker to notify().
    cdef int push(self, PyObject* item, bint notify, bint internal) noexcept
    # Wake as many waiting workers as there are items beyond the first *keep* (after
    # pushes with notify=False; a worker that will take the next item itself keeps 1).
    cdef int notify(self, Py_ssize_t keep) noexcept
    # The loop's wakeup (call without the GIL, just before polling; *now* is monotonic):
    # wake one worker if items are queued and no worker is awake, or one more if the queue
    # has been non-empty for WAKE_STALL.  Returns the milliseconds within which the caller
    # must call again (items wait and a worker is idle), or -1.
    cdef int notify_lazy(self, double now) noexcept nogil
    # A consuming thread starts / stops (workers count as awake unless parked in take()).
    cdef int add_worker(self, int delta) noexcept nogil
    # Block (call without the GIL) until an item is queued and return it, or NULL once
    # the queue is closed and empty.
    cdef PyObject* take(self) noexcept nogil
    # The next item, or NULL if the queue is empty; never blocks on an empty queue.
    cdef PyObject* try_take(self) noexcept nogil
    # Refuse further pushes (except internal ones); take() returns NULL once empty.
    cdef int close(self) noexcept
    cdef bint closed(self) noexcept
    cdef Py_ssize_t size(self) noexcept
    # A snapshot of (pushes, signals, skipped, lazy_skipped, stall_wakeups).
    cdef int counters(self, int64_t* out) noexcept
    cdef Py_ssize_t _wake(self, Py_ssize_t n) noexcept nogil
    cdef PyObject* _pop(self) noexcept nogil
