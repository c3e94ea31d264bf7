/* A set of int64 ids (> 0): open addressing with linear probing and backward-shift
 * deletion (no tombstones).  Used by the timer queue to know which timer ids are live
 * without a Python object per timer.  Not thread-safe: the loop thread owns it. */
#ifndef CPPNP_ID_SET_H
#define CPPNP_ID_SET_H
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int64_t *slots;     /* 0 = empty */
    size_t mask;        /* capacity - 1 (capacity is a power of two) */
    size_t count;
} cppnp_id_set;

static inline size_t cppnp_id_hash(int64_t id, size_t mask) {
    uint64_t x = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(x >> 17) & mask;
}

static inline void cppnp_id_set_free(cppnp_id_set *s) {
    free(s->slots);
    s->slots = NULL;
    s->mask = 0;
    s->count = 0;
}

static int cppnp_id_set_grow(cppnp_id_set *s) {
    size_t cap = s->slots ? (s->mask + 1) * 2 : 64, i;
    int64_t *slots = (int64_t *)calloc(cap, sizeof(int64_t));
    if (!slots) return -1;
    for (i = 0; s->slots && i <= s->mask; i++) {
        int64_t id = s->slots[i];
        if (id) {
            size_t j = cppnp_id_hash(id, cap - 1);
            while (slots[j]) j = (j + 1) & (cap - 1);
            slots[j] = id;
        }
    }
    free(s->slots);
    s->slots = slots;
    s->mask = cap - 1;
    return 0;
}

/* Returns 1 if added, 0 if present, -1 on out of memory. */
static inline int cppnp_id_set_add(cppnp_id_set *s, int64_t id) {
    size_t j;
    if (!s->slots || (s->count + 1) * 4 > (s->mask + 1) * 3) {
        if (cppnp_id_set_grow(s) < 0) return -1;
    }
    j = cppnp_id_hash(id, s->mask);
    while (s->slots[j]) {
        if (s->slots[j] == id) return 0;
        j = (j + 1) & s->mask;
    }
    s->slots[j] = id;
    s->count++;
    return 1;
}

static inline int cppnp_id_set_contains(const cppnp_id_set *s, int64_t id) {
    size_t j;
    if (!s->slots) return 0;
    j = cppnp_id_hash(id, s->mask);
    while (s->slots[j]) {
        if (s->slots[j] == id) return 1;
        j = (j + 1) & s->mask;
    }
    return 0;
}

/* Returns 1 if removed, 0 if absent. */
static inline int cppnp_id_set_remove(cppnp_id_set *s, int64_t id) {
    size_t i, j, k;
    if (!s->slots) return 0;
    i = cppnp_id_hash(id, s->mask);
    while (s->slots[i] != id) {
        if (!s->slots[i]) return 0;
        i = (i + 1) & s->mask;
    }
    /* Backward-shift: move later entries of the probe run into the hole. */
    j = i;
    for (;;) {
        j = (j + 1) & s->mask;
        if (!s->slots[j]) break;
        k = cppnp_id_hash(s->slots[j], s->mask);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            s->slots[i] = s->slots[j];
            i = j;
        }
    }
    s->slots[i] = 0;
    s->count--;
    return 1;
}
#endif
