# cython: language_level=3, embedsignature=True
"""ThreadPool: worker threads that run Tasks (the seed's ThreadPool)."""

cimport cython
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree
from cpython.object cimport Py_EQ, PyObject_RichCompareBool
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport int64_t

from _core.blocking_queue cimport BlockingQueue
from _core.channel cimport PollHook
from _core.event_loop cimport EventLoop, log_exception, running_loop
from _core.gil_share cimport worker_has_gil, worker_share_slice, worker_wants_gil
# MAX_BATCH: tasks a worker runs per GIL acquisition.  It takes them from the shared
# queue one at a time (so an idle worker can take the next one: no task waits behind a
# slow one while a worker is idle), and after this many goes round through take() once.
from _core.includes.consts cimport INITIAL_BUCKETS, MAX_BATCH
from _core.includes.sys cimport (
    cppnp_atomic_add, cppnp_atomic_cas, cppnp_atomic_load, cppnp_monotonic,
)
from _core.task cimport Task, WorkOwner

import threading

# ThreadPool._flags bits.
cdef enum:
    F_INIT_BUSY = 1     # __init__ is running
    F_INIT_DONE = 2
    F_USED = 4          # started, or a task was added: __init__ refuses from then on
    F_STARTED = 8
    F_STOPPING = 16     # set under _mutex: no task is accepted any more
    F_DISCARDING = 32   # stop(drain=False): queued tasks are discarded

# How a job ended (_finish_job).
cdef enum:
    J_DONE = 0          # ran (or raised)
    J_DISCARDED = 1     # stop(drain=False)
    J_CANCELLED = 2     # its connection was reset / force-closed before it ran

# What add_task does after handing a job over.
cdef enum:
    H_BACKLOG = 0       # waits behind its strand's running job: nothing to do
    H_QUEUED = 1        # in the queue: wake a worker
    H_RUN_HERE = 2      # single-thread mode: run it (the head of a new strand) now
    H_RUN_BACKLOG = 3   # single-thread mode: run the strand's waiting jobs (it is among them)
    # internal states of _hand_over_keyed
    H_STOPPING = 10
    H_NO_MEMORY = 11
    H_COMPARE = 12
    H_ALLOCATE = 13


class QueueFull(RuntimeError):
    """Raised by ThreadPool.add_task when a bounded queue (max_queue) is full."""


cdef inline int64_t _set_bits(int64_t* p, int64_t bits) noexcept nogil:
    """Atomically OR *bits* into *p*; returns the old value."""
    cdef int64_t old = cppnp_atomic_load(p)
    while not cppnp_atomic_cas(p, old, old | bits):
        old = cppnp_atomic_load(p)
    return old


cdef inline void _clear_bits(int64_t* p, int64_t bits) noexcept nogil:
    cdef int64_t old = cppnp_atomic_load(p)
    while not cppnp_atomic_cas(p, old, old & ~bits):
        old = cppnp_atomic_load(p)


cdef inline size_t _slot(Py_hash_t h, Py_ssize_t nbuckets) noexcept nogil:
    cdef size_t u = <size_t>h
    return (u ^ (u >> 17)) & <size_t>(nbuckets - 1)


cdef bint _holds(list items, PyObject* p) noexcept:
    """Is *p* (by identity) in *items*?  No allocation, no user code."""
    cdef Py_ssize_t i
    for i in range(len(items)):
        if <PyObject*>items[i] == p:
            return True
    return False


@cython.freelist(64)
@cython.auto_pickle(False)
@cython.final
cdef class _Strand:
    pass


@cython.freelist(256)
@cython.auto_pickle(False)
@cython.final
@cython.trashcan(True)      # a long backlog freed at once must not recurse through .next
cdef class _Job:
    pass


cdef inline WorkOwner _as_owner(object a):
    """*a* as a WorkOwner that counts work (a connection), else None."""
    if isinstance(a, WorkOwner) and (<WorkOwner>a).counts_work():
        return <WorkOwner>a
    return None


cdef WorkOwner _first_owner(tuple args):
    cdef object a
    cdef WorkOwner owner
    if args is None:
        return None
    for a in args:
        owner = _as_owner(a)
        if owner is not None:
            return owner
    return None


cdef _Job _make_job(object task, tuple args, object key, bint run_if_closed):
    cdef _Job job = _Job.__new__(_Job)
    cdef WorkOwner owner = None
    if isinstance(task, Task):
        if args:
            raise TypeError("add_task(Task) takes no extra arguments")
        job.task = <Task>task
        # The seed's EchoServer passes the connection as run2's param.
        owner = _as_owner((<Task>task).param)
        if owner is None:
            owner = _first_owner((<Task>task)._args)
    elif callable(task) or hasattr(task, "run0"):
        if not callable(task):
            task = task.run0
        job.fn = task
        job.args = args
        owner = _first_owner(args)
    else:
        raise TypeError("add_task() needs a Task, an IRun0 or a callable, got %r"
                        % (type(task).__name__,))
    # The ordering rule, in one place: work on an owner (a connection) is keyed by it
    # unless a key is given; key=False opts out.  An owner given as the key counts the job.
    if key is None:
        key = owner
    elif key is False:
        key = None
    job.key = key
    if key is not None and key is not owner:
        job.owner = _as_owner(key)
        if job.owner is None:
            job.owner = owner
    else:
        job.owner = owner
    job.run_if_closed = run_if_closed
    return job


@cython.auto_pickle(False)
@cython.final
cdef class _WakeWorkers(PollHook):
    cdef int before_poll(self) except -1:
        self.queue.notify(0)    # the fallback: the loop stopped before it polled
        return 0

    cdef int released(self, double now) noexcept nogil:
        return self.queue.notify_lazy(now)


@cython.auto_pickle(False)
cdef class ThreadPool:
    """Worker threads that run Tasks (the seed's ThreadPool).

    ``ThreadPool(n)`` starts *n* workers on start(); they wait on a blocking queue in the
    C core with the GIL released.  ``ThreadPool(0)`` is single-thread mode: add_task runs
    the task at once in the calling thread.

    Ordering: tasks added with the same *key* run one at a time in the order they were
    added (a strand); tasks with different keys, or no key, run in parallel.  A task that
    refers to a TcpConnection -- the param of ``Task(IRun2, msg, conn)``, else the first
    TcpConnection among its arguments -- gets that connection as its key unless one is
    given, so the replies to one connection go out in order; ``key=False`` opts out.

    Connection lifetime: a task keyed by, or referring to, a TcpConnection is counted on
    that connection from add_task until it finishes (ran, raised, or was discarded); the
    connection is not released while the count is above zero.  Such a task is discarded
    instead of run (counted in ``discarded`` and ``cancelled``) when its connection was
    reset by the peer, failed, or was force-closed before the task's turn came, unless it
    was added with ``run_if_closed=True``; a peer that only half-closed still gets every
    reply.

    ``__init__`` runs once: calling it again raises RuntimeError.
    """

    def __cinit__(self):
        # Usable state even if __init__ never runs (a ThreadPool.__new__ object behaves as
        # ThreadPool(0)).
        self._threads = []
        self._start_lock = threading.Lock()
        self._queue = BlockingQueue()
        self._wake = _WakeWorkers.__new__(_WakeWorkers)
        self._wake.queue = self._queue
        self._name = "cppnp-worker"
        self._per_worker = <int64_t*>PyMem_RawCalloc(1, sizeof(int64_t))
        self._nslots = 1
        self._buckets = <PyObject**>PyMem_RawCalloc(INITIAL_BUCKETS, sizeof(PyObject*))
        self._nbuckets = INITIAL_BUCKETS
        if self._per_worker == NULL or self._buckets == NULL:
            raise MemoryError()

    def __init__(self, int num_threads=0, *, str name="cppnp-worker", Py_ssize_t max_queue=0):
        """Create a pool of *num_threads* workers (0: run tasks in the caller).

        *max_queue* > 0 bounds the queued tasks: add_task then raises QueueFull instead of
        blocking (the loop thread must never block on its own workers).  Raises
        RuntimeError if the pool was already initialised, started or used.
        """
        cdef int64_t* per_worker
        cdef int64_t old
        if num_threads < 0:
            raise ValueError("num_threads must be >= 0, got %d" % num_threads)
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0, got %d" % max_queue)
        old = cppnp_atomic_load(&self._flags)
        while True:
            if old & (F_INIT_BUSY | F_INIT_DONE | F_USED):
                raise RuntimeError("ThreadPool.__init__ may run only once, before the pool "
                                   "is started or used")
            if cppnp_atomic_cas(&self._flags, old, old | F_INIT_BUSY):
                break
            old = cppnp_atomic_load(&self._flags)
        try:
            per_worker = <int64_t*>PyMem_RawCalloc(num_threads + 1, sizeof(int64_t))
            if per_worker == NULL:
                raise MemoryError()
            # No worker or caller can be using the old block: add_task and start refuse
            # while F_INIT_BUSY is set, and we refused above if the pool was ever used.
            PyMem_RawFree(self._per_worker)
            self._per_worker = per_worker
            self._nslots = num_threads + 1
            self._nthreads = num_threads
            self._name = name
            self._max_queue = max_queue
            _set_bits(&self._flags, F_INIT_DONE)
        finally:
            _clear_bits(&self._flags, F_INIT_BUSY)

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef PyObject* p
        cdef PyObject* nxt
        if self._buckets != NULL:
            for i in range(self._nbuckets):
                p = self._buckets[i]
                self._buckets[i] = NULL
                while p != NULL:
                    nxt = (<_Strand>p).next
                    (<_Strand>p).next = NULL
                    Py_DECREF(<object>p)        # the table's reference
                    p = nxt
            PyMem_RawFree(self._buckets)
        PyMem_RawFree(self._per_worker)

    def __repr__(self):
        return "<ThreadPool %s threads=%d queued=%d running=%d>" % (
            self._name, self._nthreads, self.queued, self.running)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        """Start the worker threads (the seed's ``Start``).  Idempotent; a stopped pool
        cannot be restarted (RuntimeError).

        Thread-safe.
        """
        cdef int64_t old
        with self._start_lock:
            old = cppnp_atomic_load(&self._flags)
            while True:
                if old & F_STOPPING:
                    raise RuntimeError("a stopped ThreadPool cannot be restarted")
                if old & F_INIT_BUSY:
                    raise RuntimeError("ThreadPool.__init__ is still running")
                if cppnp_atomic_cas(&self._flags, old, old | F_USED | F_STARTED):
                    break
                old = cppnp_atomic_load(&self._flags)
            if old & F_STARTED:
                return
            # Started under the lock: a concurrent stop() joins only started threads.
            for i in range(self._nthreads):
                t = threading.Thread(target=_worker_main, args=(self, i),
                                     name="%s-%d" % (self._name, i), daemon=True)
                self._threads.append(t)
                t.start()

    def stop(self, bint drain=True, timeout=None):
        """Stop the pool and join its workers; add_task raises RuntimeError afterwards.

        ``drain=True`` runs every task accepted before stop() (a pool that was never
        started runs them here, in the caller).  ``drain=False`` discards the queued tasks
        (counted in ``discarded``; their connections' counts drop) and lets running tasks
        finish.  Every task add_task accepted is run or discarded: none is lost.  Returns
        True if every worker exited within *timeout*.  Do not call it from a worker
        (RuntimeError).

        Thread-safe.
        """
        cdef _Job chain = None
        cdef _Job tail = None
        cdef _Job job
        cdef _Strand s
        cdef PyObject* p
        cdef PyObject* retired = NULL
        cdef Py_ssize_t i
        cdef bint started = False
        with self._start_lock:
            if threading.current_thread() in self._threads:
                raise RuntimeError("ThreadPool.stop() called from one of its own workers")
            with self._mutex:
                # From here on a keyed add_task sees F_STOPPING (it checks under _mutex) ...
                started = _set_bits(&self._flags, F_USED | F_STOPPING
                                    | (0 if drain else F_DISCARDING)) & F_STARTED
                if not drain:
                    # Detach every backlog into one chain, and unlink the strands nobody
                    # runs (single-thread mode, after an interrupted task).  Only pointers
                    # and references that stay above zero are touched here.
                    for i in range(self._nbuckets):
                        p = self._buckets[i]
                        while p != NULL:
                            s = <_Strand>p
                            p = s.next
                            if s.head is not None:
                                if tail is None:
                                    chain = s.head
                                else:
                                    tail.next = s.head
                                tail = s.tail
                                s.head = None
                                s.tail = None
                            if not s.running:
                                self._unlink_locked(s)
                                s.next = retired    # keeps the table's reference
                                retired = <PyObject*>s
                    s = None
            # ... and an unkeyed one is refused by the closed queue.
            self._queue.close()
        tail = None
        while chain is not None:            # iteratively: a backlog can be long
            job = chain
            chain = job.next
            job.next = None
            cppnp_atomic_add(&self._queued, -1)
            self._finish_job(job, J_DISCARDED)
        job = None
        while retired != NULL:
            s = <_Strand>retired
            retired = s.next
            s.next = NULL
            Py_DECREF(s)                    # the table's reference
        s = None
        if not drain or not started:
            # Whatever is queued and no worker will take: discard it, or run it here.
            while True:
                p = self._queue.try_take()
                if p == NULL:
                    break
                job = <_Job>p
                Py_DECREF(job)              # try_take() handed over the queue's reference
                if drain:
                    self._run_job(job, self._nthreads)
                else:
                    cppnp_atomic_add(&self._queued, -1)
                    self._finish_job(job, J_DISCARDED)
                self._advance(job, self._nthreads, not drain)
            job = None
            if drain and self._nthreads == 0:
                while True:                 # strands left without a runner: run them here
                    s = self._adopt_orphan()
                    if s is None:
                        break
                    self._run_strand_inline(s, None)
        ok = True
        for t in self._threads:
            t.join(timeout)
            ok = ok and not t.is_alive()
        return ok

    cdef _Strand _adopt_orphan(self):
        cdef _Strand s = None
        cdef PyObject* p
        cdef Py_ssize_t i
        with self._mutex:
            for i in range(self._nbuckets):
                p = self._buckets[i]
                while p != NULL and (<_Strand>p).running:
                    p = (<_Strand>p).next
                if p != NULL:
                    s = <_Strand>p
                    s.running = True
                    break
        return s

    # -- adding work --------------------------------------------------------------------

    def add_task(self, task, *args, key=None, bint run_if_closed=False):
        """Queue *task* (a Task, an IRun0, or a callable called with *args*) for a worker
        (the seed's ``AddTask``).  In single-thread mode it runs now, in the caller.

        Tasks sharing *key* (equal keys, as for a dict) run one at a time in order.
        Without a key, a task that refers to a TcpConnection (the param of
        ``Task(IRun2, msg, conn)``, else the first TcpConnection among its arguments) is
        keyed by it; ``key=False`` opts out of ordering (the task is still counted on the
        connection).  Such a task is discarded before it runs if its connection was reset
        or force-closed meanwhile, unless ``run_if_closed=True``.  Raises TypeError for a
        bad task or an unhashable key, QueueFull when a bounded queue is full and
        RuntimeError after stop(); then nothing was counted.

        Thread-safe.
        """
        cdef _Job job = _make_job(task, args, key, run_if_closed)
        cdef Py_hash_t h = 0
        cdef int how
        cdef EventLoop loop = None
        if job.key is not None:
            h = hash(job.key)       # user code, and TypeError: before anything is counted
        self._check_open()
        if self._nthreads and self._max_queue:
            if cppnp_atomic_add(&self._queued, 1) > self._max_queue:
                cppnp_atomic_add(&self._queued, -1)
                raise QueueFull("ThreadPool %r queue is full (max_queue=%d)"
                                % (self._name, self._max_queue))
        else:
            cppnp_atomic_add(&self._queued, 1)
        if job.owner is not None:
            job.owner.work_added()
        # Counted: hand the job over, or roll the counts back if that fails.
        try:
            if job.key is not None:
                how = self._hand_over_keyed(job, h)
            elif self._nthreads == 0:
                how = H_RUN_HERE
            else:
                loop = running_loop()
                how = self._queue.push(<PyObject*>job, loop is None, False)
                if how == 1:
                    raise RuntimeError("add_task() on a stopped ThreadPool")
                if how < 0:
                    raise MemoryError()
                how = H_QUEUED
        except BaseException:
            cppnp_atomic_add(&self._queued, -1)
            if job.owner is not None:
                job.owner.work_released()
            raise
        if how == H_QUEUED:
            if job.key is not None:
                self._wake_workers(False)
            elif loop is not None:
                # On a loop thread: wake workers once, just before the loop polls (with
                # the GIL released), so a batch of messages costs one wakeup -- of one
                # worker, more only if the queue stalls (BlockingQueue.notify_lazy).
                loop.add_release_hook(self._wake)
        elif how == H_RUN_HERE:
            if job.strand is None:
                self._run_job(job, 0)
            else:
                self._run_strand_inline(job.strand, job)
        elif how == H_RUN_BACKLOG:
            self._run_strand_inline(job.strand, None)

    cdef int _check_open(self) except -1:
        """Refuse work once stopping; mark the pool used (__init__ refuses from then on)."""
        cdef int64_t f = cppnp_atomic_load(&self._flags)
        while True:
            if f & F_STOPPING:
                raise RuntimeError("add_task() on a stopped ThreadPool")
            if f & F_USED:
                return 0
            if f & F_INIT_BUSY:
                raise RuntimeError("ThreadPool.__init__ is still running")
            if cppnp_atomic_cas(&self._flags, f, f | F_USED):
                return 0
            f = cppnp_atomic_load(&self._flags)

    cdef int _hand_over_keyed(self, _Job job, Py_hash_t h) except -1:
        """Hand a keyed job to its strand: behind the strand's running job, or as the head
        of a new strand (queued; in single-thread mode run by the caller).

        The key's __eq__ runs only between two takings of the lock (against one candidate
        with the same hash), and objects are allocated only outside it."""
        cdef object key = job.key
        cdef _Strand s, found, cand
        cdef _Strand matched = None     # a strand whose key proved equal to ours
        cdef _Strand fresh = None       # allocated in advance for a new strand
        cdef list unequal = None        # strands whose keys proved different
        cdef PyObject* p
        cdef int state, r
        cdef bint inline = self._nthreads == 0
        while True:
            found = None
            cand = None
            with self._mutex:
                if cppnp_atomic_load(&self._flags) & F_STOPPING:
                    state = H_STOPPING
                else:
                    p = self._buckets[_slot(h, self._nbuckets)]
                    while p != NULL:
                        s = <_Strand>p
                        if s.hash == h:
                            if s.key is key or s is matched:
                                found = s
                                break
                            if cand is None and (unequal is None or not _holds(unequal, p)):
                                cand = s
                        p = s.next
                    s = None
                    if found is not None:
                        if found.tail is None:
                            found.head = job
                        else:
                            found.tail.next = job
                        found.tail = job
                        if found.running:
                            state = H_BACKLOG
                        else:
                            # Single-thread mode: nobody runs this strand (a task of it
                            # was interrupted): the caller runs its backlog, then ours.
                            found.running = True
                            job.strand = found
                            state = H_RUN_BACKLOG
                    elif cand is not None:
                        state = H_COMPARE
                    elif fresh is None:
                        state = H_ALLOCATE
                    else:
                        fresh.key = key
                        fresh.hash = h
                        fresh.running = True
                        self._insert_locked(fresh)
                        job.strand = fresh
                        if inline:
                            state = H_RUN_HERE
                        else:
                            r = self._queue.push(<PyObject*>job, False, False)
                            if r == 0:
                                state = H_QUEUED
                            else:       # out of memory (the queue closes after STOPPING)
                                self._remove_locked(fresh)
                                job.strand = None
                                state = H_NO_MEMORY
            if state == H_COMPARE:
                if PyObject_RichCompareBool(cand.key, key, Py_EQ):
                    matched = cand
                else:
                    if unequal is None:
                        unequal = []
                    unequal.append(cand)
            elif state == H_ALLOCATE:
                fresh = _Strand.__new__(_Strand)
            elif state == H_STOPPING:
                raise RuntimeError("add_task() on a stopped ThreadPool")
            elif state == H_NO_MEMORY:
                raise MemoryError()
            else:
                return state

    cdef int _insert_locked(self, _Strand s) noexcept:
        """Under _mutex: add *s* to the table (which takes a reference)."""
        cdef PyObject** grown
        cdef PyObject* p
        cdef PyObject* q
        cdef Py_ssize_t n, j
        cdef size_t i
        if cppnp_atomic_load(&self._nstrands) >= self._nbuckets:
            n = self._nbuckets * 2
            grown = <PyObject**>PyMem_RawCalloc(n, sizeof(PyObject*))
            if grown != NULL:           # (if not, chains just get longer)
                for j in range(self._nbuckets):
                    p = self._buckets[j]
                    while p != NULL:
                        q = (<_Strand>p).next
                        i = _slot((<_Strand>p).hash, n)
                        (<_Strand>p).next = grown[i]
                        grown[i] = p
                        p = q
                PyMem_RawFree(self._buckets)
                self._buckets = grown
                self._nbuckets = n
        i = _slot(s.hash, self._nbuckets)
        Py_INCREF(s)
        s.next = self._buckets[i]
        self._buckets[i] = <PyObject*>s
        cppnp_atomic_add(&self._nstrands, 1)
        return 0

    cdef int _unlink_locked(self, _Strand s) noexcept:
        """Under _mutex: take *s* out of the table; its reference passes to the caller."""
        cdef PyObject** link = &self._buckets[_slot(s.hash, self._nbuckets)]
        while link[0] != NULL:
            if link[0] == <PyObject*>s:
                link[0] = s.next
                s.next = NULL
                cppnp_atomic_add(&self._nstrands, -1)
                return 1
            link = &(<_Strand>link[0]).next
        return 0

    cdef int _remove_locked(self, _Strand s) noexcept:
        """Under _mutex: take *s* out of the table and drop the table's reference (the
        caller holds another one, so nothing is freed under the lock)."""
        if self._unlink_locked(s):
            Py_DECREF(s)
        return 0

    cdef int _wake_workers(self, bint on_worker) except -1:
        cdef EventLoop loop = running_loop()
        if on_worker:
            # A worker passing its strand on: it takes the queue's next item itself when
            # it finishes, so only the items beyond that one need another worker.
            self._queue.notify(1)
        elif loop is None:
            self._queue.notify(0)
        else:
            loop.add_release_hook(self._wake)
        return 0

    # -- running ------------------------------------------------------------------------

    cdef int _run_job(self, _Job job, int index) except -1:
        cdef int64_t now_running, peak
        cppnp_atomic_add(&self._queued, -1)
        if cppnp_atomic_load(&self._flags) & F_DISCARDING:
            self._finish_job(job, J_DISCARDED)
            return 0
        if job.owner is not None and not job.run_if_closed and job.owner.work_cancelled():
            self._finish_job(job, J_CANCELLED)
            return 0
        now_running = cppnp_atomic_add(&self._running, 1)
        peak = cppnp_atomic_load(&self._peak_running)
        while now_running > peak and not cppnp_atomic_cas(&self._peak_running, peak,
                                                          now_running):
            peak = cppnp_atomic_load(&self._peak_running)
        try:
            if job.task is not None:
                job.task.do_task()
            else:
                job.fn(*job.args)
        except BaseException as exc:
            if self._nthreads == 0 and not isinstance(exc, Exception):
                cppnp_atomic_add(&self._failed, 1)
                raise       # Ctrl-C in an inline task stops the caller (the loop), as it should
            # A worker lives on: log it (never raising), then count it -- in that order, so
            # whoever sees ``failed`` go up also finds the log record.
            log_exception("Exception in task %r",
                          job.task if job.task is not None else job.fn)
            cppnp_atomic_add(&self._failed, 1)
        finally:
            cppnp_atomic_add(&self._running, -1)
            if index < self._nslots:
                cppnp_atomic_add(&self._per_worker[index], 1)
            self._finish_job(job, J_DONE)
        return 0

    cdef int _count_batch(self, int64_t ran) noexcept nogil:
        cdef int64_t peak
        cppnp_atomic_add(&self._batches, 1)
        cppnp_atomic_add(&self._batch_jobs, ran)
        peak = cppnp_atomic_load(&self._batch_max)
        while ran > peak and not cppnp_atomic_cas(&self._batch_max, peak, ran):
            peak = cppnp_atomic_load(&self._batch_max)
        return 0

    cdef int _finish_job(self, _Job job, int how) except -1:
        if how == J_DONE:
            cppnp_atomic_add(&self._completed, 1)
        else:
            cppnp_atomic_add(&self._discarded, 1)
            if how == J_CANCELLED:
                cppnp_atomic_add(&self._cancelled, 1)
        if job.owner is not None:
            job.owner.work_released()
        return 0

    cdef int _advance(self, _Job job, int index, bint discard) except -1:
        """After *job* -- queued as its strand's head -- ran or was discarded, pass the
        strand on (a job that could not be queued is run, or discarded, right here)."""
        while job is not None and job.strand is not None:
            job = self._strand_next(job.strand, index < self._nthreads)
            if job is not None:
                if discard:
                    cppnp_atomic_add(&self._queued, -1)
                    self._finish_job(job, J_DISCARDED)
                else:
                    self._run_job(job, index)
        return 0

    cdef _Job _strand_next(self, _Strand s, bint on_worker):
        """Pool mode: queue the next job of *s* (its new head), or retire *s* if none waits.
        Returns that job only if it could not be queued (out of memory)."""
        cdef _Job nxt
        cdef int r = 0
        with self._mutex:
            nxt = self._take_head_locked(s)
            if nxt is not None:
                # Internal: accepted after close() too -- the caller (a worker, or stop())
                # goes on taking from the queue until it is empty.
                r = self._queue.push(<PyObject*>nxt, False, True)
        if nxt is None:
            return None
        if r == 0:
            self._wake_workers(on_worker)
            return None
        return nxt

    cdef _Job _strand_pop(self, _Strand s, bint orphan):
        """Single-thread mode: the next job of *s* for its runner, or None after retiring
        *s*.  With *orphan* (the runner leaves on KeyboardInterrupt/SystemExit): retire *s*
        if nothing waits, else leave its jobs to the next add_task with this key (or to
        stop()), and return None."""
        cdef _Job nxt = None
        with self._mutex:
            if orphan and s.head is not None:
                s.running = False       # left to the next add_task with its key
            else:
                nxt = self._take_head_locked(s)
        return nxt

    cdef _Job _take_head_locked(self, _Strand s):
        """Under _mutex: the strand rule's one step.  Make the next waiting job of *s* its
        running head and return it, or retire *s* (nothing waits) and return None."""
        cdef _Job nxt = s.head
        if nxt is None:
            s.running = False
            self._remove_locked(s)
            return None
        s.head = nxt.next
        if s.head is None:
            s.tail = None
        nxt.next = None
        nxt.strand = s
        return nxt

    cdef int _run_strand_inline(self, _Strand s, _Job first) except -1:
        """Single-thread mode: run *first* (if given) and then every job that waits in *s*,
        in the caller; an interrupted task leaves *s* retired or runnable, never wedged."""
        cdef _Job job = first
        cdef bint finished = False
        try:
            if job is None:
                job = self._strand_pop(s, False)
            while job is not None:
                self._run_job(job, 0)
                job = self._strand_pop(s, False)
            finished = True
        finally:
            if not finished:
                self._strand_pop(s, True)
        return 0

    # -- introspection ------------------------------------------------------------------

    @property
    def num_threads(self):
        """The number of worker threads (0: single-thread mode).

        Thread-safe.
        """
        return self._nthreads

    @property
    def name(self):
        """The pool's name (worker threads are named ``<name>-<i>``).

        Thread-safe.
        """
        return self._name

    @property
    def queued(self):
        """Tasks accepted and not started yet (including those waiting for their key).

        Thread-safe.
        """
        return cppnp_atomic_load(&self._queued)

    @property
    def running(self):
        """Tasks running right now.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._running)

    @property
    def completed(self):
        """Tasks that ran (including those that raised).

        Thread-safe.
        """
        return cppnp_atomic_load(&self._completed)

    @property
    def failed(self):
        """Tasks that raised (logged on the ``cppnp`` logger).

        Thread-safe.
        """
        return cppnp_atomic_load(&self._failed)

    @property
    def discarded(self):
        """Tasks dropped without running: by stop(drain=False), or because their
        connection was reset or force-closed first (those are also in ``cancelled``).

        Thread-safe.
        """
        return cppnp_atomic_load(&self._discarded)

    @property
    def cancelled(self):
        """Tasks discarded because their connection was reset by the peer, failed or was
        force-closed before they ran (see add_task's ``run_if_closed``).

        Thread-safe.
        """
        return cppnp_atomic_load(&self._cancelled)

    @property
    def peak_running(self):
        """The most tasks seen running at the same time.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._peak_running)

    @property
    def threads(self):
        """The worker threads.

        Thread-safe.
        """
        return list(self._threads)

    def stats(self):
        """Return a dict of counters (a snapshot), with ``strands`` (keys with tasks queued
        or running) and ``per_worker``: tasks run by each worker (``caller``: in the
        caller's thread).

        The hand-off to the workers: ``handoffs`` (tasks put on the shared queue; a task
        waiting behind its key's running task is queued when its turn comes),
        ``wakeups_sent`` (parked workers woken), ``wakeups_skipped`` (wakeup calls that
        found tasks queued but woke nobody: a worker was already awake for them, or all
        were busy and take the tasks when they finish), ``wakeups_lazy_skipped`` (the part
        of those made by a loop thread, which wakes one worker for a pass's tasks),
        ``stall_wakeups`` (times a loop woke more workers because the queue had stayed
        non-empty for 1 ms: the awake ones were not keeping up), ``idle_workers`` (parked
        right now), ``batches`` (a worker took the GIL and ran tasks), ``batch_tasks`` (tasks run in
        them) and ``batch_max`` (the most in one).

        Thread-safe.
        """
        cdef int i
        cdef int64_t q[6]
        self._queue.counters(q)
        per_worker = {}
        threads = list(self._threads)
        for i in range(self._nthreads):
            name = threads[i].name if i < len(threads) else "%s-%d" % (self._name, i)
            per_worker[name] = cppnp_atomic_load(&self._per_worker[i])
        if self._nthreads == 0 or cppnp_atomic_load(&self._per_worker[self._nthreads]):
            per_worker["caller"] = cppnp_atomic_load(&self._per_worker[self._nthreads])
        return {
            "threads": self._nthreads,
            "queued": self.queued,
            "running": self.running,
            "completed": self.completed,
            "failed": self.failed,
            "discarded": self.discarded,
            "cancelled": self.cancelled,
            "peak_running": self.peak_running,
            "strands": cppnp_atomic_load(&self._nstrands),
            "per_worker": per_worker,
            "handoffs": q[0],
            "wakeups_sent": q[1],
            "wakeups_skipped": q[2] + q[3],
            "wakeups_lazy_skipped": q[3],
            "stall_wakeups": q[4],
            "idle_workers": q[5],
            "batches": cppnp_atomic_load(&self._batches),
            "batch_tasks": cppnp_atomic_load(&self._batch_jobs),
            "batch_max": cppnp_atomic_load(&self._batch_max),
        }

    # -- seed-compatible names: same objects as the snake_case methods --
    Start = start
    AddTask = add_task


def _worker_main(ThreadPool pool, int index):
    """A worker: wait (GIL released) for a job, then run jobs while the queue has some."""
    cdef BlockingQueue queue = pool._queue
    queue.add_worker(1)
    try:
        _work(pool, queue, index)
    finally:
        queue.add_worker(-1)


cdef int _work(ThreadPool pool, BlockingQueue queue, int index) except -1:
    cdef PyObject* p
    cdef double slice_start
    cdef int ran
    cdef bint counted
    cdef _Job job
    while True:
        with nogil:
            p = queue.take()
            counted = worker_wants_gil()    # gil_share.pxd
        worker_has_gil(counted)
        if p == NULL:
            return 0
        slice_start = cppnp_monotonic()
        ran = 0
        while p != NULL:
            job = <_Job>p
            Py_DECREF(job)          # take() handed over the queue's reference
            p = NULL
            pool._run_job(job, index)
            pool._advance(job, index, False)
            job = None      # an idle worker must not keep its last connection alive
            ran += 1
            if ran == MAX_BATCH:
                break       # round through take(), which releases the GIL
            worker_share_slice(&slice_start)   # a waiting loop thread gets the GIL
            # One at a time from the shared queue: what we do not take yet, an idle worker
            # can (woken when the queue stalls: BlockingQueue.notify_lazy).
            p = queue.try_take()
        pool._count_batch(ran)
