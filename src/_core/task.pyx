# cython: language_level=3, embedsignature=True
"""The interfaces users subclass (IRun0, IRun2) and Task, the unit of work."""

cimport cython

from _core.includes.sys cimport cppnp_atomic_cas


class IRun0:
    """Work with no arguments: subclass and override :meth:`run0` (the seed's IRun0)."""

    __slots__ = ()

    def run0(self):
        """Called when the task runs (on a worker, or on the loop for loop callbacks).

        Thread-safe.
        """
        raise NotImplementedError("%s must override run0()" % type(self).__name__)


class IRun2:
    """Work on a message and a parameter: override :meth:`run2` (the seed's IRun2).

    The seed's EchoServer passes the received bytes as *msg* and the connection as
    *param*.
    """

    __slots__ = ()

    def run2(self, msg, param):
        """Called when the task runs, with the *msg* and *param* given to Task().

        Thread-safe.
        """
        raise NotImplementedError("%s must override run2()" % type(self).__name__)


@cython.freelist(64)
@cython.auto_pickle(False)
@cython.final
@cython.trashcan(True)      # dropping a long Task(Task(...)) chain must not recurse
cdef class Task:
    """A unit of work for a ThreadPool or an EventLoop (the seed's Task).

    ``Task(irun0)`` calls ``irun0.run0()``; ``Task(irun2, msg, param)`` calls
    ``irun2.run2(msg, param)``; ``Task(callable, *args)`` calls ``callable(*args)``;
    ``Task(task)`` does what *task* does (without nesting the call: a chain of any depth
    runs and is freed without recursion).  A Task is immutable once created, so any
    thread may run it.
    """

    def __init__(self, target, *args):
        """Wrap *target* (IRun0, IRun2, Task or callable) and its arguments.  Runs once:
        initialising a Task again raises RuntimeError."""
        cdef object fn
        cdef tuple call_args = args
        if isinstance(target, IRun2):
            if len(args) != 2:
                raise TypeError("Task(IRun2, msg, param) takes exactly 2 arguments after the "
                                "IRun2, got %d" % len(args))
            fn = target.run2
        elif isinstance(target, IRun0):
            if args:
                raise TypeError("Task(IRun0) takes no arguments after the IRun0")
            fn = target.run0
        elif isinstance(target, Task):
            if args:
                raise TypeError("Task(Task) takes no arguments")
            if (<Task>target)._fn is None:
                raise TypeError("Task(Task): the wrapped Task was not initialised")
            fn = (<Task>target)._fn         # call what it calls: no nested do_task()
            call_args = (<Task>target)._args
        elif callable(target):
            fn = target
        else:
            raise TypeError("Task() needs an IRun0, an IRun2 or a callable, got %r"
                            % (type(target).__name__,))
        # The fields are written once, before the Task can be shared; a second __init__
        # (which could free _fn under a thread running do_task) is refused.
        if not cppnp_atomic_cas(&self._init_done, 0, 1):
            raise RuntimeError("Task.__init__ may run only once")
        self._fn = fn
        self._args = call_args
        self._target = target

    cpdef object do_task(self):
        """Run the task: run0(), run2(msg, param) or the callable.  Returns its result.

        Thread-safe.
        """
        if self._fn is None:
            raise RuntimeError("Task was not initialised")
        return self._fn(*self._args)

    @property
    def target(self):
        """What the Task wraps: the IRun0, IRun2, Task or callable given to Task().

        Thread-safe.
        """
        return self._target

    @property
    def args(self):
        """The arguments given after the target (msg, param for an IRun2; () for a Task).

        Thread-safe.
        """
        if isinstance(self._target, Task):
            return ()
        return self._args if self._args is not None else ()

    @property
    def param(self):
        """The IRun2 param (the seed passes the connection here), else None.

        Thread-safe.
        """
        return self._args[1] if isinstance(self._target, IRun2) else None

    def __call__(self):
        return self.do_task()

    def __repr__(self):
        return "<Task %r>" % (self._target,)

    # -- seed-compatible names: same objects as the snake_case methods --
    DoTask = do_task


@cython.auto_pickle(False)
cdef class WorkOwner:
    """Something a ThreadPool counts work against (internal; see task.pxd)."""

    cdef bint counts_work(self) noexcept:
        return False

    cdef int work_added(self) noexcept:
        return 0

    cdef int work_released(self) except -1:
        return 0

    cdef bint work_cancelled(self) noexcept:
        return False


cpdef object as_callback(object cb):
    if isinstance(cb, Task):
        return getattr(cb, "do_task")
    if isinstance(cb, IRun0):
        return cb.run0
    if callable(cb):
        return cb
    raise TypeError("expected a callable, an IRun0 or a Task, got %r" % (type(cb).__name__,))
