# ThreadPool: worker threads running Tasks from a BlockingQueue (the seed's ThreadPool).
#
# Strands.  Tasks added with the same key (equal keys: hash and ==, as for dict keys) run
# one at a time in the order they were added.  Each active key has a _Strand in a C hash
# table (_buckets): its head job is queued or running, the others wait in its backlog.
# The table and every backlog are guarded by _mutex, a core lock: under it the pool only
# touches C data and moves references that cannot reach zero -- no user code (a key's
# __hash__/__eq__ runs before the lock is taken, or between two takings of it), no Python
# allocation (which could run the GC and with it a finalizer), so a finalizer or a key that
# calls add_task cannot deadlock, and the design holds without a GIL.
#
# Shutdown.  _flags (atomic) holds the lifecycle bits.  STOPPING is set under _mutex, so a
# keyed add_task either hands its job over before stop() looks (then it runs or is
# discarded and counted) or sees STOPPING and raises; an unkeyed one is refused by the
# closed queue.  Nothing in between.
cimport cython
from libc.stdint cimport int64_t
from cpython.ref cimport PyObject

from _core.blocking_queue cimport BlockingQueue
from _core.channel cimport PollHook
from _core.task cimport Task, WorkOwner


cdef class _Strand:
    cdef:
        object key
        Py_hash_t hash
        _Job head               # waiting jobs, oldest first, linked through _Job.next
        _Job tail
        PyObject* next          # next strand in the same bucket (the table owns a reference)
        bint running            # its head job is queued or running (else: orphaned backlog)


cdef class _Job:
    cdef:
        Task task               # what to call: task.do_task() ...
        object fn               # ... or fn(*args)
        tuple args
        object key              # strand key, or None
        WorkOwner owner         # what counts this job (its connection), or None
        bint run_if_closed      # run even if the owner was reset / force-closed meanwhile
        _Strand strand          # set when the job becomes its strand's running head
        _Job next               # in a strand's backlog


# Wakes the pool's workers just before the loop polls (EventLoop.add_before_poll).
cdef class _WakeWorkers(PollHook):
    cdef BlockingQueue queue


cdef class ThreadPool:
    cdef:
        int _nthreads
        str _name
        Py_ssize_t _max_queue
        BlockingQueue _queue
        _WakeWorkers _wake      # the before-poll hook that notifies _queue
        list _threads
        object _start_lock      # serialises __init__/start()/stop() (a Python lock)
        cython.pymutex _mutex   # the core lock: the strand table and backlogs
        PyObject** _buckets     # strand table: chains of _Strand (see above)
        Py_ssize_t _nbuckets    # a power of two
        int64_t _flags          # atomic: lifecycle bits (F_* in thread_pool.pyx)
        int64_t _nstrands       # atomic (written under _mutex)
        int64_t _queued         # atomic: accepted and not yet started (incl. strand backlog)
        int64_t _running        # atomic
        int64_t _completed      # atomic
        int64_t _failed         # atomic
        int64_t _discarded      # atomic
        int64_t _cancelled      # atomic: discarded because the connection was reset/closed
        int64_t _peak_running   # atomic
        int64_t _batches        # atomic: worker GIL acquisitions that ran at least one job
        int64_t _batch_jobs     # atomic: jobs run (or discarded) in those batches
        int64_t _batch_max      # atomic: the most jobs one batch ran
        int64_t* _per_worker    # atomic slots: tasks run by each worker (+1: callers)
        int _nslots

    cdef int _check_open(self) except -1
    cdef int _count_batch(self, int64_t ran) noexcept nogil
    cdef int _hand_over_keyed(self, _Job job, Py_hash_t h) except -1
    cdef int _insert_locked(self, _Strand s) noexcept
    cdef int _unlink_locked(self, _Strand s) noexcept
    cdef int _remove_locked(self, _Strand s) noexcept
    cdef _Strand _adopt_orphan(self)
    cdef int _wake_workers(self, bint on_worker) except -1
    cdef int _run_job(self, _Job job, int index) except -1
    cdef int _finish_job(self, _Job job, int how) except -1
    cdef int _advance(self, _Job job, int index, bint discard) except -1
    cdef _Job _strand_next(self, _Strand s, bint on_worker)
    cdef _Job _strand_pop(self, _Strand s, bint orphan)
    cdef _Job _take_head_locked(self, _Strand s)
    cdef int _run_strand_inline(self, _Strand s, _Job first) except -1
