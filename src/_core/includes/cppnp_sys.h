/* Small C helpers the Cython core needs and cannot spell itself:
 * sequentially consistent atomics (the state shared between threads must not rest on the
 * GIL: cppnp is headed for free-threaded CPython) and a monotonic clock in seconds. */
#ifndef CPPNP_SYS_H
#define CPPNP_SYS_H
#include <stdint.h>
#include <time.h>

static inline int64_t cppnp_atomic_load(int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void cppnp_atomic_store(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
/* Returns the new value. */
static inline int64_t cppnp_atomic_add(int64_t *p, int64_t v) {
    return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
}
static inline int cppnp_atomic_cas(int64_t *p, int64_t expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

/* 32-bit variants, for small state fields (they keep a connection object small). */
static inline int32_t cppnp_atomic_load32(int32_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void cppnp_atomic_store32(int32_t *p, int32_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline int cppnp_atomic_cas32(int32_t *p, int32_t expected, int32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

/* Counters written by one thread (the loop) and read by any: relaxed atomics, so a reader
 * never sees a torn or stale-forever value and the writer pays no locked instruction. */
static inline int64_t cppnp_relaxed_load(int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void cppnp_relaxed_store(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
/* Single-writer increment (the caller is the only thread that writes *p). */
static inline void cppnp_counter_add(int64_t *p, int64_t v) {
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

static inline double cppnp_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif
