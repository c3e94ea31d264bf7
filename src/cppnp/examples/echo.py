"""RFC 862 echo server, optionally with the seed's worker pool (see seed_echo)."""

from __future__ import annotations

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer


class EchoHandler(ICppnpUsr):
    """Plain echo on the loop thread: whatever arrives is sent back."""

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        conn.send(buf.retrieve_all())


def serve(loop: EventLoop, host: str = "127.0.0.1", port: int = 0) -> TcpServer:
    """Create and start a plain echo server on *loop* (loop thread)."""
    server = TcpServer(loop, (host, port), EchoHandler(), name="echo")
    server.start()
    return server
