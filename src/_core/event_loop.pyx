# cython: language_level=3, embedsignature=True
"""EventLoop: the epoll reactor, at most one per thread."""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from cpython.ref cimport PyObject
from libc.math cimport isinf, isnan
from libc.stdint cimport int64_t, uint32_t

from _core.channel cimport Channel, PollHook
from _core.gil_share cimport (
    loop_has_gil, loop_share_begin, loop_share_end, loop_share_slice, loop_wants_gil,
)
from _core.includes.consts cimport (
    BEFORE_POLL_ROUNDS, MAX_EVENTS, MAX_RELEASE_HOOKS, MIN_INTERVAL, WAKE_RECHECK_MS,
)
from _core.includes.linux cimport (
    EINTR, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, close,
    epoll_create1, epoll_ctl, epoll_event, epoll_wait, errno,
)
from _core.includes.sys cimport (
    cppnp_atomic_add, cppnp_atomic_cas, cppnp_atomic_load, cppnp_atomic_store, cppnp_counter_add,
    cppnp_monotonic, cppnp_relaxed_load, cppnp_relaxed_store,
)
from _core.pending cimport PendingFunctors
from _core.task cimport as_callback
from _core.timer_queue cimport TimerQueue


import logging
import os
import threading
import weakref

cdef extern from "<unistd.h>" nogil:
    int getpid()

cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident() nogil

cdef extern from *:
    """
    /* The loop running on this thread (borrowed: set only while loop() runs). */
    static __thread PyObject *cppnp_tls_running_loop = NULL;
    """
    PyObject* cppnp_tls_running_loop

cdef object _logger = logging.getLogger("cppnp")

# The argument of a functor queued without one (it is called as fn()).
cdef object _NOARG = object()

# One loop per thread (muduo's t_loopInThisThread): thread ident -> weakref to the loop.
cdef object _registry_lock = threading.Lock()
cdef dict _registry = {}


@cython.auto_pickle(False)
cdef class EventLoop:
    """Reactor, at most one per thread (muduo's EventLoop).

    The loop belongs to the thread that creates it.  ``loop()`` runs iterations of:
    poll (epoll_wait, GIL released) -> dispatch I/O -> run expired timers -> run pending
    functors, until ``quit()``.  All socket I/O, sends, write-complete callbacks and timer
    changes happen on that thread; other threads hand work over with ``queue_in_loop``
    (the seed's ``QueueLoop``), which appends to a mutex-protected vector and wakes the
    loop through an eventfd.  Exceptions from callbacks are logged on the ``cppnp`` logger
    and counted in ``callback_errors``; KeyboardInterrupt and SystemExit propagate out of
    ``loop()``, after which the loop can be run again or closed.
    """

    def __cinit__(self):
        self._epfd = -1
        self._events = NULL
        self._channels = set()
        self._attached = set()
        self._timers = TimerQueue()
        self._next_timer_id = 0
        self._quit = 0
        self._before_poll = []
        self._release_hooks = []
        # Until __init__ succeeds the loop counts as closed, so an object made with
        # EventLoop.__new__ raises RuntimeError instead of touching missing state.
        self._closed = 1

    def __init__(self):
        """Create a loop owned by the calling thread.

        Raises RuntimeError if this thread already has an open EventLoop, and if
        ``__init__`` already ran on this object (a closed loop stays closed).
        """
        cdef epoll_event ev
        if self._initialized or self._epfd >= 0:
            raise RuntimeError("EventLoop.__init__ called twice: a loop is initialised once "
                               "(make a new EventLoop)")
        self._thread_id = PyThread_get_thread_ident()
        with _registry_lock:
            ref = _registry.get(self._thread_id)
            other = ref() if ref is not None else None
            # A loop inherited through fork() belongs to the parent: it does not count.
            if other is not None and not (<EventLoop>other).is_closed() \
                    and (<EventLoop>other)._pid == getpid():
                raise RuntimeError(
                    "another EventLoop exists in this thread (%r); close it first" % other)
            self._epfd = epoll_create1(EPOLL_CLOEXEC)
            if self._epfd < 0:
                raise OSError(errno, "epoll_create1() failed: " + os.strerror(errno))
            try:
                self._pending = PendingFunctors()
            except BaseException:
                close(self._epfd)
                self._epfd = -1
                raise
            self._events = <epoll_event*>PyMem_RawMalloc(MAX_EVENTS * sizeof(epoll_event))
            if self._events == NULL:
                raise MemoryError()
            ev.events = EPOLLIN
            ev.data.ptr = <void*>self      # the wakeup eventfd is marked by the loop itself
            if epoll_ctl(self._epfd, EPOLL_CTL_ADD, self._pending.wakeup_fd, &ev) < 0:
                raise OSError(errno, "epoll_ctl(eventfd) failed: " + os.strerror(errno))
            _registry[self._thread_id] = weakref.ref(self)
            self._pid = getpid()
            self._initialized = True
            cppnp_atomic_store(&self._closed, 0)

    def __dealloc__(self):
        # No Python calls here: only release what C owns.
        if self._epfd >= 0:
            close(self._epfd)
        PyMem_RawFree(self._events)

    def __repr__(self):
        state = "closed" if self.is_closed() else (
            "running" if cppnp_atomic_load(&self._looping) else "idle")
        return "<EventLoop %s thread=%d channels=%d timers=%d>" % (
            state, self._thread_id, cppnp_relaxed_load(&self._n_channels), self.timer_count)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- thread affinity ----------------------------------------------------------------

    cdef inline bint in_loop_thread(self) noexcept:
        return PyThread_get_thread_ident() == self._thread_id

    cdef int assert_in_loop_thread(self, str what) except -1:
        if PyThread_get_thread_ident() != self._thread_id:
            raise RuntimeError(
                "%s must be called from the loop thread (loop thread %d, caller %d)"
                % (what, self._thread_id, PyThread_get_thread_ident()))
        return 0

    def is_in_loop_thread(self):
        """Return True if the caller is the loop's thread.

        Thread-safe.
        """
        return PyThread_get_thread_ident() == self._thread_id

    cdef inline bint is_closed(self) noexcept:
        return cppnp_atomic_load(&self._closed) != 0

    @property
    def thread_id(self):
        """The ident (threading.get_ident()) of the thread that owns the loop.

        Thread-safe.
        """
        return self._thread_id

    @property
    def closed(self):
        """True once close() has run.

        Thread-safe.
        """
        return self.is_closed()

    @property
    def running(self):
        """True while loop() or run_once() runs.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._looping) != 0

    # -- running ------------------------------------------------------------------------

    def loop(self):
        """Run the loop until quit() is called.

        If quit() was called before loop(), one iteration runs (queued functors and due
        timers are not lost) and loop() returns.

        Loop thread only.
        """
        self._begin_run("loop()")
        try:
            while True:
                self._run_once(-1)
                if cppnp_atomic_load(&self._quit):
                    break
        finally:
            cppnp_atomic_store(&self._quit, 0)
            self._end_run()

    def run_once(self, timeout=None):
        """Run one iteration, waiting at most *timeout* seconds for I/O.

        Loop thread only.
        """
        cdef double t = -1.0 if timeout is None else timeout
        if isnan(t):
            raise ValueError("run_once() timeout is NaN")
        self._begin_run("run_once()")
        try:
            self._run_once(-1 if t < 0 else <int>min(t * 1000.0, 2147483647.0))
        finally:
            self._end_run()

    cdef int _begin_run(self, str what) except -1:
        global cppnp_tls_running_loop
        self.assert_in_loop_thread("EventLoop." + what)
        if self.is_closed():
            raise RuntimeError("%s on a closed EventLoop" % what)
        if cppnp_atomic_load(&self._looping):
            raise RuntimeError("%s while the loop runs (no nested loops)" % what)
        self._gil_sharing = loop_share_begin()
        self._signals_here = threading.main_thread().ident == self._thread_id
        cppnp_atomic_store(&self._looping, 1)
        cppnp_tls_running_loop = <PyObject*>self
        return 0

    cdef int _end_run(self) except -1:
        global cppnp_tls_running_loop
        cppnp_tls_running_loop = NULL
        cppnp_atomic_store(&self._looping, 0)
        loop_share_end(self._gil_sharing)
        self._gil_sharing = False
        try:
            self._run_before_poll()
        finally:
            # Release hooks left registered get their fallback (e.g. an eager worker
            # wakeup): no poll follows that would run them -- also when a flush above
            # raised (a second Ctrl-C).
            hooks = self._release_hooks
            self._release_hooks = []
            for hook in hooks:
                (<PollHook>hook).before_poll()
        return 0

    def quit(self):
        """Make loop() return after the current iteration.

        Thread-safe.
        """
        cppnp_atomic_store(&self._quit, 1)
        if not self.in_loop_thread() and not self.is_closed():
            self._pending.wakeup()

    cdef int _run_once(self, int max_timeout) except -1:
        cdef int timeout, n, i, k, nrel
        cdef void* p
        cdef Channel ch
        cdef bint sharing, polling, more
        cdef list released
        cdef PyObject* rel[MAX_RELEASE_HOOKS]
        cdef int caps[MAX_RELEASE_HOOKS]
        # Before-poll hooks first (write flushes, pool wakeups): a functor they queue
        # (a write-complete, a release) makes this poll not block.
        more = self._run_before_poll()
        timeout = self._timers.timeout_ms(cppnp_monotonic())
        if max_timeout >= 0 and (timeout < 0 or timeout > max_timeout):
            timeout = max_timeout
        if timeout != 0 and (more or cppnp_atomic_load(&self._quit)):
            timeout = 0
        # A signal that arrived while Python code ran is handled before we block.
        PyErr_CheckSignals()
        # Last: functors queued so far (also by the before-poll hooks) mean no blocking;
        # from here on, one queued by another thread writes the eventfd (pending.pxd).
        polling = timeout != 0 and not self._pending.begin_poll()
        if not polling:
            timeout = 0
        sharing = self._gil_sharing
        # Release hooks (worker wakeups) run with the GIL released, so that a woken
        # thread finds it free instead of blocking on it while we go to poll.
        released = self._release_hooks
        nrel = 0
        if released:
            self._release_hooks = []
            for hook in released:
                if nrel < MAX_RELEASE_HOOKS:
                    rel[nrel] = <PyObject*>hook
                    nrel += 1
                else:
                    (<PollHook>hook).before_poll()      # (never expected: the fallback)
        try:
            with nogil:
                n = self._wait(timeout, rel, caps, nrel)
                loop_wants_gil(sharing)     # ask workers to let us have the GIL first
            loop_has_gil(sharing)
        finally:
            if polling:
                self._pending.end_poll()
        for k in range(nrel):
            if caps[k] >= 0:
                self.add_release_hook(<PollHook>rel[k])
        if n < 0:
            if errno != EINTR:
                raise OSError(errno, "epoll_wait() failed: " + os.strerror(errno))
            # Run Python-level signal handlers now (KeyboardInterrupt is raised here).
            PyErr_CheckSignals()
            n = 0
        cppnp_counter_add(&self._iterations, 1)
        self._dispatch_count = n
        self._dispatching = True
        self._slice_start = cppnp_monotonic()
        try:
            i = 0
            while i < self._dispatch_count:
                self._dispatch_index = i
                p = self._events[i].data.ptr
                if p == <void*>self:
                    self._pending.drain_wakeup()
                elif p != NULL:
                    ch = <Channel>p
                    ch.handle_event(self._events[i].events)
                i += 1
                loop_share_slice(self._gil_sharing, &self._slice_start)
        finally:
            self._dispatching = False
        self._run_timers()
        self._run_pending()
        return 0

    cdef int _wait(self, int timeout, PyObject** rel, int* caps, int nrel) noexcept nogil:
        """epoll_wait for at most *timeout* ms (-1: no limit), without the GIL.

        The release hooks *rel* run first (caps[k]: what hook k returned).  While one
        asks to run again within some ms (a pool whose queued tasks wait while a worker is
        idle), the wait is cut into slices that long and the hooks run again between two,
        still without the GIL.  On the main thread a wait after hooks ran lasts at most
        WAKE_RECHECK_MS (then the pass ends): a signal caught while they ran is raised by
        the next pass instead of waiting for the next event.
        """
        cdef double deadline = 0.0, now
        cdef int cap, wait_ms, k, n
        for k in range(nrel):
            caps[k] = 0
        if timeout > 0:
            deadline = cppnp_monotonic() + timeout * 0.001
        while True:
            cap = -1
            if nrel:
                now = cppnp_monotonic()
                for k in range(nrel):
                    if caps[k] >= 0:
                        caps[k] = (<PollHook>rel[k]).released(now)
                        if caps[k] >= 0 and (cap < 0 or caps[k] < cap):
                            cap = caps[k]
            wait_ms = timeout
            if cap >= 0 and (wait_ms < 0 or wait_ms > cap):
                wait_ms = cap
            if nrel and self._signals_here and (wait_ms < 0 or wait_ms > WAKE_RECHECK_MS):
                # Main thread: a signal caught while the hooks ran (they wake threads: the
                # CPU may go to them) did not interrupt a syscall; end the pass soon, so
                # that the next one's PyErr_CheckSignals raises it (Ctrl-C).
                return epoll_wait(self._epfd, self._events, MAX_EVENTS, WAKE_RECHECK_MS)
            n = epoll_wait(self._epfd, self._events, MAX_EVENTS, wait_ms)
            if n != 0 or wait_ms == timeout:
                return n
            if timeout > 0:
                timeout = <int>((deadline - cppnp_monotonic()) * 1000.0 + 0.999)
                if timeout <= 0:
                    return 0

    cdef int _run_timers(self) except -1:
        cdef double now = cppnp_monotonic()
        # Timers added by these callbacks wait for the next iteration (no starvation).
        cdef int64_t cutoff = cppnp_atomic_load(&self._next_timer_id) + 1
        while True:
            cb = self._timers.pop_due(now, cutoff)
            if cb is None:
                return 0
            try:
                cb()
            except Exception:
                self.report_error("timer callback %r" % (cb,))

    cdef int _run_pending(self) except -1:
        cdef list items = self._pending.swap()
        cdef Py_ssize_t i = 0, n = len(items)
        try:
            while i < n:
                fn = items[i]
                arg = items[i + 1]
                i += 2
                try:
                    if isinstance(fn, Channel):
                        (<Channel>fn).run_functor(arg)
                    elif arg is _NOARG:
                        fn()
                    else:
                        fn(arg)
                except Exception:
                    self.report_error("pending functor %r" % (fn,))
                loop_share_slice(self._gil_sharing, &self._slice_start)
        finally:
            if i < n:
                self._pending.put_back(items[i:])
        return 0

    # -- channels (internal) ------------------------------------------------------------

    cdef int update_channel(self, Channel ch, uint32_t interest) except -1:
        cdef epoll_event ev
        cdef int op
        if self.is_closed():
            raise RuntimeError("EventLoop is closed")
        ev.events = interest
        ev.data.ptr = <void*>ch
        if not ch.registered:
            op = EPOLL_CTL_ADD
        else:
            if ch.interest == interest:
                return 0
            op = EPOLL_CTL_MOD
        if epoll_ctl(self._epfd, op, ch.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(fd %d) failed: %s" % (ch.fd, os.strerror(errno)))
        if not ch.registered:
            ch.registered = True
            self._channels.add(ch)
            cppnp_relaxed_store(&self._n_channels, len(self._channels))
        ch.interest = interest
        return 0

    cdef int remove_channel(self, Channel ch) except -1:
        cdef int i
        if not ch.registered:
            return 0
        # After fork() the epoll instance is shared with the parent: a child closing its
        # inherited loop must not take the parent's fds out of it.
        if self._epfd >= 0 and ch.fd >= 0 and getpid() == self._pid:
            epoll_ctl(self._epfd, EPOLL_CTL_DEL, ch.fd, NULL)
        ch.registered = False
        ch.interest = 0
        if self._dispatching:
            # Events for this channel later in the current batch must not be delivered:
            # the channel may be gone, and its fd number may already belong to another.
            for i in range(self._dispatch_index + 1, self._dispatch_count):
                if self._events[i].data.ptr == <void*>ch:
                    self._events[i].data.ptr = NULL
        self._channels.discard(ch)
        cppnp_relaxed_store(&self._n_channels, len(self._channels))
        return 0

    cdef int attach(self, Channel ch) except -1:
        # Any thread (TcpServer.start()): the set is only added to and removed from.
        if self.is_closed():
            raise RuntimeError("EventLoop is closed")
        self._attached.add(ch)
        return 0

    cdef int detach(self, Channel ch) except -1:
        self._attached.discard(ch)
        return 0

    # -- functors -----------------------------------------------------------------------

    cdef int queue(self, object fn, object arg=_NOARG) except -1:
        if self._pending is None:
            return 0
        return self._pending.append(fn, arg, self.in_loop_thread())

    cdef int run_or_queue(self, object fn, object arg=_NOARG) except -1:
        if not self.in_loop_thread():
            return self.queue(fn, arg)
        if arg is _NOARG:
            fn()
        else:
            fn(arg)
        return 1

    def queue_in_loop(self, cb):
        """Queue *cb* (callable, IRun0 or Task) to run on the loop thread, after the I/O
        and timers of the current iteration (the seed's ``QueueLoop``).

        Thread-safe.
        """
        fn = as_callback(cb)
        if self.is_closed():
            raise RuntimeError("queue_in_loop() on a closed EventLoop")
        self.queue(fn)

    def run_in_loop(self, cb):
        """Run *cb* now if called on the loop thread, else queue it (queue_in_loop).

        Thread-safe.
        """
        fn = as_callback(cb)
        if not self.in_loop_thread() and self.is_closed():
            raise RuntimeError("run_in_loop() on a closed EventLoop")
        self.run_or_queue(fn)

    @property
    def pending_functors(self):
        """How many functors are queued and not yet run.

        Thread-safe.
        """
        return len(self._pending) if self._pending is not None else 0

    # -- timers -------------------------------------------------------------------------

    def time(self):
        """Return the loop clock (seconds, monotonic; the clock run_at() uses).

        Thread-safe.
        """
        return cppnp_monotonic()

    cdef int64_t _add_timer(self, double when, double interval, object cb) except -1:
        cdef int64_t seq
        fn = as_callback(cb)
        if self.is_closed():
            raise RuntimeError("cannot add a timer to a closed EventLoop")
        seq = cppnp_atomic_add(&self._next_timer_id, 1)
        # Not run_or_queue(): on the loop thread (the common case, e.g. per-request
        # timeouts) a direct call saves a tuple, a bound method and a Python call.
        if self.in_loop_thread():
            self._timers.add(seq, when, interval, fn)
        else:
            self.queue(self._add_timer_in_loop, (seq, when, interval, fn))
        return seq

    def _add_timer_in_loop(self, tuple args):
        self._timers.add(args[0], args[1], args[2], args[3])

    def run_at(self, double when, cb):
        """Run *cb* once at loop time *when* (see time()); return its timer id.

        A deadline in the past (also ``-inf``) runs in the next iteration; ``inf`` never
        fires (it can be cancelled); NaN raises ValueError.  Timers with equal deadlines
        fire in the order they were added.

        Thread-safe.
        """
        if isnan(when):
            raise ValueError("run_at() deadline is NaN")
        return self._add_timer(when, 0.0, cb)

    def run_after(self, double delay, cb):
        """Run *cb* once, *delay* seconds from now; return its timer id.

        A delay <= 0 (also ``-inf``) runs in the next iteration; ``inf`` never fires (it
        can be cancelled); NaN raises ValueError.

        Thread-safe.
        """
        if isnan(delay):
            raise ValueError("run_after() delay is NaN")
        return self._add_timer(cppnp_monotonic() + (delay if delay > 0 else 0.0), 0.0, cb)

    def run_every(self, double interval, cb):
        """Run *cb* every *interval* seconds, first after one interval; return its id.

        *interval* is a finite number of seconds >= 1e-9 (the monotonic clock's
        resolution); anything else raises ValueError (a shorter interval could not move
        the deadline forward).  Deadlines do not drift: each one is the previous deadline
        plus *interval*.  If the loop stalls past several deadlines the timer fires once
        and resumes on its grid.  A repeating timer fires at most once per loop iteration
        (an interval shorter than an iteration means "every iteration").

        Thread-safe.
        """
        if not interval >= MIN_INTERVAL or isinf(interval):
            raise ValueError("run_every() interval must be a finite number of seconds >= %r "
                             "(the clock's resolution), got %r" % (MIN_INTERVAL, interval))
        return self._add_timer(cppnp_monotonic() + interval, interval, cb)

    def cancel_timer(self, timer_id):
        """Cancel a timer by id; unknown or finished ids are ignored.

        On the loop thread the cancel takes effect at once, also from inside the timer's
        own callback (that stops a repeating timer).  From another thread it is queued to
        the loop, so a timer due at that moment may still run once.  *timer_id* must be
        an int (TypeError otherwise: a float or bool is never truncated to an id).

        Thread-safe.
        """
        cdef int64_t seq
        if not isinstance(timer_id, int) or isinstance(timer_id, bool):
            raise TypeError("cancel_timer() needs an int timer id, got %r"
                            % (type(timer_id).__name__,))
        if not 0 < timer_id <= cppnp_atomic_load(&self._next_timer_id) or self.is_closed():
            return          # no timer ever had this id
        seq = timer_id
        if self.in_loop_thread():       # direct, as in _add_timer
            self._timers.cancel(seq)
        else:
            self.queue(self._cancel_timer_in_loop, seq)

    def _cancel_timer_in_loop(self, int64_t seq):
        self._timers.cancel(seq)

    @property
    def timer_count(self):
        """How many timers are scheduled (cancelled ones excluded).

        Thread-safe.
        """
        return self._timers.live_count()

    # -- errors and counters ------------------------------------------------------------

    cdef int report_error(self, str where) except -1:
        # Log, then count: whoever sees callback_errors go up also finds the log record.
        log_exception("Exception in %s", where)
        cppnp_counter_add(&self._callback_errors, 1)
        return 0

    cdef int count_drop(self, Py_ssize_t nbytes) noexcept:
        cppnp_counter_add(&self._dropped_sends, 1)
        cppnp_counter_add(&self._dropped_bytes, nbytes)
        return 0

    @property
    def callback_errors(self):
        """Exceptions raised by callbacks, timers and functors (logged).

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._callback_errors)

    @property
    def dropped_sends(self):
        """Sends dropped on this loop's connections (closing or closed).

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._dropped_sends)

    @property
    def dropped_bytes(self):
        """Bytes of the dropped sends.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._dropped_bytes)

    @property
    def iterations(self):
        """Loop iterations run so far.

        Thread-safe.
        """
        return cppnp_relaxed_load(&self._iterations)

    cdef int add_before_poll(self, PollHook hook) except -1:
        return _add_once(self._before_poll, hook)

    cdef int add_release_hook(self, PollHook hook) except -1:
        return _add_once(self._release_hooks, hook)

    cdef int _run_before_poll(self) except -1:
        """Run the hooks registered since the last poll, once each; a hook registered by
        a hook (a write flush that queued more output, e.g. a TLS close_notify) runs in the
        next round.  Returns 1 if hooks are still registered after a few rounds: the poll
        must then not block (they run before the next one)."""
        cdef PollHook hook
        cdef list hooks
        cdef int rounds = 0
        while self._before_poll and rounds < BEFORE_POLL_ROUNDS:
            hooks = self._before_poll
            self._before_poll = []
            for hook in hooks:
                hook.before_poll()
            rounds += 1
        return 1 if self._before_poll else 0

    def stats(self):
        """Return a dict of the loop's counters (a snapshot).

        The hand-off from other threads: ``pending_wakeups`` (eventfd writes that woke the
        polling loop), ``pending_wakeups_skipped`` (functors queued from other threads that
        needed no write: the loop was busy, or already woken), ``pending_batches`` (loop
        passes that ran queued functors), ``pending_batch_items`` (functors they ran),
        ``pending_batch_max`` (the most in one pass).

        Thread-safe.
        """
        w, ws, b, bi, bm = (self._pending.counters() if self._pending is not None
                            else (0, 0, 0, 0, 0))
        return {
            "channels": cppnp_relaxed_load(&self._n_channels),
            "timers": self._timers.live_count(),
            "pending_functors": self.pending_functors,
            "callback_errors": self.callback_errors,
            "dropped_sends": self.dropped_sends,
            "dropped_bytes": self.dropped_bytes,
            "dropped_functors": self.dropped_functors,
            "iterations": self.iterations,
            "pending_wakeups": w,
            "pending_wakeups_skipped": ws,
            "pending_batches": b,
            "pending_batch_items": bi,
            "pending_batch_max": bm,
            "write_calls": cppnp_relaxed_load(&self._write_calls),
            "coalesced_sends": cppnp_relaxed_load(&self._coalesced_sends),
        }

    # -- closing ------------------------------------------------------------------------

    @property
    def dropped_functors(self):
        """Functors dropped because the loop was closed (queued before or after close).

        Thread-safe.
        """
        return self._pending.dropped_count() if self._pending is not None else 0

    def close(self):
        """Close the loop: servers and connections are closed (without callbacks: a
        connection still open or waiting for tasks is just released), queued functors and timers are
        dropped (counted in ``dropped_functors``; functors queued later, e.g. sends from
        workers, are dropped and counted too), and the epoll fd and eventfd are closed.

        Idempotent.  Raises RuntimeError while loop() runs.  From the loop thread, or from
        any thread once the loop has stopped (loop() returned).

        Loop thread only.
        """
        cdef Channel ch
        if self.is_closed():
            return
        if cppnp_atomic_load(&self._looping):
            raise RuntimeError("cannot close a running EventLoop; call quit() first")
        if not cppnp_atomic_cas(&self._closed, 0, 1):
            return          # another thread is closing it
        try:
            # Servers first: they release their connections, registered or not (a
            # connection waiting for pool tasks has no channel any more).
            for ch in list(self._attached) + list(self._channels):
                try:
                    ch.on_loop_closed()
                except Exception:
                    self.report_error("closing %r" % (ch,))
                self.remove_channel(ch)
            self._attached.clear()
        finally:
            if self._pending is not None:
                self._pending.close()
            self._timers.clear()
            self._write_flusher = None      # it refers to the loop and to connections
            if self._epfd >= 0:
                close(self._epfd)
                self._epfd = -1
            with _registry_lock:
                ref = _registry.get(self._thread_id)
                if ref is not None and ref() is self:
                    del _registry[self._thread_id]

    # -- seed-compatible names: same objects as the snake_case methods --
    QueueLoop = queue_in_loop
    runAt = run_at
    runAfter = run_after
    runEvery = run_every
    cancelTimer = cancel_timer
    isInMainThread = is_in_loop_thread


cdef void log_exception(str fmt, object arg) noexcept:
    """Log the exception being handled; a failing log handler or filter must not take the
    loop (or a worker) down with it: the error is still counted by the caller."""
    try:
        _logger.error(fmt, arg, exc_info=True)
    except Exception:
        pass


cdef EventLoop running_loop():
    if cppnp_tls_running_loop == NULL:
        return None
    return <EventLoop>cppnp_tls_running_loop


cdef int _add_once(list hooks, PollHook hook) except -1:
    """Append *hook* to *hooks* unless it is there (by identity)."""
    cdef object item
    if hooks and hooks[len(hooks) - 1] is hook:
        return 0        # the common case: the same hook, send after send / task after task
    for item in hooks:
        if item is hook:
            return 0
    hooks.append(hook)
    return 0
