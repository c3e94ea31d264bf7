# cython: language_level=3, embedsignature=True
"""Framing codecs: length-prefixed frames and delimited lines, scanned in C.

One mechanism: ``on_message`` walks the connection's input Buffer in one C loop, decodes
each header (or finds each delimiter with memchr/memmem), copies each complete frame into
a ``bytes`` and calls the user's ``on_frame(conn, frame)``; an incomplete frame stays in
the Buffer for the next read.  A frame over the limit is a protocol error: logged, counted,
the input discarded and the connection force-closed, so the Buffer never grows past
``limit + header + one read``.  ``encode``/``send`` build header + payload as one bytes, so
one ``conn.send`` per frame and concurrent worker sends never interleave.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t

from _core.buffer cimport Buffer, load_uint
from _core.event_loop cimport EventLoop
from _core.includes.consts cimport MAX_HEADER
from _core.includes.linux cimport memchr, memcpy, memmem
from _core.includes.sys cimport cppnp_atomic_add, cppnp_atomic_load

import logging

_logger = logging.getLogger("cppnp")


cdef inline object _as_bytes_like(object data):
    if isinstance(data, str):
        return (<str>data).encode("utf-8")
    return data


@cython.auto_pickle(False)
cdef class _FrameCodec:
    """Shared state of the codecs: the user's handler, counters, error path."""

    def __cinit__(self, handler, *args, **kwargs):
        on_frame = getattr(handler, "on_frame", None)
        if on_frame is None or not callable(on_frame):
            raise TypeError("the codec's handler must define on_frame(conn, frame), got %r"
                            % (type(handler).__name__,))
        self._handler = handler
        self._on_frame = on_frame

    @property
    def frames_received(self):
        """How many complete frames were passed to on_frame.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._frames)

    @property
    def protocol_errors(self):
        """How many connections were closed for a protocol error.

        Thread-safe.
        """
        return cppnp_atomic_load(&self._errors)

    @property
    def handler(self):
        """The wrapped frame handler (what ``on_frame`` is called on).

        Thread-safe.
        """
        return self._handler

    cdef int _protocol_error(self, object conn, Buffer buf, str why) except -1:
        buf.clear()                 # never buffer (or log) the rest of a broken stream
        try:
            # repr(conn), not conn: a LogRecord must not keep the connection alive.
            _logger.warning("%s: protocol error on %s: %s; closing the connection",
                            type(self).__name__, repr(conn), why)
        except Exception:
            pass
        cppnp_atomic_add(&self._errors, 1)      # after the log: who sees it finds the record
        conn.force_close()
        return 0


@cython.auto_pickle(False)
cdef class LengthFieldCodec(_FrameCodec):
    """Frames prefixed with their payload length: ``header | payload``.

    The header is *header_bytes* (1..8) bytes, *byteorder* ``"big"`` or ``"little"``, and
    counts the payload only (muduo's LengthHeaderCodec with the defaults).  A header
    above *max_frame* (or above what the header can express) closes the connection.
    """

    def __init__(self, handler, *, Py_ssize_t header_bytes=4, str byteorder="big",
                 max_frame=16 * 1024 * 1024):
        cdef uint64_t header_max
        if header_bytes < 1 or header_bytes > MAX_HEADER:
            raise ValueError("header_bytes must be 1..8, got %d" % header_bytes)
        if byteorder not in ("big", "little"):
            raise ValueError("byteorder must be 'big' or 'little', got %r" % (byteorder,))
        if not isinstance(max_frame, int) or max_frame < 0:
            raise ValueError("max_frame must be an int >= 0, got %r" % (max_frame,))
        header_max = <uint64_t>-1 if header_bytes == 8 else \
            ((<uint64_t>1) << (8 * header_bytes)) - 1
        # A header can say at most header_max; a length with the top bit of a 4- or 8-byte
        # header set reads as negative in the usual signed-int header, so cap below it.
        if header_bytes >= 4:
            header_max >>= 1
        self._header_bytes = header_bytes
        self._byteorder = byteorder
        self._big = byteorder == "big"
        self._max_frame = min(max_frame, header_max)

    @property
    def header_bytes(self):
        """Bytes in the length header (1..8).

        Thread-safe.
        """
        return self._header_bytes

    @property
    def byteorder(self):
        """Byte order of the length header: ``"big"`` or ``"little"``.

        Thread-safe.
        """
        return self._byteorder

    @property
    def max_frame(self):
        """The largest payload accepted, in bytes (larger is a protocol error).

        Thread-safe.
        """
        return self._max_frame

    def on_message(self, conn, Buffer buf not None):
        """Pass every complete frame in *buf* to ``handler.on_frame(conn, payload)``.

        Called by the connection; leaves an incomplete frame in the Buffer, which belongs
        to the loop thread that passes it.

        Loop thread only.
        """
        cdef size_t hb = self._header_bytes
        cdef size_t avail
        cdef uint64_t length
        cdef const unsigned char* p
        while True:
            avail = buf._writer - buf._reader
            if avail < hb:
                return
            p = <const unsigned char*>(buf._data + buf._reader)
            length = load_uint(p, hb, self._big)
            if length > self._max_frame:
                if hb >= 4 and (length >> (8 * hb - 1)) & 1:
                    why = "negative frame length (header 0x%x)" % length
                else:
                    why = "frame length %d exceeds max_frame %d" % (length, self._max_frame)
                self._protocol_error(conn, buf, why)
                return
            if avail - hb < length:
                return
            self._deliver_and_consume(conn, buf, <const char*>p + hb, length, hb + length)

    cdef int _deliver_and_consume(self, object conn, Buffer buf, const char* p, size_t n,
                                  size_t total) except -1:
        frame = PyBytes_FromStringAndSize(p, n)
        buf.consume(total)
        cppnp_atomic_add(&self._frames, 1)
        try:
            self._on_frame(conn, frame)
        except Exception:
            (<EventLoop?>conn.loop).report_error("on_frame of %r" % (conn,))
        return 0

    def encode(self, payload):
        """Return ``header + payload`` as one bytes (*payload*: bytes-like or str).

        ValueError if the payload is longer than ``max_frame``.

        Thread-safe.
        """
        cdef Py_buffer view
        cdef size_t hb = self._header_bytes
        cdef uint64_t n
        cdef size_t i
        cdef unsigned char* q
        payload = _as_bytes_like(payload)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n > self._max_frame:
                raise ValueError("payload of %d bytes exceeds max_frame %d"
                                 % (n, self._max_frame))
            out = PyBytes_FromStringAndSize(NULL, hb + n)
            q = <unsigned char*>PyBytes_AS_STRING(out)
            for i in range(hb):
                if self._big:
                    q[hb - 1 - i] = <unsigned char>((n >> (8 * i)) & 0xff)
                else:
                    q[i] = <unsigned char>((n >> (8 * i)) & 0xff)
            if n:
                memcpy(q + hb, view.buf, n)
        finally:
            PyBuffer_Release(&view)
        return out

    def send(self, conn, payload):
        """Send *payload* as one frame on *conn*: one ``conn.send(header + payload)``.

        Like ``conn.send``: never blocks, frames from concurrent threads never interleave,
        a send after close is dropped and counted on the connection.  ValueError if the
        payload is longer than ``max_frame``.

        Thread-safe.
        """
        conn.send(self.encode(payload))

    def __repr__(self):
        return "<LengthFieldCodec header_bytes=%d %s max_frame=%d>" % (
            self._header_bytes, self._byteorder, self._max_frame)


@cython.auto_pickle(False)
cdef class LineCodec(_FrameCodec):
    """Lines ended by *delimiter* (any non-empty bytes; ``b"\\r\\n"`` for text protocols).

    ``on_frame`` receives each line without its delimiter.  A line longer than *max_line*
    bytes (delimiter excluded), or *max_line* bytes arriving with no delimiter, closes the
    connection.
    """

    def __init__(self, handler, *, delimiter=b"\n", Py_ssize_t max_line=64 * 1024):
        delimiter = bytes(_as_bytes_like(delimiter))
        if len(delimiter) == 0:
            raise ValueError("delimiter must not be empty")
        if max_line < 0:
            raise ValueError("max_line must be >= 0, got %d" % max_line)
        self._delimiter = delimiter
        self._max_line = max_line

    @property
    def delimiter(self):
        """The line delimiter (bytes).

        Thread-safe.
        """
        return self._delimiter

    @property
    def max_line(self):
        """The longest line accepted, delimiter excluded (longer is a protocol error).

        Thread-safe.
        """
        return self._max_line

    def on_message(self, conn, Buffer buf not None):
        """Pass every complete line in *buf* to ``handler.on_frame(conn, line)``.

        Called by the connection; leaves a partial line in the Buffer, which belongs to
        the loop thread that passes it.

        Loop thread only.
        """
        cdef const char* d = PyBytes_AS_STRING(self._delimiter)
        cdef size_t dl = len(self._delimiter)
        cdef size_t window = <size_t>self._max_line + dl
        cdef size_t avail, scan, n
        cdef const char* p
        cdef const char* hit
        while True:
            avail = buf._writer - buf._reader
            if avail < dl:
                return
            p = buf._data + buf._reader
            scan = avail if avail < window else window
            if dl == 1:
                hit = <const char*>memchr(p, (<const unsigned char*>d)[0], scan)
            else:
                hit = <const char*>memmem(p, scan, d, dl)
            if hit == NULL:
                if avail >= window:
                    self._protocol_error(
                        conn, buf, "no delimiter within max_line %d bytes" % self._max_line)
                return
            n = hit - p
            self._deliver_line(conn, buf, p, n, n + dl)

    cdef int _deliver_line(self, object conn, Buffer buf, const char* p, size_t n,
                           size_t total) except -1:
        frame = PyBytes_FromStringAndSize(p, n)
        buf.consume(total)
        cppnp_atomic_add(&self._frames, 1)
        try:
            self._on_frame(conn, frame)
        except Exception:
            (<EventLoop?>conn.loop).report_error("on_frame of %r" % (conn,))
        return 0

    def encode(self, line):
        """Return ``line + delimiter`` as one bytes (*line*: bytes-like or str).

        ValueError if *line* contains the delimiter or is longer than ``max_line``.

        Thread-safe.
        """
        cdef Py_buffer view
        cdef const char* d = PyBytes_AS_STRING(self._delimiter)
        cdef size_t dl = len(self._delimiter)
        cdef size_t n
        cdef char* q
        line = _as_bytes_like(line)
        PyObject_GetBuffer(line, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n > <size_t>self._max_line:
                raise ValueError("line of %d bytes exceeds max_line %d" % (n, self._max_line))
            if n >= dl and memmem(view.buf, n, d, dl) != NULL:
                raise ValueError("line contains the delimiter %r" % (self._delimiter,))
            out = PyBytes_FromStringAndSize(NULL, n + dl)
            q = PyBytes_AS_STRING(out)
            if n:
                memcpy(q, view.buf, n)
            memcpy(q + n, d, dl)
        finally:
            PyBuffer_Release(&view)
        return out

    def send(self, conn, line):
        """Send *line* plus the delimiter on *conn* as one ``conn.send``.

        Like ``conn.send``: never blocks, lines from concurrent threads never interleave,
        a send after close is dropped and counted on the connection.  ValueError if *line*
        contains the delimiter or is longer than ``max_line``.

        Thread-safe.
        """
        conn.send(self.encode(line))

    def __repr__(self):
        return "<LineCodec delimiter=%r max_line=%d>" % (self._delimiter, self._max_line)
