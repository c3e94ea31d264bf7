"""HTTP/1.x on the loop thread: one HttpConn per TCP connection, fed by on_message.

The request line and headers are parsed by httptools (llhttp) into the environ as they
arrive; the body is collected (spooled to a file past a threshold); a complete request
becomes an Exchange, queued in ``ready`` and dispatched when the previous response on the
connection is done, so responses leave strictly in request order.  Protocol errors are
answered (400, 408, 413, 414, 417, 431, 501, 505) after the responses already owed, and
the connection is then closed.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from cppnp.wsgi.body import EMPTY_INPUT, BodyCollector
from cppnp.wsgi.environ import _MAX_KEYS, header_key, split_target, valid_host
from cppnp.wsgi.response import Exchange, error_response

if TYPE_CHECKING:
    import threading

    from cppnp import TcpConnection
    from cppnp.wsgi.server import LoopState

__all__ = ["HttpConn", "Reject"]

# Connection phases (what the connection is waiting for).
P_NEW = 0  # accepted, no request byte yet (header timeout from accept)
P_IDLE = 1  # keep-alive, between requests (keep-alive timeout)
P_HEADERS = 2  # inside a request line / headers (header timeout)
P_BODY = 3  # reading a request body (body timeout, reset by each chunk)
P_WAIT = 4  # a complete request is being answered (no read timeout)
P_CLOSING = 5  # answered and shut down; waiting for the peer's FIN (linger)

# Seconds a closing connection waits for the client's FIN after our output drained.
LINGER = 2.0

_SINGLE = frozenset(("HTTP_HOST", "CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_TRANSFER_ENCODING"))
# Headers that need more than a copy into the environ (checked once headers are complete).
_SPECIAL = frozenset(("CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "HTTP_EXPECT"))
# The caches of raw header names, methods and request targets are per loop (LoopState:
# keys, methods, targets): on free-threaded CPython a lookup in a dict with bytes keys
# takes the dict's lock, and io loops sharing one dict would contend for it on every
# request.  Targets: (PATH_INFO, QUERY_STRING, REQUEST_URI) of origin-form targets seen
# recently (bounded; cleared when full).
_MAX_TARGETS = 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_RESET = struct.pack("ii", 1, 0)


class Reject(Exception):
    """Raised inside a parser callback to stop parsing; HttpConn.error has the status."""


class HttpConn:
    """Per-connection HTTP state (``conn.context``).  Loop thread, except the fields an
    Exchange running on a worker reads (``server``, ``conn``, ``sent_total``, ``drained``,
    ``want_drain``); the loop and that worker never use them at the same time."""

    __slots__ = (
        "__weakref__",
        "active",
        "base",
        "body",
        "chunked",
        "closing",
        "conn",
        "deadline",
        "dispatching",
        "drained",
        "env",
        "error",
        "hbytes",
        "http11",
        "keep_alive",
        "last_host",
        "need_continue",
        "nheaders",
        "parser",
        "partial",
        "paused",
        "pending_error",
        "phase",
        "pump",
        "ready",
        "sent_total",
        "server",
        "special",
        "stall_bytes",
        "stall_since",
        "url",
        "want_drain",
    )

    def __init__(
        self, server: LoopState, conn: TcpConnection, base: dict[str, Any], parser_cls: Any
    ) -> None:
        self.server = server
        self.conn = conn
        self.base = base
        self.parser = parser_cls(self)
        self.env: dict[str, Any] | None = None
        self.url: bytes | None = None
        self.nheaders = 0
        self.hbytes = 0
        self.partial = 0
        self.special = False
        self.body: BodyCollector | None = None
        self.chunked = False
        self.keep_alive = True
        self.http11 = True
        self.phase = P_NEW
        self.deadline = server.now + server.header_timeout
        self.ready: collections.deque[Exchange] = collections.deque()
        self.active: Exchange | None = None
        self.closing = False
        self.dispatching = False
        self.paused = False
        self.need_continue = False
        self.pending_error = 0
        self.error = 0
        self.last_host: str | None = None
        self.pump: Any = None
        self.want_drain = False
        self.drained: threading.Event | None = None
        self.sent_total = 0
        self.stall_bytes = -1
        self.stall_since = 0.0

    # -- httptools callbacks (loop thread, inside feed_data) ----------------------------

    # No on_message_begin: a request starts with its first on_url (one callback less).

    def on_url(self, url: bytes) -> None:
        """httptools: (part of) the request target; the first part starts a request.
        Loop thread only."""
        if self.url is not None:
            url = self.url + url
        else:
            self.env = self.base.copy()
            self.nheaders = self.server.max_headers  # left before 431
            self.hbytes = self.server.max_header_size  # bytes left before 431
            self.special = False
            if self.phase != P_NEW and self.phase != P_HEADERS:
                self.deadline = self.server.now + self.server.header_timeout
            self.phase = P_HEADERS
        self.url = url
        if len(url) > self.server.max_request_line:
            self._fail(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        """httptools: one header field, into the environ.  Loop thread only."""
        self.nheaders -= 1
        self.hbytes -= len(name) + len(value) + 4
        if self.nheaders < 0 or self.hbytes < 0:
            self._fail(431)
        keys = self.server.keys
        key = keys.get(name)
        if key is None:
            key = header_key(name)
            if len(keys) < _MAX_KEYS:
                keys[name] = key
        if not key:
            return
        env = self.env
        assert env is not None
        if key in env:
            if key in _SINGLE:
                self._fail(400)  # several Host / Content-Length / ...: ambiguous
            env[key] += ("; " if key == "HTTP_COOKIE" else ",") + value.decode("latin-1")
        else:
            env[key] = value.decode("latin-1")
            if key in _SPECIAL:
                self.special = True

    def on_headers_complete(self) -> None:
        """httptools: check the request (RFC 9112 rules), finish the environ.
        Loop thread only."""
        env = self.env
        assert env is not None
        server = self.server
        parser = self.parser
        url = self.url or b""
        self.partial = 0
        if self.hbytes < len(url):
            self._fail(431)
        version = parser.get_http_version()
        if version == "1.1":
            self.http11 = True
            env["SERVER_PROTOCOL"] = "HTTP/1.1"
        elif version == "1.0":
            self.http11 = False
            env["SERVER_PROTOCOL"] = "HTTP/1.0"
        else:
            self.http11 = True
            self._fail(505)
        raw_method = parser.get_method()
        methods = server.methods
        method = methods.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii")
            if len(methods) < 64:
                methods[raw_method] = method
        env["REQUEST_METHOD"] = method
        self.keep_alive = parser.should_keep_alive()
        targets = server.targets
        cached = targets.get(url)
        if cached is not None:
            path, query, uri = cached
        else:
            if method == "CONNECT":
                self._fail(405)
            target = split_target(url)
            if target is None:
                self._fail(400)
            path, query, authority = target  # type: ignore[misc]
            uri = url.decode("latin-1")
            if authority is not None:
                env["HTTP_HOST"] = authority  # absolute-form: the target's authority wins
            elif url[:1] == b"/":
                if len(targets) >= _MAX_TARGETS:
                    targets.clear()
                targets[url] = (path, query, uri)
        host = env.get("HTTP_HOST")
        if host is None:
            if self.http11:
                self._fail(400)  # RFC 9112 3.2: Host is required in 1.1
        elif host != self.last_host:
            if not valid_host(host):
                self._fail(400)
            self.last_host = host
        script_name = server.script_name
        if script_name:
            if path == script_name or path.startswith(script_name + "/"):
                path = path[len(script_name) :]
            else:
                env["SCRIPT_NAME"] = ""
        env["PATH_INFO"] = path
        env["QUERY_STRING"] = query
        env["REQUEST_URI"] = env["RAW_URI"] = uri
        if not self.special:
            self.chunked = False
            self.phase = P_WAIT
            self.deadline = 0.0
            return
        te = env.get("HTTP_TRANSFER_ENCODING")
        length = 0
        if te is not None:
            if not self.http11:
                self._fail(400)  # RFC 9112 6.1: TE in 1.0 is faulty framing
            codings = te.lower().split(",")
            if codings[-1].strip() != "chunked":
                self._fail(400)  # RFC 9112 6.3: chunked must come last
            if len(codings) > 1:
                self._fail(501)  # gzip, chunked & co: not implemented
            self.chunked = True
        else:
            self.chunked = False
            cl = env.get("CONTENT_LENGTH")
            if cl is not None:
                length = int(cl)  # llhttp has checked it is all digits
                if length > server.max_body_size:
                    self._fail(413)
        expect = env.get("HTTP_EXPECT")
        if expect is not None:
            if expect.lower() != "100-continue":
                self._fail(417)
            if self.http11 and (length or self.chunked):
                if self.active is None and not self.ready:
                    self._send(_CONTINUE)
                else:
                    self.need_continue = True  # after the responses owed before it
        if length or self.chunked:
            self.phase = P_BODY
            self.deadline = 0.0 if self.need_continue else server.now + server.body_timeout
        else:
            self.phase = P_WAIT
            self.deadline = 0.0

    def on_body(self, data: bytes) -> None:
        """httptools: request body bytes.  Loop thread only."""
        body = self.body
        server = self.server
        if body is None:
            body = self.body = BodyCollector(server.spool_threshold)
        if body.size + len(data) > server.max_body_size:
            self._fail(413)
        body.add(data)
        if not self.need_continue:
            self.deadline = server.now + server.body_timeout

    def on_message_complete(self) -> None:
        """httptools: the request is complete: queue its Exchange.  Loop thread only."""
        env = self.env
        assert env is not None
        body = self.body
        if body is None:
            env["wsgi.input"] = EMPTY_INPUT
            if self.chunked:
                env["CONTENT_LENGTH"] = "0"
        else:
            env["wsgi.input"] = body.stream()
            if self.chunked:
                env["CONTENT_LENGTH"] = str(body.size)
            self.body = None
        self.ready.append(
            Exchange(self, env, self.keep_alive, env["REQUEST_METHOD"] == "HEAD", self.http11)
        )
        self.env = None
        self.url = None
        self.need_continue = False
        self.phase = P_WAIT
        self.deadline = 0.0
        if len(self.ready) >= self.server.max_pipeline and not self.paused:
            self.paused = True
            self.conn.stop_reading()

    def _fail(self, status: int) -> None:
        self.error = status
        raise Reject(status)

    # -- driving (loop thread) ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse *data*; dispatch complete requests; answer protocol errors.
        Loop thread only."""
        if self.closing:
            return  # answered and closing: input is discarded
        parser_errors = self.server.parser_errors
        try:
            self.parser.feed_data(data)
        except parser_errors[1]:  # HttpParserUpgrade: answered as a plain request
            if self.ready:
                self.ready[-1].keep_alive = False
            self.closing = True
        except parser_errors[0]:  # HttpParserError (also wraps Reject)
            self.reject(self.error or 400)
        else:
            phase = self.phase
            if phase == P_HEADERS:
                self.partial += len(data)
                if self.partial > self.server.max_header_size + self.server.max_request_line:
                    self.reject(431 if self.url is not None else 414)
            elif phase == P_IDLE or phase == P_NEW:
                # Bytes of a request that has not reached its target yet (its method, or
                # empty lines): the header timeout runs from now (from accept if new).
                if phase == P_IDLE:
                    self.deadline = self.server.now + self.server.header_timeout
                self.phase = P_HEADERS
        if self.ready and self.active is None:
            self.dispatch()

    def dispatch(self) -> None:
        """Start the next ready exchange if none is running.  Loop thread only."""
        if self.dispatching:
            return
        self.dispatching = True
        try:
            pool = self.server.pool
            while self.active is None and self.ready:
                ex = self.active = self.ready.popleft()
                if pool is not None:
                    pool.add_task(ex.run, key=self.conn)
                else:
                    ex.run()  # threads=0: the app runs here, on the loop thread
        finally:
            self.dispatching = False

    def response_done(self, ex: Exchange, keep_alive: bool) -> None:
        """The response of *ex* has been handed to the connection.  Loop thread only."""
        if self.active is ex:
            self.active = None
        inp = ex.env["wsgi.input"]
        if inp is not EMPTY_INPUT:
            try:
                inp.close()
            except Exception:
                pass
        # Drop the exchange's references to the connection: the app may keep
        # start_response (a bound method of it) alive, e.g. in a logged traceback.
        ex.st = ex.conn = ex.env = None  # type: ignore[assignment]
        if not self.conn.connected:
            return
        if not keep_alive:
            self.close()
            return
        if self.ready:
            if self.paused:
                self._resume_reading()
            self.dispatch()
            return
        if self.pending_error:
            code, self.pending_error = self.pending_error, 0
            self._send(error_response(code, self.server.date_line))
            self.close()
            return
        if self.closing or (
            self.server.draining and self.phase != P_HEADERS and self.phase != P_BODY
        ):
            self.close()
            return
        if self.paused:
            self._resume_reading()
        if self.need_continue:
            self.need_continue = False
            self._send(_CONTINUE)
            self.deadline = self.server.now + self.server.body_timeout
        if self.phase == P_WAIT:
            self.phase = P_IDLE
            self.deadline = self.server.now + self.server.keepalive_timeout

    def _resume_reading(self) -> None:
        if self.paused and len(self.ready) < self.server.max_pipeline // 2 + 1:
            self.paused = False
            self.conn.start_reading()

    def reject(self, status: int) -> None:
        """Answer a protocol error after the responses owed, then close.
        Loop thread only."""
        self.closing = True
        if self.body is not None:
            self.body.discard()
            self.body = None
        if self.active is None and not self.ready:
            self._send(error_response(status, self.server.date_line))
            self.close()
        else:
            self.pending_error = status

    def close(self) -> None:
        """Half-close once the output is written; keep reading (and discarding) until the
        client closes, at most LINGER seconds, so that it reads our last response instead
        of getting a reset.  Loop thread only."""
        self.closing = True
        if self.phase != P_CLOSING:
            self.phase = P_CLOSING
            self.deadline = self.server.now + LINGER
            if self.paused:
                self.paused = False
                self.conn.start_reading()
            self.conn.shutdown()

    def _send(self, data: bytes) -> None:
        self.conn.send(data)
        self.sent_total += len(data)

    def drop(self) -> None:
        """Close with a reset: a client that stopped reading must not keep the kernel
        delivering the queued response for minutes.  Loop thread only."""
        conn = self.conn
        if conn.connected:
            try:
                with socket.socket(fileno=os.dup(conn.fileno)) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            conn.force_close()

    def on_deadline(self, now: float) -> None:
        """The sweep found this connection past its deadline.  Loop thread only."""
        phase = self.phase
        self.deadline = 0.0
        if phase == P_CLOSING:
            if self.conn.output_bytes:
                self.deadline = now + LINGER  # still writing: the send timeout watches
            else:
                self.conn.force_close()
        elif phase == P_HEADERS or phase == P_BODY:
            self.reject(408)
        elif phase == P_NEW or phase == P_IDLE:
            self.closing = True
            self.close()

    def on_closed(self) -> None:
        """The connection was released (on_close).  Loop thread only."""
        self.closing = True
        self.pump = None
        if self.body is not None:
            self.body.discard()
            self.body = None
        if self.active is not None:
            self.active.abandon()
        for ex in self.ready:
            inp = ex.env.get("wsgi.input")
            if inp is not EMPTY_INPUT and inp is not None:
                inp.close()
        self.ready.clear()
        if self.drained is not None:
            self.drained.set()
