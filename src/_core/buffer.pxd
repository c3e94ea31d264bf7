# Buffer: muduo's Buffer (muduo/net/Buffer.h) in C memory.
#
# | prependable bytes |  readable bytes  |  writable bytes  |
# |                   |     (CONTENT)    |                  |
# 0      <=       _reader     <=     _writer      <=      _cap
#
# Storage comes from PyMem_RawMalloc (C memory that needs no GIL to be touched).
# Storage is allocated lazily (an idle connection owns no buffer memory).  While a
# memoryview of the buffer is exported, storage is never freed or moved by a realloc: a
# grow copies to a new block and parks the old one until the last export is released.
from libc.stdint cimport uint32_t


from libc.stdint cimport uint64_t


# The unsigned integer of *width* (1..8) bytes at *p*, big- or little-endian.
cdef inline uint64_t load_uint(const unsigned char* p, Py_ssize_t width,
                               bint big) noexcept nogil:
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    if big:
        for i in range(width):
            v = (v << 8) | p[i]
    else:
        for i in range(width - 1, -1, -1):
            v = (v << 8) | p[i]
    return v


cdef class Buffer:
    cdef:
        char* _data
        size_t _cap
        size_t _reader
        size_t _writer
        void** _orphans           # blocks replaced while exported, freed on last release
        size_t _n_orphans
        int _exports              # memoryviews exported (int: keeps Buffer at 80 bytes)
        bint _initialized         # __init__ ran: it runs once

    cdef inline size_t readable(self) noexcept nogil:
        return self._writer - self._reader

    cdef inline char* begin_read(self) noexcept nogil:
        return self._data + self._reader

    cdef int ensure_writable(self, size_t n) except -1
    cdef int _make_room(self, size_t gap, size_t n) except -1
    cdef int _relocate(self, size_t newcap, size_t gap) except -1
    cdef int _park(self, void* block) except -1
    cdef int append_ptr(self, const char* p, size_t n) except -1
    cdef int consume(self, size_t n) except -1
    cdef uint32_t _int32_at_front(self, str method) except? 0
    cdef int clear(self) except -1
    # The one search (find, find_crlf, find_eol, readline): see buffer.pyx.
    cdef Py_ssize_t _find(self, const char* sub, size_t m, Py_ssize_t start,
                          str name) except -2
    cdef int release_storage(self) except -1
    # One readv() into the writable region plus a 64 KiB stack spill area, on a
    # non-blocking fd.  Returns bytes read, 0 on EOF, -1 with *err set.
    cdef Py_ssize_t read_fd(self, int fd, int* err) except -2
    # One send(MSG_NOSIGNAL) of the readable region; consumes what was written.
    cdef Py_ssize_t write_fd(self, int fd, int* err) except -2
    # A pointer to *width* readable bytes at *offset*; ValueError naming *name* if short.
    cdef const unsigned char* _int_at(self, Py_ssize_t offset, Py_ssize_t width,
                                      str name) except NULL
