"""Framing codecs: wrap a handler that implements ``on_frame(conn, frame)``.

A codec is the ICppnpUsr handler you give to a TcpServer.  Its ``on_message`` runs in the
compiled core (``_core.codec``): one C loop over the connection's input Buffer extracts
every complete frame of a read and calls ``handler.on_frame(conn, frame)`` (``bytes``,
header or delimiter removed) for each, on the loop thread.  ``on_connection``,
``on_write_complete``, ``on_high_water_mark``, ``on_close`` (and a TcpClient's
``on_connect_error``) are forwarded to the handler when it defines them (bound
directly: no extra call layer).

``codec.send(conn, payload)`` frames on the way out with one ``conn.send`` (thread-safe,
so workers may reply and frames never interleave).  A frame over the limit -- a header
above ``max_frame`` (negative lengths included), or a line longer than ``max_line`` -- is
a protocol error: one WARNING on the ``cppnp`` logger, ``codec.protocol_errors`` + 1,
the connection's input discarded and the connection force-closed.  An exception raised by
``on_frame`` is logged and counted in ``loop.callback_errors``; the next frames are still
delivered.

Example::

    class Upper:
        def on_frame(self, conn, line):         # loop thread
            codec.send(conn, line.upper())

    codec = LineCodec(Upper(), delimiter=b"\\r\\n", max_line=1024)
    server = TcpServer(loop, ("127.0.0.1", 9000), codec)
"""

from __future__ import annotations

from typing import Any, Protocol

from _core import codec as _core_codec
from _core.handler import resolve_callback
from cppnp.handler import ICppnpUsr

__all__ = ["FrameHandler", "LengthFieldCodec", "LineCodec"]

_FORWARDED = (
    "on_connection",
    "on_write_complete",
    "on_high_water_mark",
    "on_close",
    "on_connect_error",  # a codec given to a TcpClient
)


class FrameHandler(Protocol):
    """What a codec wraps: ``on_frame`` plus any of ICppnpUsr's other callbacks."""

    def on_frame(self, conn: Any, frame: bytes) -> None: ...


def _forward(codec: object, handler: object) -> None:
    for name in _FORWARDED:
        method = resolve_callback(handler, name)
        if method is not None:
            setattr(codec, name, method)


class LengthFieldCodec(_core_codec.LengthFieldCodec, ICppnpUsr):
    """Length-prefixed frames: ``header | payload`` (muduo's LengthHeaderCodec).

    *header_bytes* (1..8) bytes in *byteorder* (``"big"``/``"little"``) hold the payload
    length, header excluded.  Frames above *max_frame* (default 16 MiB; also capped to
    what the header can express, and for 4- and 8-byte headers below the sign bit) are a
    protocol error that closes the connection.  The codec keeps no per-connection state:
    one codec serves every connection of a server.
    """

    def __init__(
        self,
        handler: FrameHandler,
        *,
        header_bytes: int = 4,
        byteorder: str = "big",
        max_frame: int = 16 * 1024 * 1024,
    ) -> None:
        super().__init__(
            handler, header_bytes=header_bytes, byteorder=byteorder, max_frame=max_frame
        )
        _forward(self, handler)


class LineCodec(_core_codec.LineCodec, ICppnpUsr):
    """Delimited lines (default ``b"\\n"``; ``b"\\r\\n"`` for text protocols).

    ``on_frame`` gets each line without its delimiter.  A line longer than *max_line*
    (default 64 KiB, delimiter excluded) is a protocol error that closes the connection;
    the Buffer never holds more than ``max_line + len(delimiter)`` plus one read.  Keeps
    no per-connection state: one codec serves every connection of a server.
    """

    def __init__(
        self,
        handler: FrameHandler,
        *,
        delimiter: bytes = b"\n",
        max_line: int = 64 * 1024,
    ) -> None:
        super().__init__(handler, delimiter=delimiter, max_line=max_line)
        _forward(self, handler)
