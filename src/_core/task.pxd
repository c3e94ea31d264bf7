# Task: the seed's Task, wrapping an IRun0, an IRun2 with (msg, param), or a callable.
from libc.stdint cimport int64_t


cdef class Task:
    cdef:
        object _fn          # the bound run0 / run2, or the callable (a wrapped Task's own)
        tuple _args         # what _fn is called with
        object _target
        int64_t _init_done  # atomic: __init__ runs once (the fields never change after)
    cpdef object do_task(self)

# WorkOwner: something a ThreadPool counts work against (the pool's side of a
# connection's lifetime; muduo's ThreadPool knows nothing of the network, and neither
# does ours).  A task that refers to an owner (see ThreadPool.add_task) is counted with
# work_added() when it is accepted and work_released() when it ran or was discarded, and
# is discarded instead of run if work_cancelled() says so.  Every method: any thread.
# counts_work() is False for the base (a Channel that is not a connection): the pool
# then treats the object as an ordinary argument.  TcpConnection implements it.
cdef class WorkOwner:
    cdef bint counts_work(self) noexcept
    cdef int work_added(self) noexcept
    cdef int work_released(self) except -1
    cdef bint work_cancelled(self) noexcept


# Normalise what the loop accepts as a callback: an IRun0 (run0), a Task (do_task), or any
# callable.  Raises TypeError otherwise.
cpdef object as_callback(object cb)
