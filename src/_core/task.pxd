# Task: the seed's Task, wrapping an IRun0, an IRun2 with (msg, param), or a callable.
from libc.stdint cimport int64_t


cdef class Task:
    cdef:
        object _fn          # the bound run0 / run2, or the callable (a wrapped Task's own)
        tuple _args         # what _fn is called with
        object _target
        int64_t _init_done  # atomic: __init__ runs once (the fields never change after)
    cpdef object do_task(self)

# Normalise what the loop accepts as a callback: an IRun0 (run0), a Task (do_task), or any
# callable.  Raises TypeError otherwise.
cpdef object as_callback(object cb)
