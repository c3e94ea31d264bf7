# cython: language_level=3, embedsignature=True
"""The interfaces users subclass (IRun0, IRun2) and Task, the unit of work."""

cimport cython


class IRun0:
    """Work with no arguments: subclass and override :meth:`run0` (the seed's IRun0)."""

    __slots__ = ()

    def run0(self):
        """Called when the task runs (on a worker, or on the loop for loop callbacks)."""
        raise NotImplementedError("%s must override run0()" % type(self).__name__)


class IRun2:
    """Work on a message and a parameter: override :meth:`run2` (the seed's IRun2).

    The seed's EchoServer passes the received bytes as *msg* and the connection as
    *param*.
    """

    __slots__ = ()

    def run2(self, msg, param):
        """Called when the task runs, with the *msg* and *param* given to Task()."""
        raise NotImplementedError("%s must override run2()" % type(self).__name__)


@cython.freelist(64)
@cython.auto_pickle(False)
@cython.final
cdef class Task:
    """A unit of work for a ThreadPool or an EventLoop (the seed's Task).

    ``Task(irun0)`` calls ``irun0.run0()``; ``Task(irun2, msg, param)`` calls
    ``irun2.run2(msg, param)``; ``Task(callable, *args)`` calls ``callable(*args)``.
    """

    def __init__(self, target, *args):
        """Wrap *target* (IRun0, IRun2 or callable) and its arguments."""
        if isinstance(target, IRun2):
            if len(args) != 2:
                raise TypeError("Task(IRun2, msg, param) takes exactly 2 arguments after the "
                                "IRun2, got %d" % len(args))
            self._fn = target.run2
        elif isinstance(target, IRun0):
            if args:
                raise TypeError("Task(IRun0) takes no arguments after the IRun0")
            self._fn = target.run0
        elif isinstance(target, Task):
            if args:
                raise TypeError("Task(Task) takes no arguments")
            self._fn = getattr(target, "do_task")
        elif callable(target):
            self._fn = target
        else:
            raise TypeError("Task() needs an IRun0, an IRun2 or a callable, got %r"
                            % (type(target).__name__,))
        self._args = args
        self.target = target

    cpdef object do_task(self):
        """Run the task: run0(), run2(msg, param) or the callable.  Returns its result."""
        if self._fn is None:
            raise RuntimeError("Task was not initialised")
        return self._fn(*self._args)

    @property
    def args(self):
        """The arguments the target is called with (msg, param for an IRun2)."""
        return self._args

    @property
    def param(self):
        """The IRun2 param (the seed passes the connection here), else None."""
        return self._args[1] if isinstance(self.target, IRun2) else None

    def __call__(self):
        return self.do_task()

    def __repr__(self):
        return "<Task %r>" % (self.target,)

    # -- seed-compatible names: same objects as the snake_case methods --
    DoTask = do_task


cpdef object as_callback(object cb):
    if isinstance(cb, Task):
        return getattr(cb, "do_task")
    if isinstance(cb, IRun0):
        return cb.run0
    if callable(cb):
        return cb
    raise TypeError("expected a callable, an IRun0 or a Task, got %r" % (type(cb).__name__,))
