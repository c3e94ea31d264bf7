# ThreadPool: worker threads running Tasks from a BlockingQueue (the seed's ThreadPool).
cimport cython
from libc.stdint cimport int64_t

from _core.blocking_queue cimport BlockingQueue
from _core.task cimport Task
from _core.tcp_connection cimport TcpConnection


cdef class _Job:
    cdef:
        Task task               # what to call: task.do_task() ...
        object fn               # ... or fn(*args)
        tuple args
        object key              # strand key, or None
        TcpConnection conn      # connection whose lifetime counts this job, or None


cdef class ThreadPool:
    cdef:
        readonly int num_threads
        readonly str name
        Py_ssize_t _max_queue
        BlockingQueue _queue
        list _threads
        cython.pymutex _mutex   # guards _strands (a core lock, not the GIL)
        object _start_lock      # serialises start()/stop()
        dict _strands           # key -> deque of jobs waiting behind the running one
        bint _started
        bint _stopping
        bint _discarding
        int64_t _queued         # atomic: accepted and not yet started (incl. strand backlog)
        int64_t _running        # atomic
        int64_t _completed      # atomic
        int64_t _failed         # atomic
        int64_t _discarded      # atomic
        int64_t _peak_running   # atomic
        int64_t* _per_worker    # tasks run by each worker (each slot written by one thread)

    cdef int _submit(self, _Job job) except -1
    cdef int _run_inline(self, _Job job) except -1
    cdef int _put(self, _Job job) except -1
    cdef int _run_job(self, _Job job, int index) except -1
    cdef int _finish_job(self, _Job job, bint discarded) except -1
    cdef int _strand_next(self, object key) except -1
