# BlockingQueue: the seed's BlockingQueue in C -- a ring of object pointers guarded by a
# pthread mutex, with idle workers parked one by one (a futex word each, on the worker's
# stack: Parker) instead of on a condition variable.
#
# Lock rule: no code path holds _mutex while it needs the GIL, runs Python code or
# allocates a Python object (critical sections touch only C data and reference counts that
# cannot reach zero), so taking _mutex while holding the GIL -- or another core lock --
# cannot deadlock.  References: push() increfs what it stores; take()/try_take() hand the
# reference over to the caller.
#
# Parking: a worker that finds the queue empty puts its Parker on the idle stack (under
# _mutex) and sleeps on it (without _mutex).  A wakeup takes parkers off the stack under
# _mutex -- so _nidle is exact: parked workers nobody has woken -- and unparks them after
# unlocking, so a woken worker never runs into the waker's mutex (with a condition variable
# signalled under the mutex, every wakeup on a shared CPU cost a futex wait and wake more).
#
# Wakeups: a push with notify, or notify() (threads that are not a loop), wakes as many
# idle workers as there are queued items.  A loop thread wakes lazily instead
# (notify_lazy(), called with the GIL released just before it polls): one worker when none
# is awake, and more -- one per queued item -- only when the queue has stayed non-empty
# for WAKE_STALL seconds (counted from the first such call that saw it non-empty): the
# awake workers are not keeping up (a slow task, or real parallel work).  The loop
# rechecks every WAKE_RECHECK_MS while items wait and a worker is idle.  Workers take
# items one at a time and park only when the queue is empty.  So no queued task waits
# behind a busy worker for longer than WAKE_STALL (plus one recheck) while another worker
# is idle, and a batch of instant tasks wakes one worker instead of all of them.
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)


cdef extern from *:
    """
    #include <linux/futex.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <stdint.h>
    /* A parked worker: its futex word (0 parked, 1 woken) and the idle stack's link. */
    typedef struct cppnp_parker {
        int32_t woken;
        struct cppnp_parker *next;
    } cppnp_parker;
    /* Sleep until unparked (EINTR and spurious wakeups just look again). */
    static void cppnp_park(cppnp_parker *p) {
        while (__atomic_load_n(&p->woken, __ATOMIC_ACQUIRE) == 0)
            syscall(SYS_futex, &p->woken, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    }
    /* Wake a parker taken off the idle stack.  After the store the parker may return and
       its frame be reused: the futex wake on a stale address can only wake another
       parker spuriously, which looks again. */
    static void cppnp_unpark(cppnp_parker *p) {
        __atomic_store_n(&p->woken, 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, &p->woken, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    """
    ctypedef struct Parker "cppnp_parker":
        int32_t woken
        Parker* next
    void park "cppnp_park"(Parker* p) nogil
    void unpark "cppnp_unpark"(Parker* p) nogil


cdef class BlockingQueue:
    cdef:
        pthread_mutex_t _mutex
        PyObject** _ring
        Py_ssize_t _cap
        Py_ssize_t _head
        Py_ssize_t _count
        Parker* _idle           # parked workers nobody has woken (a stack)
        Py_ssize_t _nidle       # how many
        Py_ssize_t _workers     # threads that consume the queue (add_worker)
        # Monotonic: when a loop's notify_lazy() first saw the queue non-empty since it
        # was last empty (0: not seen yet), or the last stall wakeup.  Set by the loops'
        # wakeup, not by push(): no clock read on the push path.
        double _nonempty_since
        bint _closed
        bint _ready
        # Counters (under _mutex): items pushed, workers woken, wakeup calls (a push with
        # notify, or notify()) that found items queued but woke nobody (no worker was
        # idle: the busy ones take the items when they finish), notify_lazy() calls that
        # left the items to an awake worker, and stall wakeups.
        int64_t _pushes
        int64_t _signals
        int64_t _skipped
        int64_t _lazy_skipped
        int64_t _stall_wakeups

    # Append *item* (never blocks, never raises, no Python allocation: callable under
    # another core lock).  Returns 0 when stored, 1 when refused because the queue is
    # closed (unless *internal*: a hand-off by a thread that consumes the queue until it
    # is empty, e.g. a worker passing on a strand), -1 when out of memory.
    # notify=False leaves waking a worker to notify() / notify_lazy().
    cdef int push(self, PyObject* item, bint notify, bint internal) noexcept
    # Wake as many idle workers as there are items beyond the first *keep* (after pushes
    # with notify=False; a worker that will take the next item itself keeps 1).
    cdef int notify(self, Py_ssize_t keep) noexcept
    # The loop's wakeup (call without the GIL, just before polling; *now* is monotonic):
    # wake one worker if items are queued and no worker is awake, or one per queued item
    # if the queue has been non-empty for WAKE_STALL.  Returns the milliseconds within
    # which the caller must call again (items wait and a worker is idle), or -1.
    cdef int notify_lazy(self, double now) noexcept nogil
    # A consuming thread starts (+1) / stops (-1): workers count as awake unless parked.
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
    # A snapshot of (pushes, signals, skipped, lazy_skipped, stall_wakeups, idle workers).
    cdef int counters(self, int64_t* out) noexcept
    # Under _mutex: take up to n parkers off the idle stack (counted); returns the chain,
    # to pass to _unpark_all() once _mutex is released.
    cdef Parker* _detach(self, Py_ssize_t n) noexcept nogil
    cdef PyObject* _pop(self) noexcept nogil


# Unpark a chain from _detach() (after releasing the queue's mutex).
cdef void _unpark_all(Parker* chain) noexcept nogil
