# The core's named constants, in one place (cimport what you use:
# `from _core.includes.consts cimport MAX_EVENTS`).  Values are C compile-time constants
# (enums and macros in the verbatim block below), so using one costs nothing;
# Cython 3 deprecates `DEF`, which the core no longer uses.
cdef extern from *:
    """
    #ifndef CPPNP_CONSTS_H
    #define CPPNP_CONSTS_H
    #include <stddef.h>
    /* Buffer (muduo's kCheapPrepend / kInitialSize) and the readv spill area. */
    enum { CPPNP_CHEAP_PREPEND = 8, CPPNP_INITIAL_SIZE = 1024, CPPNP_EXTRA_BUF = 65536 };
    /* EventLoop: epoll events taken per epoll_wait. */
    enum { CPPNP_MAX_EVENTS = 1024 };
    /* EventLoop: rounds of before-poll hooks per iteration (a hook may register another,
       e.g. a write flush that queued a TLS close_notify); any left make the poll not block. */
    enum { CPPNP_BEFORE_POLL_ROUNDS = 4 };
    /* EventLoop: release hooks (run with the GIL released before epoll_wait) per pass;
       more fall back to their before_poll (one per ThreadPool used from the loop). */
    enum { CPPNP_MAX_RELEASE_HOOKS = 16 };
    /* LengthHeaderCodec: the widest length header (bytes). */
    enum { CPPNP_MAX_HEADER = 8 };
    /* TcpConnection: input buffers above this are given back once drained; the default
       high-water mark (64 MiB of queued output). */
    enum { CPPNP_KEEP_INPUT_CAPACITY = 262144 };
    #define CPPNP_DEFAULT_HIGH_WATER_MARK (64LL * 1024 * 1024)
    /* Acceptor: accepts per readable event (a connection storm cannot starve open
       connections), the rest after an accept error, one log line per interval. */
    enum { CPPNP_MAX_ACCEPTS_PER_EVENT = 256 };
    #define CPPNP_ACCEPT_RETRY_DELAY 0.1
    #define CPPNP_ACCEPT_LOG_INTERVAL 1.0
    /* ThreadPool: tasks a worker runs per GIL acquisition; the strand table's first size
       (a power of two; it doubles when full). */
    enum { CPPNP_MAX_BATCH = 16, CPPNP_INITIAL_BUCKETS = 64 };
    /* GIL sharing (gil_share.pyx): the loop's and a worker's slice of a contended GIL, in
       seconds, and the bounds of the two spin waits (sched_yield() calls). */
    #define CPPNP_LOOP_SLICE 0.0002
    #define CPPNP_WORKER_SLICE 0.001
    enum { CPPNP_HAND_OVER_SPINS = 200, CPPNP_YIELD_SPINS = 1000 };
    /* ThreadPool wakeups from a loop thread (BlockingQueue.notify_lazy): more workers
       are woken once the queue has stayed non-empty this long (seconds); the loop
       rechecks at least this often (ms) while tasks wait and a worker is idle. */
    #define CPPNP_WAKE_STALL 0.001
    enum { CPPNP_WAKE_RECHECK_MS = 1 };
    /* TcpServer(io_threads=N): the most io loop threads (a sanity bound); the seconds
       EventLoopThreadPool waits for an io loop to start, and to join one. */
    enum { CPPNP_MAX_IO_THREADS = 1024 };
    #define CPPNP_IO_START_TIMEOUT 10.0
    #define CPPNP_IO_JOIN_TIMEOUT 30.0
    /* IdleWheel: ticks per idle timeout (an idle connection is closed within one tick,
       timeout / ticks seconds, after its deadline). */
    enum { CPPNP_IDLE_WHEEL_TICKS = 8 };
    /* TcpConnection: loop-thread sends up to this size are coalesced (appended to the
       output and written once before the loop polls again); larger ones are written at
       once when nothing is queued before them (no copy). */
    enum { CPPNP_COALESCE_MAX = 16384 };
    /* EventLoop.run_every(): the monotonic clock's resolution. */
    #define CPPNP_MIN_INTERVAL 1e-9
    /* TimerQueue: compact the heap once this many entries (and over half) are dead. */
    enum { CPPNP_MIN_COMPACT = 64 };
    /* Growth of the core's C arrays (timer heap, queue ring): new = old * 2 + 64. */
    enum { CPPNP_GROWTH_FACTOR = 2, CPPNP_GROWTH_MIN = 64 };
    static inline size_t cppnp_grown_capacity(size_t cap) {
        return cap * CPPNP_GROWTH_FACTOR + CPPNP_GROWTH_MIN;
    }
    #endif
    """
    enum:
        CHEAP_PREPEND "CPPNP_CHEAP_PREPEND"
        INITIAL_SIZE "CPPNP_INITIAL_SIZE"
        EXTRA_BUF "CPPNP_EXTRA_BUF"
        MAX_EVENTS "CPPNP_MAX_EVENTS"
        BEFORE_POLL_ROUNDS "CPPNP_BEFORE_POLL_ROUNDS"
        MAX_RELEASE_HOOKS "CPPNP_MAX_RELEASE_HOOKS"
        MAX_HEADER "CPPNP_MAX_HEADER"
        KEEP_INPUT_CAPACITY "CPPNP_KEEP_INPUT_CAPACITY"
        MAX_ACCEPTS_PER_EVENT "CPPNP_MAX_ACCEPTS_PER_EVENT"
        MAX_BATCH "CPPNP_MAX_BATCH"
        INITIAL_BUCKETS "CPPNP_INITIAL_BUCKETS"
        HAND_OVER_SPINS "CPPNP_HAND_OVER_SPINS"
        YIELD_SPINS "CPPNP_YIELD_SPINS"
        WAKE_RECHECK_MS "CPPNP_WAKE_RECHECK_MS"
        MIN_COMPACT "CPPNP_MIN_COMPACT"
        MAX_IO_THREADS "CPPNP_MAX_IO_THREADS"
        IDLE_WHEEL_TICKS "CPPNP_IDLE_WHEEL_TICKS"
        COALESCE_MAX "CPPNP_COALESCE_MAX"
    const long long DEFAULT_HIGH_WATER_MARK "CPPNP_DEFAULT_HIGH_WATER_MARK"
    const double ACCEPT_RETRY_DELAY "CPPNP_ACCEPT_RETRY_DELAY"
    const double ACCEPT_LOG_INTERVAL "CPPNP_ACCEPT_LOG_INTERVAL"
    const double LOOP_SLICE "CPPNP_LOOP_SLICE"
    const double WORKER_SLICE "CPPNP_WORKER_SLICE"
    const double WAKE_STALL "CPPNP_WAKE_STALL"
    const double MIN_INTERVAL "CPPNP_MIN_INTERVAL"
    const double IO_START_TIMEOUT "CPPNP_IO_START_TIMEOUT"
    const double IO_JOIN_TIMEOUT "CPPNP_IO_JOIN_TIMEOUT"
    size_t grown_capacity "cppnp_grown_capacity"(size_t cap) noexcept nogil
