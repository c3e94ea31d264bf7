# GIL sharing: how a loop thread and the ThreadPool's workers hand a contended GIL over.
#
# With a GIL, the thread that holds it tends to win it back (a convoy: CPython forces a
# switch only every 5 ms).  Two counters keep the I/O thread and the workers both moving:
#   loops wanting:   loop threads between epoll_wait's return and getting the GIL back;
#                    a worker about to take the GIL lets them go first (bounded spin).
#   workers wanting: workers about to take the GIL; a loop that has dispatched for
#                    LOOP_SLICE seconds while one waits releases the GIL until one took it.
# A worker that holds the GIL steps aside for a waiting loop after WORKER_SLICE seconds.
#
# Without a GIL (a free-threaded build running with the GIL off) there is nothing to
# share: loop_share_begin() returns False and no loop counts itself; workers see no loop
# sharing and skip every step (one relaxed load).  On a build with a GIL the check
# compiles to a constant.  Every function here is the whole mechanism: event_loop.pyx and
# thread_pool.pyx only call them.

# -- loop side (the loop thread) ---------------------------------------------------------
# At the start of loop()/run_once(): True if there is a GIL to share (then call
# loop_share_end(True) when the run ends).
cdef bint loop_share_begin() except -1
cdef void loop_share_end(bint sharing) noexcept nogil
# Around epoll_wait: the loop (GIL released) is about to take the GIL back / has it.
cdef void loop_wants_gil(bint sharing) noexcept nogil
cdef void loop_has_gil(bint sharing) noexcept nogil
# Between two events or functors: after LOOP_SLICE seconds since *slice_start* while a
# worker waits, release the GIL until a worker took it (bounded), then reset the slice.
cdef int loop_share_slice(bint sharing, double* slice_start) except -1

# -- worker side (a ThreadPool worker) ---------------------------------------------------
# GIL released, about to take it: let a waiting loop go first, then count ourselves as
# wanting.  Returns what to pass to worker_has_gil() once the GIL is held again.
cdef bint worker_wants_gil() noexcept nogil
cdef void worker_has_gil(bint counted) noexcept nogil
# Between two tasks: after WORKER_SLICE seconds since *slice_start* while a loop waits,
# hand the GIL to it, then reset the slice.
cdef int worker_share_slice(double* slice_start) except -1
