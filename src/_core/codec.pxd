# Framing codecs (codec.pyx): a connection handler whose on_message extracts complete
# frames from the input Buffer in one C loop and calls the user's on_frame(conn, frame).

from libc.stdint cimport int64_t, uint64_t

from _core.buffer cimport Buffer


cdef class _FrameCodec:
    cdef object _handler
    cdef object _on_frame
    cdef int64_t _frames            # atomic: frames passed to on_frame
    cdef int64_t _errors            # atomic: connections closed for a protocol error

    cdef int _protocol_error(self, object conn, Buffer buf, str why) except -1


cdef class LengthFieldCodec(_FrameCodec):
    cdef Py_ssize_t _header_bytes
    cdef str _byteorder
    cdef uint64_t _max_frame
    cdef bint _big

    cdef int _deliver_and_consume(self, object conn, Buffer buf, const char* p, size_t n,
                                  size_t total) except -1


cdef class LineCodec(_FrameCodec):
    cdef bytes _delimiter
    cdef Py_ssize_t _max_line

    cdef int _deliver_line(self, object conn, Buffer buf, const char* p, size_t n,
                           size_t total) except -1
