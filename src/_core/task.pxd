# Task: the seed's Task, wrapping an IRun0, an IRun2 with (msg, param), or a callable.

cdef class Task:
    cdef:
        object _fn          # the bound run0 / run2, or the callable
        tuple _args
        readonly object target
    cpdef object do_task(self)

# Normalise what the loop accepts as a callback: an IRun0 (run0), a Task (do_task), or any
# callable.  Raises TypeError otherwise.
cpdef object as_callback(object cb)
