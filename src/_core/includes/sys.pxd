# Atomics and the monotonic clock, from cppnp_sys.h.
from libc.stdint cimport int32_t, int64_t

cdef extern from "cppnp_sys.h" nogil:
    int64_t cppnp_atomic_load(int64_t* p)
    void cppnp_atomic_store(int64_t* p, int64_t v)
    int64_t cppnp_atomic_add(int64_t* p, int64_t v)
    bint cppnp_atomic_cas(int64_t* p, int64_t expected, int64_t desired)
    int32_t cppnp_atomic_load32(int32_t* p)
    void cppnp_atomic_store32(int32_t* p, int32_t v)
    bint cppnp_atomic_cas32(int32_t* p, int32_t expected, int32_t desired)
    int64_t cppnp_relaxed_load(int64_t* p)
    void cppnp_relaxed_store(int64_t* p, int64_t v)
    void cppnp_counter_add(int64_t* p, int64_t v)
    double cppnp_monotonic()
