# cython: language_level=3, embedsignature=True
"""Buffer: a byte buffer in C memory with cheap prepend (muduo's Buffer)."""

cimport cython
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release
from cpython.buffer cimport PyObject_GetBuffer, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport int64_t, uint32_t, uint64_t

from _core.includes.linux cimport (
    EINTR, MSG_NOSIGNAL, errno, iovec, memchr, memcpy, memmem, memmove, readv, send,
)
from _core.includes.sys cimport cppnp_atomic_add, cppnp_atomic_load

from _core.includes.consts cimport CHEAP_PREPEND, EXTRA_BUF, INITIAL_SIZE

cdef int64_t _live_buffers = 0
cdef char _empty = 0


def live_buffers():
    """Return how many Buffer objects are alive (a leak check for tests).

    Thread-safe.
    """
    return cppnp_atomic_load(&_live_buffers)


cdef inline object _as_bytes_like(object data):
    if isinstance(data, str):
        return (<str>data).encode("utf-8")
    return data


cdef inline object _uint_value(const unsigned char* p, Py_ssize_t width, bint big):
    return load_uint(p, width, big)


cdef inline object _int_value(const unsigned char* p, Py_ssize_t width, bint big):
    cdef uint64_t v = load_uint(p, width, big)
    cdef uint64_t m
    if width < 8:
        m = (<uint64_t>1) << (width * 8 - 1)
        v = (v ^ m) - m                 # sign-extend
    return <int64_t>v


cdef bint _check_int_args(str name, Py_ssize_t width, object byteorder) except -1:
    if width < 1 or width > 8:
        raise ValueError("%s: width must be 1..8 bytes, got %d" % (name, width))
    if byteorder == "big":
        return True
    if byteorder == "little":
        return False
    raise ValueError("%s: byteorder must be 'big' or 'little', got %r" % (name, byteorder))


@cython.auto_pickle(False)
@cython.final
cdef class Buffer:
    """A growable byte buffer: prependable | readable | writable (muduo's Buffer).

    The loop reads socket data into a connection's input Buffer and passes it to
    ``on_message(conn, buf)``; take what you need with :meth:`retrieve_as_bytes`,
    :meth:`retrieve_all` or :meth:`peek` + :meth:`retrieve`.  Bytes you leave stay for the
    next call.  ``memoryview(buf)`` and :meth:`peek` are zero-copy read-only views of the
    readable bytes; a view's *contents* are only defined until the buffer is next changed
    (a grow never frees memory under a live view, so reading a stale view is safe, just
    meaningless).  Not thread-safe: use a Buffer from one thread at a time (the loop
    thread, for connection buffers).  "Loop thread only." on its methods means exactly
    that: the one thread that uses the buffer (the loop's, for a connection's buffers).
    """

    def __cinit__(self):
        self._data = NULL
        self._cap = 0
        self._reader = CHEAP_PREPEND
        self._writer = CHEAP_PREPEND
        self._exports = 0
        self._orphans = NULL
        self._n_orphans = 0
        cppnp_atomic_add(&_live_buffers, 1)

    def __init__(self, data=None):
        """Create a buffer, optionally holding a copy of *data* (bytes-like or str).

        ``__init__`` runs once: calling it again raises RuntimeError.
        """
        if self._initialized:
            raise RuntimeError("Buffer.__init__ called twice (use append() or a new Buffer)")
        self._initialized = True
        if data is not None:
            self.append(data)

    def __dealloc__(self):
        cdef size_t i
        for i in range(self._n_orphans):
            PyMem_RawFree(self._orphans[i])
        PyMem_RawFree(self._orphans)
        PyMem_RawFree(self._data)
        cppnp_atomic_add(&_live_buffers, -1)

    # -- C-level API (loop thread) -------------------------------------------------------

    cdef int ensure_writable(self, size_t n) except -1:
        if self._data != NULL and self._cap - self._writer >= n:
            return 0
        self._make_room(0, n)
        return 0

    cdef int _make_room(self, size_t gap, size_t n) except -1:
        """Lay the storage out as [CHEAP_PREPEND | *gap* | readable | >= *n* writable]:
        the one place the Buffer grows.  In place when the block is large enough and no
        view is exported (muduo's makeSpace), else in a larger block (capacity doubled
        from INITIAL_SIZE until it fits)."""
        cdef size_t readable = self._writer - self._reader
        cdef size_t need, newcap
        if n > (<size_t>-1) // 4 or gap > (<size_t>-1) // 4:
            raise MemoryError("Buffer cannot grow by %d bytes" % (n + gap))
        need = CHEAP_PREPEND + gap + readable + n
        if self._data != NULL and self._cap >= need and self._exports == 0:
            newcap = self._cap
        else:
            newcap = self._cap if self._cap > INITIAL_SIZE else INITIAL_SIZE
            while newcap < need:
                newcap *= 2
        return self._relocate(newcap, gap)

    cdef int _relocate(self, size_t newcap, size_t gap) except -1:
        """Move the readable bytes to CHEAP_PREPEND + *gap* in a block of *newcap* bytes
        (>= CHEAP_PREPEND + gap + readable): the one place storage is replaced.  While a
        view is exported the old block is never freed or moved under it (it is parked
        until the Buffer dies)."""
        cdef size_t readable = self._writer - self._reader
        cdef char* block
        if self._exports == 0 and self._data != NULL and newcap == self._cap:
            memmove(self._data + CHEAP_PREPEND + gap, self._data + self._reader, readable)
            block = self._data
        elif self._exports == 0 and gap == 0 and newcap >= self._writer:
            # Resize first, then move: the reader may sit inside the prepend area (after
            # a prepend), and moving the bytes up to CHEAP_PREPEND needs the larger block.
            block = <char*>PyMem_RawRealloc(self._data, newcap)
            if block == NULL:
                raise MemoryError()
            if self._reader != CHEAP_PREPEND and self._data != NULL:
                memmove(block + CHEAP_PREPEND, block + self._reader, readable)
        else:
            block = <char*>PyMem_RawMalloc(newcap)
            if block == NULL:
                raise MemoryError()
            if readable:
                memcpy(block + CHEAP_PREPEND + gap, self._data + self._reader, readable)
            if self._exports:
                try:
                    self._park(self._data)      # a view still points into it
                except BaseException:
                    PyMem_RawFree(block)
                    raise
            else:
                PyMem_RawFree(self._data)
        self._data = block
        self._cap = newcap
        self._reader = CHEAP_PREPEND
        self._writer = CHEAP_PREPEND + gap + readable
        return 0

    cdef int _park(self, void* block) except -1:
        cdef void** grown
        if block == NULL:
            return 0
        grown = <void**>PyMem_RawRealloc(self._orphans, (self._n_orphans + 1) * sizeof(void*))
        if grown == NULL:
            raise MemoryError()
        self._orphans = grown
        self._orphans[self._n_orphans] = block
        self._n_orphans += 1
        return 0

    cdef int append_ptr(self, const char* p, size_t n) except -1:
        if n == 0:
            return 0
        self.ensure_writable(n)
        # memmove: *p may be a (stale) view of this very buffer, overlapping the target.
        memmove(self._data + self._writer, p, n)
        self._writer += n
        return 0

    cdef int consume(self, size_t n) except -1:
        if n < self._writer - self._reader:
            self._reader += n
        else:
            self._reader = CHEAP_PREPEND
            self._writer = CHEAP_PREPEND
        return 0

    cdef int clear(self) except -1:
        self._reader = CHEAP_PREPEND
        self._writer = CHEAP_PREPEND
        return 0

    cdef int release_storage(self) except -1:
        """Give back the storage of an empty buffer (no views may be exported)."""
        if self._exports == 0 and self._writer == self._reader and self._data != NULL:
            PyMem_RawFree(self._data)
            self._data = NULL
            self._cap = 0
            self._reader = CHEAP_PREPEND
            self._writer = CHEAP_PREPEND
        return 0

    cdef Py_ssize_t read_fd(self, int fd, int* err) except -2:
        cdef char extrabuf[EXTRA_BUF]
        cdef iovec vec[2]
        cdef size_t writable = 0
        cdef Py_ssize_t n
        cdef int iovcnt
        if self._data != NULL:
            if self._exports == 0 and self._reader == self._writer:
                self._reader = CHEAP_PREPEND
                self._writer = CHEAP_PREPEND
            writable = self._cap - self._writer
        vec[0].iov_base = self._data + self._writer if self._data != NULL else NULL
        vec[0].iov_len = writable
        vec[1].iov_base = extrabuf
        vec[1].iov_len = EXTRA_BUF
        # With 64 KiB of spill area, one readv reads up to writable + 64 KiB: this saves
        # an ioctl(FIONREAD) per read (muduo Buffer::readFd).
        iovcnt = 2 if writable < EXTRA_BUF else 1
        # The fd is non-blocking, so readv never waits: the GIL is kept (releasing it would
        # hand it to a waiting worker in the middle of the loop's dispatch).
        while True:
            n = readv(fd, &vec[0] if writable else &vec[1], iovcnt if writable else 1)
            if n >= 0 or errno != EINTR:
                break
        if n < 0:
            err[0] = errno
            return -1
        if <size_t>n <= writable:
            self._writer += n
        else:
            self._writer = self._cap if self._data != NULL else self._writer
            self.append_ptr(extrabuf, n - writable)
        return n

    cdef Py_ssize_t write_fd(self, int fd, int* err) except -2:
        cdef Py_ssize_t n
        cdef size_t len_ = self._writer - self._reader
        cdef const char* p = self._data + self._reader
        if len_ == 0:
            return 0
        while True:        # non-blocking: never waits, so the GIL is kept (see read_fd)
            n = send(fd, p, len_, MSG_NOSIGNAL)
            if n >= 0 or errno != EINTR:
                break
        if n < 0:
            err[0] = errno
            return -1
        self.consume(n)
        return n

    # -- Python API ------------------------------------------------------------------------

    def readable_bytes(self):
        """Return how many bytes can be read.

        Loop thread only.
        """
        return self._writer - self._reader

    def writable_bytes(self):
        """Return how many bytes can be appended without growing the storage.

        Loop thread only.
        """
        return self._cap - self._writer if self._data != NULL else 0

    def prependable_bytes(self):
        """Return how many bytes can be prepended without moving data.

        Loop thread only.
        """
        return self._reader

    def __len__(self):
        return self._writer - self._reader

    def __bool__(self):
        return self._writer != self._reader

    def __repr__(self):
        return "<Buffer readable=%d capacity=%d>" % (self._writer - self._reader, self._cap)

    def peek(self):
        """Return a zero-copy read-only memoryview of the readable bytes.

        The view's contents are defined until the buffer is next modified (retrieve,
        append, or the loop reading more data); copy with ``bytes(view)`` to keep them.

        Loop thread only.
        """
        return memoryview(self)

    def retrieve(self, Py_ssize_t n):
        """Discard the first *n* readable bytes (``0 <= n <= readable_bytes()``).

        Loop thread only.
        """
        if n < 0 or <size_t>n > self._writer - self._reader:
            raise ValueError(
                "retrieve(%d) with %d readable bytes" % (n, self._writer - self._reader))
        self.consume(n)

    def retrieve_all(self):
        """Remove and return all readable bytes as ``bytes``.

        Loop thread only.
        """
        cdef size_t n = self._writer - self._reader
        if n == 0:
            return b""
        out = PyBytes_FromStringAndSize(self._data + self._reader, n)
        self.clear()
        return out

    def retrieve_as_bytes(self, Py_ssize_t n):
        """Remove and return the first *n* readable bytes as ``bytes``.

        Loop thread only.
        """
        if n < 0 or <size_t>n > self._writer - self._reader:
            raise ValueError(
                "retrieve_as_bytes(%d) with %d readable bytes" % (n, self._writer - self._reader))
        if n == 0:
            return b""
        out = PyBytes_FromStringAndSize(self._data + self._reader, n)
        self.consume(n)
        return out

    def find_crlf(self, Py_ssize_t start=0):
        """Return the offset of the first ``b"\\r\\n"`` at or after *start*, or -1.

        Loop thread only.
        """
        return self._find(b"\r\n", 2, start, "find_crlf")

    def find_eol(self, Py_ssize_t start=0):
        """Return the offset of the first ``b"\\n"`` at or after *start*, or -1.

        Loop thread only.
        """
        return self._find(b"\n", 1, start, "find_eol")

    cdef Py_ssize_t _find(self, const char* sub, size_t m, Py_ssize_t start,
                          str name) except -2:
        """The one search: offset of *sub* (*m* bytes) at or after *start* in the readable
        bytes, or -1; *start* must be in 0..readable (ValueError naming *name*)."""
        cdef size_t n = self._writer - self._reader
        cdef const char* hit
        if start < 0 or <size_t>start > n:
            raise ValueError("%s: start %d out of range 0..%d" % (name, start, n))
        if m == 0:
            return start
        if m > n - start:
            return -1
        if m == 1:
            hit = <const char*>memchr(self._data + self._reader + start,
                                      (<const unsigned char*>sub)[0], n - start)
        else:
            hit = <const char*>memmem(self._data + self._reader + start, n - start, sub, m)
        return -1 if hit == NULL else hit - (self._data + self._reader)

    def append(self, data):
        """Append a copy of *data* (a bytes-like object, or str encoded as UTF-8).

        Loop thread only.
        """
        cdef Py_buffer view
        data = _as_bytes_like(data)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self.append_ptr(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def prepend(self, data):
        """Insert a copy of *data* in front of the readable bytes (e.g. a length header).

        Loop thread only.
        """
        cdef Py_buffer view
        cdef size_t n
        data = _as_bytes_like(data)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n == 0:
                return
            if self._data != NULL and self._reader >= n:
                self._reader -= n
                memmove(self._data + self._reader, view.buf, n)     # view may alias self
                return
            # Not enough room in front: lay out [CHEAP_PREPEND | data | readable].
            self._make_room(n, 0)
            memmove(self._data + self._reader, view.buf, n)     # view may alias self
        finally:
            PyBuffer_Release(&view)

    cdef uint32_t _int32_at_front(self, str method) except? 0:
        if self._writer - self._reader < 4:
            raise ValueError("%s() needs 4 readable bytes, have %d"
                             % (method, self._writer - self._reader))
        cdef const unsigned char* p = <const unsigned char*>(self._data + self._reader)
        return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) \
            | ((<uint32_t>p[2]) << 8) | p[3]

    def peek_int32(self):
        """Return the first 4 readable bytes as a big-endian signed int (not consumed).

        Loop thread only.
        """
        return <int>self._int32_at_front("peek_int32")

    def read_int32(self):
        """Remove and return the first 4 readable bytes as a big-endian signed int.

        Loop thread only.
        """
        cdef int v = <int>self._int32_at_front("read_int32")
        self.consume(4)
        return v

    def append_int32(self, int value):
        """Append *value* as 4 big-endian bytes.

        Loop thread only.
        """
        self.append((<uint32_t>value).to_bytes(4, "big"))

    def prepend_int32(self, int value):
        """Prepend *value* as 4 big-endian bytes.

        Loop thread only.
        """
        self.prepend((<uint32_t>value).to_bytes(4, "big"))

    def shrink(self, Py_ssize_t reserve=0):
        """Shrink the storage to the readable bytes plus *reserve* (muduo Buffer::shrink).

        Loop thread only.
        """
        cdef size_t readable = self._writer - self._reader
        if reserve < 0:
            raise ValueError("reserve must be >= 0")
        if self._exports:
            raise BufferError("cannot shrink a Buffer while a memoryview of it exists")
        if readable == 0 and reserve == 0:
            self.release_storage()
            return
        self._relocate(CHEAP_PREPEND + readable + reserve, 0)

    # -- protocol helpers: search, lines, fixed-width integers (all in C, no copy) ---------

    cdef const unsigned char* _int_at(self, Py_ssize_t offset, Py_ssize_t width,
                                      str name) except NULL:
        cdef size_t n = self._writer - self._reader
        if offset < 0 or <size_t>offset > n or n - offset < <size_t>width:
            raise ValueError("%s() needs %d readable bytes at offset %d, have %d"
                             % (name, width, offset, n))
        return <const unsigned char*>(self._data + self._reader + offset)

    def find(self, sub, Py_ssize_t start=0):
        """Return the offset of the first *sub* (bytes-like) at or after *start*, or -1.

        Offsets count from the first readable byte; ``0 <= start <= readable_bytes()``
        (ValueError otherwise).  An empty *sub* is found at *start*.  One ``memmem`` over
        the readable bytes, no copy.  The Buffer belongs to the loop thread that passed it
        to on_message.

        Loop thread only.
        """
        cdef Py_buffer view
        cdef size_t n = self._writer - self._reader
        if start < 0 or <size_t>start > n:
            raise ValueError("find: start %d out of range 0..%d" % (start, n))
        PyObject_GetBuffer(sub, &view, PyBUF_SIMPLE)
        try:
            return self._find(<const char*>view.buf, view.len, start, "find")
        finally:
            PyBuffer_Release(&view)

    def readline(self, delimiter=b"\n"):
        """Remove and return the first line, *delimiter* included, as ``bytes``.

        Returns ``None`` (and consumes nothing) when the readable bytes hold no complete
        line, so ``while (line := buf.readline()) is not None:`` takes every complete line
        and leaves a partial one for the next on_message.  *delimiter* is any non-empty
        bytes-like (``b"\r\n"`` for text protocols).  No limit is applied: bound the line
        length yourself (or use ``cppnp.codec.LineCodec``).  The Buffer belongs to the
        loop thread that passed it to on_message.

        Loop thread only.
        """
        cdef Py_buffer view
        cdef Py_ssize_t at
        cdef size_t end
        PyObject_GetBuffer(delimiter, &view, PyBUF_SIMPLE)
        try:
            if view.len == 0:
                raise ValueError("readline: the delimiter must not be empty")
            at = self._find(<const char*>view.buf, view.len, 0, "readline")
            if at < 0:
                return None
            end = at + view.len
        finally:
            PyBuffer_Release(&view)
        out = PyBytes_FromStringAndSize(self._data + self._reader, end)
        self.consume(end)
        return out

    def peek_int(self, Py_ssize_t width, byteorder="big", bint signed=True,
                 Py_ssize_t offset=0):
        """Return the *width*-byte integer at *offset* (not consumed, no copy).

        *width* is in bytes, 1..8 (1, 2, 4, 8 for the usual 8/16/32/64-bit fields);
        *byteorder* is ``"big"`` (network order) or ``"little"``; *signed* selects two's
        complement.  ValueError naming the method if fewer than ``offset + width`` bytes
        are readable.  The Buffer belongs to the loop thread that passed it to on_message.

        Loop thread only.
        """
        cdef bint big = _check_int_args("peek_int", width, byteorder)
        cdef const unsigned char* p = self._int_at(offset, width, "peek_int")
        return _int_value(p, width, big) if signed else _uint_value(p, width, big)

    def read_int(self, Py_ssize_t width, byteorder="big", bint signed=True):
        """Remove and return the first *width* bytes as an integer (see :meth:`peek_int`).

        ValueError naming the method, and nothing consumed, if fewer than *width* bytes are
        readable.  The Buffer belongs to the loop thread that passed it to on_message.

        Loop thread only.
        """
        cdef bint big = _check_int_args("read_int", width, byteorder)
        cdef const unsigned char* p = self._int_at(0, width, "read_int")
        v = _int_value(p, width, big) if signed else _uint_value(p, width, big)
        self.consume(width)
        return v

    def peek_int8(self):
        """The first 1 byte as a signed int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 1, "peek_int8")
        return _int_value(p, 1, 1)

    def read_int8(self):
        """Consume the first 1 byte; return them as a signed int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 1, "read_int8")
        v = _int_value(p, 1, 1)
        self.consume(1)
        return v

    def peek_uint8(self):
        """The first 1 byte as a unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 1, "peek_uint8")
        return _uint_value(p, 1, 1)

    def read_uint8(self):
        """Consume the first 1 byte; return them as a unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 1, "read_uint8")
        v = _uint_value(p, 1, 1)
        self.consume(1)
        return v

    def peek_int16(self):
        """The first 2 bytes as a big-endian signed int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "peek_int16")
        return _int_value(p, 2, 1)

    def read_int16(self):
        """Consume the first 2 bytes; return them as a big-endian signed int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "read_int16")
        v = _int_value(p, 2, 1)
        self.consume(2)
        return v

    def peek_int16_le(self):
        """The first 2 bytes as a little-endian signed int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "peek_int16_le")
        return _int_value(p, 2, 0)

    def read_int16_le(self):
        """Consume the first 2 bytes; return them as a little-endian signed int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "read_int16_le")
        v = _int_value(p, 2, 0)
        self.consume(2)
        return v

    def peek_uint16(self):
        """The first 2 bytes as a big-endian unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "peek_uint16")
        return _uint_value(p, 2, 1)

    def read_uint16(self):
        """Consume the first 2 bytes; return them as a big-endian unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "read_uint16")
        v = _uint_value(p, 2, 1)
        self.consume(2)
        return v

    def peek_uint16_le(self):
        """The first 2 bytes as a little-endian unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "peek_uint16_le")
        return _uint_value(p, 2, 0)

    def read_uint16_le(self):
        """Consume the first 2 bytes; return them as a little-endian unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 2, "read_uint16_le")
        v = _uint_value(p, 2, 0)
        self.consume(2)
        return v

    def peek_int32_le(self):
        """The first 4 bytes as a little-endian signed int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 4, "peek_int32_le")
        return _int_value(p, 4, 0)

    def read_int32_le(self):
        """Consume the first 4 bytes; return them as a little-endian signed int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 4, "read_int32_le")
        v = _int_value(p, 4, 0)
        self.consume(4)
        return v

    def peek_uint32(self):
        """The first 4 bytes as a big-endian unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 4, "peek_uint32")
        return _uint_value(p, 4, 1)

    def read_uint32(self):
        """Consume the first 4 bytes; return them as a big-endian unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 4, "read_uint32")
        v = _uint_value(p, 4, 1)
        self.consume(4)
        return v

    def peek_uint32_le(self):
        """The first 4 bytes as a little-endian unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 4, "peek_uint32_le")
        return _uint_value(p, 4, 0)

    def read_uint32_le(self):
        """Consume the first 4 bytes; return them as a little-endian unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 4, "read_uint32_le")
        v = _uint_value(p, 4, 0)
        self.consume(4)
        return v

    def peek_int64(self):
        """The first 8 bytes as a big-endian signed int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "peek_int64")
        return _int_value(p, 8, 1)

    def read_int64(self):
        """Consume the first 8 bytes; return them as a big-endian signed int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "read_int64")
        v = _int_value(p, 8, 1)
        self.consume(8)
        return v

    def peek_int64_le(self):
        """The first 8 bytes as a little-endian signed int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "peek_int64_le")
        return _int_value(p, 8, 0)

    def read_int64_le(self):
        """Consume the first 8 bytes; return them as a little-endian signed int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "read_int64_le")
        v = _int_value(p, 8, 0)
        self.consume(8)
        return v

    def peek_uint64(self):
        """The first 8 bytes as a big-endian unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "peek_uint64")
        return _uint_value(p, 8, 1)

    def read_uint64(self):
        """Consume the first 8 bytes; return them as a big-endian unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "read_uint64")
        v = _uint_value(p, 8, 1)
        self.consume(8)
        return v

    def peek_uint64_le(self):
        """The first 8 bytes as a little-endian unsigned int, not consumed (no copy).

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "peek_uint64_le")
        return _uint_value(p, 8, 0)

    def read_uint64_le(self):
        """Consume the first 8 bytes; return them as a little-endian unsigned int.

        ValueError if fewer are readable; the Buffer belongs to the loop thread that
        passed it to on_message.

        Loop thread only.
        """
        cdef const unsigned char* p = self._int_at(0, 8, "read_uint64_le")
        v = _uint_value(p, 8, 0)
        self.consume(8)
        return v

    def __getbuffer__(self, Py_buffer* view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("Buffer views are read-only")
        cdef char* start = self._data + self._reader if self._data != NULL else &_empty
        PyBuffer_FillInfo(view, self, start, self._writer - self._reader, 1, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        cdef size_t i
        self._exports -= 1
        if self._exports == 0 and self._n_orphans:
            for i in range(self._n_orphans):
                PyMem_RawFree(self._orphans[i])
            PyMem_RawFree(self._orphans)
            self._orphans = NULL
            self._n_orphans = 0

    # -- seed/muduo-compatible names: same objects as the snake_case methods --
    readableBytes = readable_bytes
    retrieveAll = retrieve_all
    findCRLF = find_crlf
    findEOL = find_eol
