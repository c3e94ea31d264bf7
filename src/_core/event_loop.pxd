# EventLoop: the reactor, at most one per thread (muduo's EventLoop).
#
# One iteration: poll (epoll_wait, GIL released) -> dispatch I/O events -> run expired
# timers -> run pending functors.  Timers run before functors so a functor queued by a
# timer callback (a send, a write-complete) runs in the same iteration.
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t

from _core.channel cimport Channel, PollHook
from _core.includes.sys cimport cppnp_counter_add
from _core.includes.linux cimport epoll_event
from _core.pending cimport PendingFunctors
from _core.timer_queue cimport TimerQueue


cdef class EventLoop:
    cdef:
        int _epfd
        unsigned long _thread_id        # PyThread_get_thread_ident() of the owning thread
        int64_t _quit                   # atomic: set by quit() from any thread
        int64_t _looping                # atomic: loop() or run_once() is running
        int64_t _closed                 # atomic: close() ran (or __init__ did not)
        bint _initialized               # __init__ has run: it runs once per object
        PendingFunctors _pending        # list + pymutex + eventfd
        TimerQueue _timers
        set _channels                   # registered channels (keeps them alive)
        set _attached                   # servers: told when the loop closes, even if stopped
        epoll_event* _events
        # While dispatching a batch: where we are, so remove_channel can invalidate the
        # batch's later events for a channel it removes.
        bint _dispatching
        int _dispatch_index
        int _dispatch_count
        int64_t _next_timer_id          # atomic
        int _pid                        # the process that created the loop (fork check)
        double _slice_start             # when the loop last (re)took the GIL
        bint _gil_sharing               # loop_share_begin() said yes (gil_share.pxd)
        # The loop runs on the main thread, where Python runs signal handlers: a signal
        # caught while release hooks run (not in epoll_wait: no EINTR) is seen only by the
        # next pass's PyErr_CheckSignals, so a pass that ran them ends within one recheck.
        bint _signals_here
        list _before_poll               # PollHooks to run once before the next poll
        list _release_hooks             # PollHooks to run with the GIL released, ditto
        int64_t _n_channels             # len(_channels), readable from any thread
        # Counters: written on the loop thread only, read anywhere (relaxed atomics).
        int64_t _callback_errors
        int64_t _dropped_sends
        int64_t _dropped_bytes
        int64_t _iterations
        int64_t _write_calls            # send() calls for connection output
        int64_t _coalesced_sends        # sends that joined a pending flush (no own call)
        # tcp_connection's per-loop WriteFlusher (a PollHook), made on first use by the
        # loop thread; opaque to the loop (it keeps it alive and shows its counters).
        object _write_flusher
        object __weakref__

    cdef inline bint in_loop_thread(self) noexcept

    cdef int assert_in_loop_thread(self, str what) except -1
    cdef int update_channel(self, Channel ch, uint32_t interest) except -1
    cdef int remove_channel(self, Channel ch) except -1
    cdef inline bint is_closed(self) noexcept
    # Servers are attached while they have a listener or connections: the loop tells them
    # when it closes.  detach() when neither is left (loop thread).
    cdef int attach(self, Channel ch) except -1
    cdef int detach(self, Channel ch) except -1
    # Queue fn(arg) -- fn() without arg, ch.run_functor(arg) for a Channel -- to run on
    # the loop thread.  Returns 1, or 0 if the loop is closed (dropped and counted).
    cdef int queue(self, object fn, object arg=*) except -1
    # "Run now on the loop thread, else queue": the one place that decides.  fn(arg), or
    # fn() without arg.  Returns what queue() does (1 when run now).
    cdef int run_or_queue(self, object fn, object arg=*) except -1
    cdef int report_error(self, str where) except -1
    cdef int count_drop(self, Py_ssize_t nbytes) noexcept
    # Connection output counters (loop thread): one send() call; one coalesced send.
    cdef inline void count_write_call(self) noexcept:
        cppnp_counter_add(&self._write_calls, 1)
    cdef inline void count_coalesced(self) noexcept:
        cppnp_counter_add(&self._coalesced_sends, 1)
    # Run hook.before_poll() once, just before the loop next blocks in epoll_wait (or
    # when the run ends); the same hook added twice runs once (loop thread only).  The
    # ThreadPool wakes its workers this way: one wakeup for a batch of tasks.
    cdef int add_before_poll(self, PollHook hook) except -1
    # Run hook.released(now) with the GIL released just before the loop next blocks in
    # epoll_wait (channel.pxd); the same hook added twice runs once (loop thread only).
    # The ThreadPool wakes its workers this way, so a woken worker finds the GIL free.
    cdef int add_release_hook(self, PollHook hook) except -1
    cdef int _run_before_poll(self) except -1
    cdef int _run_once(self, int max_timeout) except -1
    cdef int _wait(self, int timeout, PyObject** rel, int* caps, int nrel) noexcept nogil
    cdef int _run_timers(self) except -1
    cdef int _run_pending(self) except -1
    cdef int64_t _add_timer(self, double when, double interval, object cb) except -1
    cdef int _begin_run(self, str what) except -1
    cdef int _end_run(self) except -1


# Log the exception being handled at ERROR on the "cppnp" logger, never raising.
cdef void log_exception(str fmt, object arg) noexcept
# The EventLoop whose loop() is running on the calling thread, or None.
cdef EventLoop running_loop()
