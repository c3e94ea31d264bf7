"""RFC 867 daytime server: sends the date and time as text, then closes."""

from __future__ import annotations

import time

from cppnp import EventLoop, ICppnpUsr, TcpConnection, TcpServer


class DaytimeHandler(ICppnpUsr):
    """Writes one line and half-closes; the client's close releases the connection."""

    def on_connection(self, conn: TcpConnection) -> None:
        conn.send(time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n"))
        conn.shutdown()


def serve(loop: EventLoop, host: str = "127.0.0.1", port: int = 0) -> TcpServer:
    """Create and start a daytime server on *loop* (loop thread)."""
    server = TcpServer(loop, (host, port), DaytimeHandler(), name="daytime")
    server.start()
    return server
