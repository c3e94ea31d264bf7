"""ICppnpUsr: the callback interface a server's handler implements."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from _core.handler import mark_discard, mark_noop

if TYPE_CHECKING:
    from _core.buffer import Buffer
    from _core.tcp_connection import TcpConnection

__all__ = ["ICppnpUsr"]

# The core (_core.handler) skips callbacks marked no-op instead of calling them, and
# drops input without a call while on_message is the discarding default.
_noop = mark_noop
_logger = logging.getLogger("cppnp")


class ICppnpUsr:
    """Subclass and override the callbacks you need; the rest cost nothing.

    Every callback runs on the loop thread.  Call order for one connection::

        on_connection -> [on_message | on_write_complete | on_high_water_mark]* -> on_close

    Exceptions raised by a callback are logged on the ``cppnp`` logger (stderr, with the
    traceback, if the application configured no logging) and counted in
    ``EventLoop.callback_errors``; the loop keeps serving.
    """

    __slots__ = ()

    @_noop
    def on_connection(self, conn: TcpConnection) -> None:
        """Called when a connection has been accepted, before any on_message.

        Loop thread only.
        """

    @mark_discard
    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        """Called when data arrived; *buf* holds it and everything not yet retrieved.

        Take what you need (``buf.retrieve_all()``, ``buf.retrieve_as_bytes(n)``); what
        you leave stays for the next call: when more data arrives, after
        ``conn.start_reading()`` resumes a paused connection, and after ``loop()`` is
        resumed following a KeyboardInterrupt raised here.  The default discards the data.

        Loop thread only.
        """
        buf.retrieve_all()

    @_noop
    def on_write_complete(self, conn: TcpConnection) -> None:
        """Called when everything sent so far has been handed to the kernel.

        "Sent so far" includes sends queued from other threads (workers) that the loop has
        not written yet, so pausing input on high water and resuming here bounds the
        output also with a ThreadPool.

        Loop thread only.
        """

    @_noop
    def on_high_water_mark(self, conn: TcpConnection, queued_bytes: int) -> None:
        """Called when the output buffer grows past ``conn.high_water_mark``.

        A slow reader: consider ``conn.stop_reading()`` until on_write_complete, then
        ``conn.start_reading()`` (which hands input left in the buffer to on_message again).

        Loop thread only.
        """

    @_noop
    def on_close(self, conn: TcpConnection) -> None:
        """Called once when the connection is released (socket closed, no task in flight).

        Loop thread only.
        """

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        """Called by a TcpClient for each failed connect attempt (refused, unreachable,
        timed out, a name that does not resolve); *exc* says why.  The default logs it
        at WARNING on the ``cppnp`` logger.  With retry on, the next attempt follows.

        Loop thread only.
        """
        _logger.warning("%s: connect failed: %s", getattr(client, "name", client), exc)

    # -- seed-compatible names (the seed's EchoServer overrides OnMessage) --
    # Subclasses override the snake_case names; these aliases only make the seed's
    # spelling callable on an ICppnpUsr.
    OnMessage = on_message
    OnWriteComplete = on_write_complete
