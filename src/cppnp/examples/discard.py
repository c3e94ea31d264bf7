"""RFC 863 discard server: reads and throws away everything it receives."""

from __future__ import annotations

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer


class DiscardHandler(ICppnpUsr):
    """Counts what it throws away."""

    def __init__(self) -> None:
        self.discarded = 0

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.discarded += len(buf)
        buf.retrieve(len(buf))


def serve(loop: EventLoop, host: str = "127.0.0.1", port: int = 0) -> TcpServer:
    """Create and start a discard server on *loop* (loop thread)."""
    server = TcpServer(loop, (host, port), DiscardHandler(), name="discard")
    server.start()
    return server
