"""One request/response exchange: start_response, write(), the app's iterable.

An Exchange is made on the loop thread when a request has been fully received, runs the
application on a worker (``run``; or on the loop thread with ``threads=0``) and hands the
finished response back to the loop (``complete``), which sends it and lets the
connection read its next request.  Requests of one connection are answered one at a
time, in order.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import threading
import time
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from cppnp.wsgi.http import HttpConn

__all__ = ["ClientGone", "Exchange", "FileWrapper", "error_response"]

log = logging.getLogger("cppnp.wsgi")
access_log = logging.getLogger("cppnp.wsgi.access")

# Response framing.
F_NONE = 0  # no body (HEAD, 1xx, 204, 304)
F_LENGTH = 1  # Content-Length
F_CHUNKED = 2  # Transfer-Encoding: chunked (HTTP/1.1, length unknown)
F_CLOSE = 3  # delimited by closing the connection (HTTP/1.0, length unknown)

# Response headers the server owns: the app's are dropped (PEP 3333: no hop-by-hop headers
# from applications); ``Connection: close`` from the app is honoured.
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    )
)
# Header names that need a look at the start of a line of the lowercased header block.
_SPECIAL_RE = re.compile(
    r"^(?:content-length|connection|transfer-encoding|keep-alive|te|"
    r"trailer|upgrade|proxy-connection):",
    re.M,
)
# A body this large is sent in its own send() instead of being copied behind the headers.
_JOIN_LIMIT = 1 << 16
# A loop-side pump (threads=0 iterables, sendfile) yields to other connections after this
# many steps.
_PUMP_TURNS = 16
_SENDFILE_MAX = 1 << 21

_REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def error_response(code: int, date_line: str, close: bool = True) -> bytes:
    """A complete plain-text response for a server-generated status."""
    reason = _REASONS.get(code, "Error")
    body = ("%d %s\n" % (code, reason)).encode("ascii")
    head = (
        "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: %d\r\n%s%s\r\n\r\n"
        % (code, reason, len(body), "Connection: close\r\n" if close else "", date_line)
    )
    return head.encode("latin-1") + body


# Bound of the head cache, (status, *headers) -> _head_info() of them, kept per loop
# (LoopState.heads: a shared dict with tuple keys would be locked on every lookup on
# free-threaded CPython); cleared when full.
_MAX_HEADS = 256


def _head_info(status: str, headers: list[tuple[str, str]]) -> tuple[bytes, int | None, bool, bool]:
    """The app's part of a response head: (status line and headers encoded, the app's
    Content-Length (None: none, -1: not a number), no body by status (1xx, 204, 304),
    the app asked for Connection: close).  Raises for a header the server cannot send."""
    nlines = len(headers)
    # One C-level pass: ": ".join raises TypeError for a name or value that is not str.
    text = "\r\n".join(map(": ".join, headers))
    cl_text = None
    app_close = False
    if text:
        low = text.lower()
        m = _SPECIAL_RE.search(low)
        if m is not None:
            if m.group() == "content-length:" and _SPECIAL_RE.search(low, m.end()) is None:
                end = text.find("\r\n", m.end())
                cl_text = text[m.end() : end if end >= 0 else len(text)].strip()
            else:
                text, cl_text, nlines, app_close = _filter_headers(headers)
        if text:
            text += "\r\n"
    head = "HTTP/1.1 " + status + "\r\n" + text
    # Every CR and LF must be one of ours: a header smuggling in a line fails here.
    lines = nlines + 1
    if head.count("\n") != lines or head.count("\r") != lines:
        raise ValueError("a response header contains CR or LF")
    code = status[:3]
    no_body = code[0] == "1" or code == "204" or code == "304"
    cl = None if cl_text is None else int(cl_text) if cl_text.isdigit() else -1
    return head.encode("latin-1"), cl, no_body, app_close


def _filter_headers(headers: list[tuple[str, str]]) -> tuple[str, str | None, int, bool]:
    """The app's headers without the hop-by-hop ones; its Content-Length; whether it asked
    for Connection: close."""
    parts = []
    cl = None
    close = False
    for name, value in headers:
        lname = name.lower()
        if lname == "content-length":
            cl = value.strip()
        elif lname in _HOP_BY_HOP:
            if lname == "connection" and "close" in value.lower():
                close = True
            continue
        parts.append(name + ": " + value)
    return "\r\n".join(parts), cl, len(parts), close


def _app_cl(headers: list[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return value.strip()
    return None


class ClientGone(Exception):
    """The client closed, or stopped reading for longer than the send timeout."""


class FileWrapper:
    """wsgi.file_wrapper: iterates *filelike* in *blksize* blocks.

    Returned by an app, a wrapper around a regular file is sent with os.sendfile from the
    loop thread (bytes go from the page cache to the socket without passing through
    Python); anything else is read and sent block by block.
    """

    __slots__ = ("blksize", "filelike")

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Any:
        read = self.filelike.read
        size = self.blksize
        while True:
            data = read(size)
            if not data:
                return
            yield data

    def close(self) -> None:
        """Close the wrapped file (PEP 3333: the server calls it).  Thread-safe."""
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError("the application must produce bytes, not %s" % type(chunk).__name__)


class Exchange:
    """One request and its response (see the module docstring)."""

    __slots__ = (
        "_file",
        "_it",
        "_result",
        "abort",
        "conn",
        "env",
        "framing",
        "head",
        "headers",
        "headers_sent",
        "http11",
        "keep_alive",
        "out",
        "remaining",
        "sent",
        "st",
        "started",
        "status",
    )

    def __init__(
        self, st: HttpConn, env: dict[str, Any], keep_alive: bool, head: bool, http11: bool
    ) -> None:
        self.st = st
        self.conn = st.conn
        self.env = env
        self.keep_alive = keep_alive
        self.head = head
        self.http11 = http11
        self.status: str | None = None
        self.headers: list[tuple[str, str]] | None = None
        self.headers_sent = False
        self.framing = F_NONE
        self.remaining = 0
        self.sent = 0
        self.out: bytes | None = None
        self.abort = False
        self._result: Any = None
        self._it: Any = None
        self._file: Any = None
        self.started = 0.0

    # -- the WSGI callables -------------------------------------------------------------

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        """PEP 3333 start_response.  The app's thread (a worker, or the loop)."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        if type(status) is not str:
            raise TypeError("status must be a str, got %s" % type(status).__name__)
        if len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
            raise ValueError("status must look like '200 OK', got %r" % (status,))
        if type(headers) is not list:
            raise TypeError("headers must be a list, got %s" % type(headers).__name__)
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable returned by start_response.  The app's thread."""
        if self.status is None:
            raise AssertionError("write() called before start_response()")
        if type(data) is not bytes:
            data = _as_bytes(data)
        if data:
            self._write_body(data, False)

    # -- building the response ----------------------------------------------------------

    def _build_head(self, body_len: int | None) -> bytes:
        """Commit the status line and headers; choose the framing."""
        status = self.status
        if status is None:
            raise RuntimeError("the application returned without calling start_response()")
        headers = self.headers
        assert headers is not None
        # The app's part of the head (status line, its headers checked, filtered and
        # encoded) is cached by content: most apps send the same few heads again and again.
        try:
            key: Any = (status, *headers)
            heads = self.st.server.heads  # per loop (see LoopState)
            info = heads.get(key)
        except TypeError:  # an unhashable header: the slow path says what is wrong
            key = None
            info = None
        if info is None:
            info = _head_info(status, headers)
            if key is not None:
                if len(heads) >= _MAX_HEADS:
                    heads.clear()
                heads[key] = info
        block, cl, no_body, app_close = info
        if app_close:
            self.keep_alive = False
        extra = b""
        if self.head or no_body:
            self.framing = F_NONE
            if self.head and cl is None and body_len is not None and not no_body:
                extra = b"Content-Length: %d\r\n" % body_len
        elif cl is not None:
            if cl < 0:
                raise ValueError(
                    "invalid Content-Length from the application: %r" % (_app_cl(headers),)
                )
            self.framing = F_LENGTH
            self.remaining = cl
            if body_len is not None and body_len < cl:
                # The body is shorter than declared: close so the client sees the end.
                self.keep_alive = False
        elif body_len is not None:
            extra = b"Content-Length: %d\r\n" % body_len
            self.framing = F_LENGTH
            self.remaining = body_len
        elif self.http11:
            extra = b"Transfer-Encoding: chunked\r\n"
            self.framing = F_CHUNKED
        else:
            self.framing = F_CLOSE
            self.keep_alive = False
        if self.keep_alive:
            if self.st.server.draining:
                self.keep_alive = False
                extra += b"Connection: close\r\n"
            elif not self.http11:
                extra += b"Connection: keep-alive\r\n"
        else:
            extra += b"Connection: close\r\n"
        self.headers_sent = True
        if extra:
            return block + extra + self.st.server.date_end
        return block + self.st.server.date_end

    def _frame(self, chunk: bytes) -> bytes:
        framing = self.framing
        if framing == F_LENGTH:
            left = self.remaining
            if len(chunk) >= left:
                chunk = chunk[:left]
            self.remaining = left - len(chunk)
            return chunk
        if framing == F_CHUNKED:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if framing == F_CLOSE:
            return chunk
        return b""

    def _write_body(self, chunk: bytes, defer_last: bool) -> None:
        """Send one body chunk (the headers with the first).  *defer_last*: if the chunk
        completes a Content-Length body, keep it for the final hand-off to the loop."""
        if not self.headers_sent:
            data = self._build_head(None)
            if self.framing != F_NONE:
                body = self._frame(chunk)
                if len(body) < _JOIN_LIMIT:
                    data += body
                else:
                    self.sent += len(data)
                    self._send(data)
                    data = body
        else:
            if self.framing == F_LENGTH and self.remaining == 0:
                return  # beyond the declared Content-Length: dropped
            data = self._frame(chunk)
        if not data:
            return
        self.sent += len(data)
        if defer_last and self.framing == F_LENGTH and self.remaining == 0 and self.out is None:
            self.out = data
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        st = self.st
        conn = self.conn
        if not conn.connected:
            raise ClientGone("the client closed the connection")
        conn.send(data)
        st.sent_total += len(data)
        if st.server.pool is not None and st.sent_total - conn.bytes_sent > st.server.send_buffer:
            self._wait_drain()

    def _wait_drain(self) -> None:
        """A worker streaming faster than the client reads: wait (GIL released) until the
        connection's queued output drains, at most send_timeout without progress."""
        st = self.st
        conn = self.conn
        server = st.server
        low = server.send_buffer // 2
        timeout = server.send_timeout
        event = st.drained
        if event is None:
            event = st.drained = threading.Event()
        last = conn.bytes_sent
        deadline = time.monotonic() + timeout
        try:
            while True:
                event.clear()
                st.want_drain = True
                if not conn.connected:
                    raise ClientGone("the client closed the connection")
                sent = conn.bytes_sent
                if st.sent_total - sent <= low:
                    return
                now = time.monotonic()
                if sent != last:
                    last = sent
                    deadline = now + timeout
                elif now >= deadline:
                    try:
                        server.loop.queue_in_loop(st.drop)
                    except RuntimeError:
                        pass
                    raise ClientGone("the client read nothing for %.3g s" % timeout)
                # Woken by on_write_complete; the timeout bounds a missed wake-up.
                event.wait(min(0.25, max(deadline - now, 0.001)))
        finally:
            st.want_drain = False

    # -- running the application --------------------------------------------------------

    def run(self) -> None:
        """Call the app and produce the response.  A worker (the loop with threads=0)."""
        # No local reference to the connection's state: a traceback the app keeps (logged,
        # or in an error tracker) holds this frame, and release() clears self.st.
        server = self.st.server
        result = None
        handed_off = False
        if server.access_log:
            self.started = time.monotonic()
        try:
            result = server.app(self.env, self.start_response)
            rtype = type(result)
            if (rtype is list or rtype is tuple) and not self.headers_sent:
                if len(result) == 1:
                    body = result[0]
                    if type(body) is not bytes:
                        body = _as_bytes(body)
                else:
                    body = b"".join(result)
                head = self._build_head(len(body))
                if self.framing == F_NONE:
                    out = head
                else:
                    if self.framing == F_LENGTH and len(body) != self.remaining:
                        body = body[: self.remaining]
                    self.remaining = 0
                    if len(body) < _JOIN_LIMIT:
                        out = head + body
                    else:
                        self._send(head)
                        out = body
                self.sent += len(out)
                self.out = out
            elif rtype is FileWrapper and server.sendfile and self._prepare_sendfile(result):
                handed_off = True
            elif server.pool is None:
                # threads=0: pull the iterable on the loop thread as the socket drains.
                self._result = result
                self._it = iter(result)
                handed_off = True
                self._pump()
                return
            else:
                self._stream(result)
        except ClientGone as exc:
            self.abort = True
            log.debug("%s: response abandoned: %s", self.conn.name, exc)
        except Exception:
            self._app_error()
        finally:
            if not handed_off and type(result) is not list and hasattr(result, "close"):
                self._close_result(result)
        if server.access_log:
            self._log_access()
        if server.pool is None:
            self.complete()
        else:
            try:
                server.loop.queue_in_loop(self.complete)
            except RuntimeError:
                pass  # the loop is closed: the process is stopping

    def _stream(self, result: Iterable[bytes]) -> None:
        for chunk in result:
            if type(chunk) is not bytes:
                chunk = _as_bytes(chunk)
            if chunk:
                self._write_body(chunk, True)
                if self.framing == F_NONE:
                    break  # HEAD, 204, 304: the body is not sent, stop producing it
        self._end_body()

    def _end_body(self) -> None:
        if not self.headers_sent:
            head = self._build_head(0)
            self.out = head
            self.sent += len(head)
        elif self.framing == F_CHUNKED:
            self.out = b"0\r\n\r\n" if self.out is None else self.out + b"0\r\n\r\n"
        elif self.framing == F_LENGTH and self.remaining > 0:
            self.keep_alive = False  # short body: the close tells the client
            self.abort = True

    def _close_result(self, result: Any) -> None:
        try:
            result.close()
        except Exception:
            log.error(
                "%s: the application iterable's close() raised\n%s",
                self.conn.name,
                traceback.format_exc().rstrip(),
            )

    def _app_error(self) -> None:
        # The traceback is logged as text: a record holding the live traceback would keep
        # the frames, and through them the connection, alive as long as the record.
        log.error(
            "%s: exception in the WSGI application (%s %s)\n%s",
            self.conn.name,
            self.env.get("REQUEST_METHOD"),
            self.env.get("REQUEST_URI"),
            traceback.format_exc().rstrip(),
        )
        if not self.headers_sent:
            self.status = "500 Internal Server Error"
            self.out = error_response(500, self.st.server.date_line, not self.keep_alive)
            self.sent = len(self.out)
        else:
            self.abort = True  # the response had started: close the connection

    def _log_access(self) -> None:
        env = self.env
        try:
            access_log.info(
                '%s - - [%s] "%s %s %s" %s %d "%s" "%s" %.6f',
                env.get("REMOTE_ADDR", "-"),
                time.strftime("%d/%b/%Y:%H:%M:%S %z"),
                env.get("REQUEST_METHOD"),
                env.get("REQUEST_URI"),
                env.get("SERVER_PROTOCOL"),
                (self.status or "-")[:3],
                self.sent,
                env.get("HTTP_REFERER", "-"),
                env.get("HTTP_USER_AGENT", "-"),
                time.monotonic() - self.started,
            )
        except Exception:
            pass

    # -- loop side ----------------------------------------------------------------------

    def complete(self) -> None:
        """Send what is left of the response and move the connection on.  Loop thread only."""
        st = self.st
        out = self.out
        if out is not None:
            self.out = None
            if self.conn.connected:
                self.conn.send(out)
                st.sent_total += len(out)
        if self.abort:
            self.conn.force_close()
            self.abandon()
            st.response_done(self, False)
            return
        if self._file is not None:
            self._pump_file()
            return
        st.response_done(self, self.keep_alive)

    def _pump(self) -> None:
        """threads=0: pull the app's iterable while the connection's output is below the
        high-water mark; resume from on_write_complete.  Loop thread only."""
        st = self.st
        conn = self.conn
        limit = st.server.send_buffer
        turns = 0
        try:
            while True:
                if not conn.connected:
                    raise ClientGone("the client closed the connection")
                if conn.output_bytes > limit:
                    st.pump = self._pump
                    return
                if turns >= _PUMP_TURNS:
                    st.server.loop.queue_in_loop(self._pump)
                    return
                turns += 1
                try:
                    chunk = next(self._it)
                except StopIteration:
                    break
                if type(chunk) is not bytes:
                    chunk = _as_bytes(chunk)
                if chunk:
                    self._write_body(chunk, True)
                    if self.framing == F_NONE:
                        break  # HEAD, 204, 304: stop producing a body nobody gets
            self._end_body()
        except ClientGone:
            self.abort = True
        except Exception:
            self._app_error()
        self._it = None
        result, self._result = self._result, None
        if hasattr(result, "close"):
            self._close_result(result)
        if st.server.access_log:
            self._log_access()
        self.complete()

    def _prepare_sendfile(self, wrapper: FileWrapper) -> bool:
        f = wrapper.filelike
        try:
            fd = f.fileno()
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return False
            pos = f.tell() if hasattr(f, "tell") else os.lseek(fd, 0, os.SEEK_CUR)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return False
        size = max(info.st_size - pos, 0)
        head = self._build_head(size)
        if self.framing == F_LENGTH:
            length = min(size, self.remaining)
            if length < self.remaining:
                self.keep_alive = False
            self.remaining = 0
        else:
            length = 0
        self.out = head
        self.sent += len(head) + length
        self._file = [wrapper, fd, pos, length]
        return True

    def _pump_file(self) -> None:
        """Send the wrapped file with os.sendfile while the output buffer is empty (so the
        bytes stay in order); when the socket is full, one copied block goes through the
        output buffer so that on_write_complete resumes us.  Loop thread only."""
        st = self.st
        conn = self.conn
        state = self._file
        wrapper, fd, offset, left = state
        turns = 0
        ok = True
        try:
            while left > 0:
                if not conn.connected:
                    ok = False
                    break
                if conn.output_bytes:
                    st.pump = self._pump_file
                    return
                if turns >= _PUMP_TURNS:
                    st.server.loop.queue_in_loop(self._pump_file)
                    return
                turns += 1
                try:
                    n = os.sendfile(conn.fileno, fd, offset, min(left, _SENDFILE_MAX))
                except BlockingIOError:
                    data = os.pread(fd, min(left, 1 << 16), offset)
                    if not data:
                        ok = False
                        break
                    conn.send(data)
                    st.sent_total += len(data)
                    n = len(data)
                if n == 0:
                    ok = False  # the file shrank under us
                    break
                offset += n
                left -= n
                state[2] = offset
                state[3] = left
        except OSError as exc:
            log.debug("%s: sendfile failed: %s", conn.name, exc)
            ok = False
        self._file = None
        try:
            wrapper.close()
        except Exception:
            log.error(
                "%s: the file wrapper's close() raised\n%s",
                conn.name,
                traceback.format_exc().rstrip(),
            )
        if not ok:
            conn.force_close()
        st.response_done(self, ok and self.keep_alive)

    def abandon(self) -> None:
        """The connection closed while a loop-side pump owned the response.  Loop thread only."""
        if self._file is not None:
            wrapper = self._file[0]
            self._file = None
            try:
                wrapper.close()
            except Exception:
                log.error("the file wrapper's close() raised\n%s", traceback.format_exc().rstrip())
        if self._it is not None:
            self._it = None
            result, self._result = self._result, None
            if hasattr(result, "close"):
                self._close_result(result)
