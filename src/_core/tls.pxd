# TLS for TcpConnection: the standard library's ssl.SSLObject over two ssl.MemoryBIOs.
# OpenSSL does the crypto; the connection's loop thread drives it.
#
# Thread rules.  TlsConfig is made once per TcpServer/TcpClient (any thread, before
# start/connect) and is read-only afterwards, except its counters (atomics, written by
# any io loop, read anywhere).  A TlsSession belongs to one connection and is used only
# on that connection's loop thread (every SSLObject call: handshake, read, write,
# unwrap); it is never touched while a core C lock is held.  Other threads only read
# TlsSession.obj (the ssl_object property: a reference, set once at creation).
from libc.stdint cimport int64_t

from _core.buffer cimport Buffer


cdef class TlsConfig:
    cdef:
        object context              # ssl.SSLContext (OP_NO_RENEGOTIATION set if known)
        bint server_side
        object server_hostname      # str or None (client side)
        double handshake_timeout    # seconds
        int64_t tls_errors          # atomics: counted by the connections' loops
        int64_t handshake_timeouts

    cdef TlsSession new_session(self)


cdef class TlsSession:
    cdef:
        TlsConfig config
        object obj                  # ssl.SSLObject
        object incoming             # ssl.MemoryBIO: ciphertext from the peer
        object outgoing             # ssl.MemoryBIO: ciphertext for the peer
        Buffer raw                  # socket reads land here, then go to incoming
        list pending                # plaintext sent before the handshake completed
        bint handshake_done
        bint close_notify_sent
        bint peer_close_notify      # the peer's close_notify was read
        int64_t timer_id            # the handshake timeout timer, 0 if none

    # Each returns / raises as documented in tls.pyx; loop thread only.
    cdef bint handshake(self) except -1
    cdef int feed_raw(self) except -1
    cdef int read_plain(self, Buffer out) except -1
    cdef int encrypt(self, const char* p, Py_ssize_t n) except -1
    cdef object take_output(self)
    cdef int close_notify(self) except -1

cdef int count_tls_error(TlsConfig config) noexcept
cdef int count_handshake_timeout(TlsConfig config) noexcept
