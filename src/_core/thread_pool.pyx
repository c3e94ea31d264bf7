# cython: language_level=3, embedsignature=True
"""ThreadPool: worker threads that run Tasks (the seed's ThreadPool)."""

cimport cython
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree
from cpython.ref cimport Py_DECREF, PyObject
from libc.stdint cimport int64_t

from _core.blocking_queue cimport BlockingQueue
from _core.event_loop cimport (
    EventLoop, log_exception, loop_gil_flag, running_loop, worker_gil_flag,
)
from _core.includes.sys cimport (
    cppnp_atomic_add, cppnp_atomic_cas, cppnp_atomic_load, cppnp_monotonic,
)
from _core.task cimport Task
from _core.tcp_connection cimport TcpConnection

import collections
import threading

cdef extern from "<sched.h>" nogil:
    int sched_yield()


# Tasks a worker takes per wakeup (one GIL acquisition runs them all).
DEF MAX_BATCH = 16
# A worker that holds the GIL steps aside for a waiting loop thread only after this many
# seconds: the loop waits at most about this long instead of a whole switch interval
# (5 ms); together with the loop's shorter slice (event_loop.pyx) the workers, which consume
# what the loop produces, get the larger share of a contended GIL.
DEF WORKER_SLICE = 0.001


class QueueFull(RuntimeError):
    """Raised by ThreadPool.add_task when a bounded queue (max_queue) is full."""


@cython.freelist(256)
@cython.auto_pickle(False)
@cython.final
cdef class _Job:
    pass


cdef _Job _make_job(object task, tuple args, object key):
    cdef _Job job = _Job.__new__(_Job)
    cdef object param
    if isinstance(task, Task):
        if args:
            raise TypeError("add_task(Task) takes no extra arguments")
        job.task = <Task>task
        # The seed's EchoServer passes the connection as run2's param.
        param = (<Task>task).param
    elif callable(task) or hasattr(task, "run0"):
        if not callable(task):
            task = task.run0
        job.fn = task
        job.args = args
        param = None
    else:
        raise TypeError("add_task() needs a Task, an IRun0 or a callable, got %r"
                        % (type(task).__name__,))
    if key is None and isinstance(param, TcpConnection):
        key = param
    job.key = key
    if isinstance(key, TcpConnection):
        job.conn = <TcpConnection>key
    elif isinstance(param, TcpConnection):
        job.conn = <TcpConnection>param
    return job


@cython.auto_pickle(False)
cdef class ThreadPool:
    """Worker threads that run Tasks (the seed's ThreadPool).

    ``ThreadPool(n)`` starts *n* workers on start(); they wait on a blocking queue in the
    C core with the GIL released.  ``ThreadPool(0)`` is single-thread mode: add_task runs
    the task at once in the calling thread.

    Ordering: tasks added with the same *key* run one at a time in the order they were
    added (a strand); tasks with different keys, or no key, run in parallel.  A task whose
    IRun2 *param* is a TcpConnection gets that connection as its key unless one is given.

    Connection lifetime: a task keyed by (or whose param is) a TcpConnection is counted
    on that connection from add_task until it finishes (ran, raised, or was discarded);
    the connection is not released while the count is above zero.
    """

    def __cinit__(self):
        # Usable state even if __init__ never runs (a ThreadPool.__new__ object behaves as
        # ThreadPool(0)).
        self._threads = []
        self._strands = {}
        self._start_lock = threading.Lock()
        self._queue = BlockingQueue()
        self.name = "cppnp-worker"
        self._per_worker = <int64_t*>PyMem_RawCalloc(1, sizeof(int64_t))
        if self._per_worker == NULL:
            raise MemoryError()

    def __init__(self, int num_threads=0, *, str name="cppnp-worker", Py_ssize_t max_queue=0):
        """Create a pool of *num_threads* workers (0: run tasks in the caller).

        *max_queue* > 0 bounds the queued tasks: add_task then raises QueueFull instead of
        blocking (the loop thread must never block on its own workers).
        """
        if num_threads < 0:
            raise ValueError("num_threads must be >= 0, got %d" % num_threads)
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0, got %d" % max_queue)
        self.num_threads = num_threads
        self.name = name
        self._max_queue = max_queue
        per_worker = <int64_t*>PyMem_RawCalloc(num_threads + 1, sizeof(int64_t))
        if per_worker == NULL:
            raise MemoryError()
        PyMem_RawFree(self._per_worker)
        self._per_worker = per_worker

    def __dealloc__(self):
        PyMem_RawFree(self._per_worker)

    def __repr__(self):
        return "<ThreadPool %s threads=%d queued=%d running=%d>" % (
            self.name, self.num_threads, self.queued, self.running)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        """Start the worker threads (the seed's ``Start``).  Idempotent.  Thread-safe."""
        with self._start_lock:
            if self._stopping:
                raise RuntimeError("a stopped ThreadPool cannot be restarted")
            if self._started:
                return
            self._started = True
            for i in range(self.num_threads):
                t = threading.Thread(target=_worker_main, args=(self, i),
                                     name="%s-%d" % (self.name, i), daemon=True)
                self._threads.append(t)
        for t in self._threads:
            t.start()

    def stop(self, bint drain=True, timeout=None):
        """Stop the pool and join its workers; add_task raises afterwards.

        ``drain=True`` runs every queued task first.  ``drain=False`` discards queued tasks
        (counted in ``discarded``; their connections' counts drop) and lets running tasks
        finish.  Returns True if every worker exited within *timeout*.  Thread-safe; do not
        call it from a worker.
        """
        cdef list jobs
        cdef _Job job
        with self._start_lock:
            if threading.current_thread() in self._threads:
                raise RuntimeError("ThreadPool.stop() called from one of its own workers")
            self._stopping = True
            if not drain:
                self._discarding = True
        if not drain:
            jobs = self._queue.drain()
            with self._mutex:
                for backlog in self._strands.values():
                    jobs.extend(backlog)
                self._strands.clear()
            for job in jobs:
                cppnp_atomic_add(&self._queued, -1)
                self._finish_job(job, True)
        elif not self._started:
            # Never started: run what was queued right here (strand successors are queued
            # as their predecessors finish, so drain until nothing is left).
            while True:
                jobs = self._queue.drain()
                if not jobs:
                    break
                for job in jobs:
                    self._run_job(job, self.num_threads)
        self._queue.close()
        ok = True
        for t in self._threads:
            t.join(timeout)
            ok = ok and not t.is_alive()
        return ok

    # -- adding work --------------------------------------------------------------------

    def add_task(self, task, *args, key=None):
        """Queue *task* (a Task, an IRun0, or a callable called with *args*) for a worker
        (the seed's ``AddTask``).  In single-thread mode it runs now, in the caller.

        Tasks sharing *key* run one at a time in order.  Raises QueueFull when a bounded
        queue is full and RuntimeError after stop().  Thread-safe.
        """
        cdef _Job job = _make_job(task, args, key)
        if self._stopping:
            raise RuntimeError("add_task() on a stopped ThreadPool")
        if self.num_threads == 0:
            if job.conn is not None:
                job.conn.task_started()
            cppnp_atomic_add(&self._queued, 1)
            self._run_inline(job)
            return
        if self._max_queue:
            if cppnp_atomic_add(&self._queued, 1) > self._max_queue:
                cppnp_atomic_add(&self._queued, -1)
                raise QueueFull("ThreadPool %r queue is full (max_queue=%d)"
                                % (self.name, self._max_queue))
        else:
            cppnp_atomic_add(&self._queued, 1)
        if job.conn is not None:
            job.conn.task_started()
        self._submit(job)

    cdef int _run_inline(self, _Job job) except -1:
        """Single-thread mode: run now in the caller, keeping the strand rule if another
        thread is running a task with the same key (then the task joins its backlog and
        that thread runs it next)."""
        if job.key is not None:
            with self._mutex:
                backlog = self._strands.get(job.key)
                if backlog is not None:
                    backlog.append(job)
                    return 0
                self._strands[job.key] = collections.deque()
        while job is not None:
            self._run_job(job, 0)
            if job.key is None:
                return 0
            with self._mutex:
                backlog = self._strands.get(job.key)
                if backlog:
                    job = backlog.popleft()
                else:
                    self._strands.pop(job.key, None)
                    job = None
        return 0

    cdef int _submit(self, _Job job) except -1:
        if job.key is None:
            return self._put(job)
        with self._mutex:
            backlog = self._strands.get(job.key)
            if backlog is not None:
                backlog.append(job)     # runs when the strand's current task finishes
                return 0
            self._strands[job.key] = collections.deque()
        return self._put(job)

    cdef int _put(self, _Job job) except -1:
        cdef EventLoop loop = running_loop()
        if loop is None:
            self._queue.put(job, True)
        else:
            # On a loop thread: wake workers once, just before the loop polls, so a
            # batch of messages costs one wakeup instead of one per task.
            self._queue.put(job, False)
            loop.defer_notify(self._queue)
        return 0

    # -- running ------------------------------------------------------------------------

    cdef int _run_job(self, _Job job, int index) except -1:
        cdef int64_t now_running, peak
        cppnp_atomic_add(&self._queued, -1)
        if self._discarding:
            self._finish_job(job, True)
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
            cppnp_atomic_add(&self._failed, 1)
            if self.num_threads == 0 and not isinstance(exc, Exception):
                raise       # Ctrl-C in an inline task stops the caller (the loop), as it should
            # A worker lives on: log it (never raising) and count it.
            log_exception("Exception in task %r",
                          job.task if job.task is not None else job.fn)
        finally:
            cppnp_atomic_add(&self._running, -1)
            self._per_worker[index] += 1
            self._finish_job(job, False)
        return 0

    cdef int _finish_job(self, _Job job, bint discarded) except -1:
        if discarded:
            cppnp_atomic_add(&self._discarded, 1)
        else:
            cppnp_atomic_add(&self._completed, 1)
        if job.conn is not None:
            job.conn.task_finished()
        if job.key is not None and not discarded and self.num_threads:
            self._strand_next(job.key)
        return 0

    cdef int _strand_next(self, object key) except -1:
        cdef _Job nxt = None
        with self._mutex:
            backlog = self._strands.get(key)
            if backlog is None:
                return 0
            if backlog:
                nxt = backlog.popleft()
            else:
                del self._strands[key]
        if nxt is not None:
            self._put(nxt)
        return 0

    # -- introspection ------------------------------------------------------------------

    @property
    def queued(self):
        """Tasks accepted and not started yet."""
        return cppnp_atomic_load(&self._queued)

    @property
    def running(self):
        """Tasks running right now."""
        return cppnp_atomic_load(&self._running)

    @property
    def completed(self):
        """Tasks that ran (including those that raised)."""
        return cppnp_atomic_load(&self._completed)

    @property
    def failed(self):
        """Tasks that raised (logged on the ``cppnp`` logger)."""
        return cppnp_atomic_load(&self._failed)

    @property
    def discarded(self):
        """Tasks dropped by stop(drain=False)."""
        return cppnp_atomic_load(&self._discarded)

    @property
    def peak_running(self):
        """The most tasks seen running at the same time."""
        return cppnp_atomic_load(&self._peak_running)

    @property
    def threads(self):
        """The worker threads."""
        return list(self._threads)

    def stats(self):
        """Return a dict of counters, with ``per_worker``: tasks run by each worker."""
        return {
            "threads": self.num_threads,
            "queued": self.queued,
            "running": self.running,
            "completed": self.completed,
            "failed": self.failed,
            "discarded": self.discarded,
            "peak_running": self.peak_running,
            "strands": len(self._strands),
            "per_worker": {
                (self._threads[i].name if i < len(self._threads) else "caller"):
                    self._per_worker[i]
                for i in range(self.num_threads if self.num_threads else 1)
            },
        }

    # -- seed-compatible names: same objects as the snake_case methods --
    Start = start
    AddTask = add_task


cdef inline void _yield_to_loop(int64_t* flag) noexcept nogil:
    # A loop thread is waiting for the GIL: let it take the GIL before we do (bounded,
    # in case it waits for a GIL held by some other thread).
    cdef int spins = 0
    while cppnp_atomic_load(flag) > 0 and spins < 1000:
        sched_yield()
        spins += 1


def _worker_main(ThreadPool pool, int index):
    """A worker: wait (GIL released) for a batch of jobs, run them, repeat."""
    cdef PyObject* items[MAX_BATCH]
    cdef Py_ssize_t n, i
    cdef BlockingQueue queue = pool._queue
    cdef Py_ssize_t share = pool.num_threads
    cdef int64_t* flag = loop_gil_flag()
    cdef int64_t* wanting = worker_gil_flag()
    cdef double slice_start
    cdef _Job job
    while True:
        with nogil:
            n = queue.take(items, MAX_BATCH, share)
            _yield_to_loop(flag)
            cppnp_atomic_add(wanting, 1)    # the loop hands the GIL over after its slice
        cppnp_atomic_add(wanting, -1)
        if n == 0:
            return
        slice_start = cppnp_monotonic()
        for i in range(n):
            job = <_Job>items[i]
            Py_DECREF(job)          # take() handed over the queue's reference
            items[i] = NULL
            pool._run_job(job, index)
            if cppnp_atomic_load(flag) > 0 and cppnp_monotonic() - slice_start >= WORKER_SLICE:
                with nogil:         # hand the GIL to the waiting loop thread
                    _yield_to_loop(flag)
                    cppnp_atomic_add(wanting, 1)
                cppnp_atomic_add(wanting, -1)
                slice_start = cppnp_monotonic()
        job = None      # an idle worker must not keep its last connection alive
