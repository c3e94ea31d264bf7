"""TCP relay (muduo's tcprelay): each accepted connection gets a TcpClient to the backend,
and bytes are copied both ways on the loop thread.  A half-close is passed on (shutdown),
and a slow side pauses the other (stop_reading at the high-water mark, start_reading when
its output is written), so the relay never buffers more than about one high-water mark.

Usage: python examples/tcprelay.py PORT BACKEND_HOST BACKEND_PORT
(PORT 0 picks a free port; Ctrl-C stops)
"""

from __future__ import annotations

import sys
from typing import Any

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpClient, TcpConnection, TcpServer

HIGH_WATER = 1 << 20


class Backend(ICppnpUsr):
    """The client side of one relayed connection (loop thread)."""

    def __init__(self, inbound: TcpConnection) -> None:
        self.inbound = inbound

    def on_connection(self, conn: TcpConnection) -> None:
        conn.set_high_water_mark(HIGH_WATER)
        self.inbound.context = conn  # link: the inbound side now forwards to conn
        self.inbound.start_reading()  # what arrived meanwhile is delivered now

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.inbound.send(buf)  # copied into the output here (loop thread): no bytes made
        buf.retrieve(len(buf))

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        self.inbound.stop_reading()  # the backend is slow: stop reading the client

    def on_write_complete(self, conn: TcpConnection) -> None:
        self.inbound.start_reading()

    def on_close(self, conn: TcpConnection) -> None:
        self.inbound.shutdown()  # the backend closed: pass the FIN on

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        self.inbound.force_close()  # no backend: drop the client


class Relay(ICppnpUsr):
    """The server side: the clients' connections (loop thread)."""

    def __init__(self, loop: EventLoop, backend: tuple[str, int]) -> None:
        self.loop = loop
        self.backend = backend
        self.clients: dict[int, TcpClient] = {}

    def on_connection(self, conn: TcpConnection) -> None:
        conn.stop_reading()  # until the backend is connected
        conn.set_high_water_mark(HIGH_WATER)
        client = TcpClient(self.loop, self.backend, Backend(conn), retry=False)
        self.clients[conn.id] = client
        client.connect()

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        backend = conn.context
        if backend is not None:
            backend.send(buf)
            buf.retrieve(len(buf))

    def on_high_water_mark(self, conn: TcpConnection, queued: int) -> None:
        backend = conn.context
        if backend is not None:
            backend.stop_reading()  # the client is slow: stop reading the backend

    def on_write_complete(self, conn: TcpConnection) -> None:
        backend = conn.context
        if backend is not None:
            backend.start_reading()

    def on_close(self, conn: TcpConnection) -> None:
        client = self.clients.pop(conn.id, None)
        if client is not None:
            client.disconnect()  # the client closed: pass the FIN on to the backend
        conn.context = None


def main(port: int, backend: tuple[str, int]) -> None:
    with EventLoop() as loop:
        server = TcpServer(loop, ("127.0.0.1", port), Relay(loop, backend), name="relay")
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(int(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))
