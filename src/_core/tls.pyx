# cython: language_level=3, embedsignature=True
"""TLS for TcpConnection: ssl.SSLObject over memory BIOs, driven by the loop thread
(thread rules: see tls.pxd)."""

cimport cython
from cpython.buffer cimport PyBUF_READ
from cpython.memoryview cimport PyMemoryView_FromMemory

from _core.buffer cimport Buffer
from _core.includes.sys cimport cppnp_atomic_add, cppnp_atomic_load

import ssl as _ssl

cdef enum:
    READ_CHUNK = 65536      # how much plaintext one SSLObject.read() asks for


@cython.auto_pickle(False)
@cython.final
cdef class TlsConfig:
    """The TLS settings of one TcpServer or TcpClient (made by them, never by users)."""

    def __init__(self, context, bint server_side, server_hostname, handshake_timeout):
        """Check and keep the settings; sets OP_NO_RENEGOTIATION on *context* if the ssl
        module has it (TLS 1.2 renegotiation is refused).

        Thread-safe to construct.
        """
        if not isinstance(context, _ssl.SSLContext):
            raise TypeError("ssl must be an ssl.SSLContext, got %r"
                            % (type(context).__name__,))
        if server_hostname is not None and not isinstance(server_hostname, str):
            raise TypeError("server_hostname must be a str or None, got %r"
                            % (type(server_hostname).__name__,))
        if handshake_timeout is None or isinstance(handshake_timeout, bool) \
                or not isinstance(handshake_timeout, (int, float)) \
                or not 0 < handshake_timeout < float("inf"):
            raise ValueError("ssl_handshake_timeout must be a number of seconds > 0, got %r"
                             % (handshake_timeout,))
        if not server_side and context.check_hostname and not server_hostname:
            raise ValueError("this ssl context checks the host name: give server_hostname "
                             "(needed for a Unix socket address)")
        no_reneg = getattr(_ssl, "OP_NO_RENEGOTIATION", 0)
        if no_reneg:
            context.options |= no_reneg
        self.context = context
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.handshake_timeout = handshake_timeout

    cdef TlsSession new_session(self):
        cdef TlsSession s = TlsSession.__new__(TlsSession)
        s.config = self
        s.incoming = _ssl.MemoryBIO()
        s.outgoing = _ssl.MemoryBIO()
        s.obj = self.context.wrap_bio(
            s.incoming, s.outgoing, server_side=self.server_side,
            server_hostname=None if self.server_side else self.server_hostname)
        s.raw = Buffer()
        return s

    def counters(self):
        """``(tls_errors, handshake_timeouts)`` of this server's or client's connections.

        Thread-safe.
        """
        return (cppnp_atomic_load(&self.tls_errors),
                cppnp_atomic_load(&self.handshake_timeouts))


cdef int count_tls_error(TlsConfig config) noexcept:
    cppnp_atomic_add(&config.tls_errors, 1)
    return 0


cdef int count_handshake_timeout(TlsConfig config) noexcept:
    cppnp_atomic_add(&config.handshake_timeouts, 1)
    return 0


cdef int _write_view(object write, const char* p, Py_ssize_t n) except -1:
    """write(memoryview of p[:n]): MemoryBIO.write and SSLObject.write copy what they
    are given before they return; the view is released after, so nothing keeps *p*."""
    cdef memoryview view = PyMemoryView_FromMemory(<char*>p, n, PyBUF_READ)
    try:
        write(view)
    finally:
        view.release()
    return 0


@cython.auto_pickle(False)
@cython.final
cdef class TlsSession:
    """One connection's TLS state (loop thread only; made by TlsConfig.new_session)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("TlsSession objects are made by the core, not directly")

    cdef bint handshake(self) except -1:
        """Advance the handshake with the ciphertext fed so far.  True once complete;
        raises ssl.SSLError (a failed handshake, a certificate check)."""
        if self.handshake_done:
            return True
        try:
            self.obj.do_handshake()
        except (_ssl.SSLWantReadError, _ssl.SSLWantWriteError):
            return False
        self.handshake_done = True
        return True

    cdef int feed_raw(self) except -1:
        """Move the ciphertext read from the socket (raw) into the SSLObject (one copy:
        the BIO reads it through a memoryview of the buffer)."""
        cdef Py_ssize_t n = self.raw.readable()
        if n:
            _write_view(self.incoming.write, self.raw.begin_read(), n)
            self.raw.clear()
        return 0

    cdef int read_plain(self, Buffer out) except -1:
        """Decrypt what can be decrypted into *out*; returns the bytes added.  Sets
        peer_close_notify when the peer's close_notify arrives.  Raises ssl.SSLError."""
        cdef Py_ssize_t total = 0
        cdef bytes chunk
        while True:
            try:
                chunk = self.obj.read(READ_CHUNK)
            except (_ssl.SSLWantReadError, _ssl.SSLWantWriteError):
                break
            except _ssl.SSLZeroReturnError:
                self.peer_close_notify = True
                break
            if not chunk:
                self.peer_close_notify = True
                break
            out.append_ptr(<const char*>chunk, len(chunk))
            total += len(chunk)
        return total

    cdef int encrypt(self, const char* p, Py_ssize_t n) except -1:
        """Encrypt plaintext into the outgoing BIO (take_output() collects it); OpenSSL
        reads *p* through a memoryview, no intermediate bytes."""
        _write_view(self.obj.write, p, n)
        return 0

    cdef object take_output(self):
        """The ciphertext waiting for the peer (bytes, maybe empty)."""
        return self.outgoing.read()

    cdef int close_notify(self) except -1:
        """Queue our close_notify into the outgoing BIO (once)."""
        if self.close_notify_sent:
            return 0
        self.close_notify_sent = True
        try:
            self.obj.unwrap()
        except (_ssl.SSLWantReadError, _ssl.SSLWantWriteError):
            pass            # the peer's close_notify is not awaited: we send the FIN next
        except _ssl.SSLError:
            pass            # nothing more to say to this peer: the FIN follows
        return 0
