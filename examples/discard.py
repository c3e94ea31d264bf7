"""RFC 863 discard server: reads and throws away everything; counts it.

Usage: python examples/discard.py [PORT]   (default 9000; 0 picks a free port; Ctrl-C stops)
"""

import sys

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer


class Discard(ICppnpUsr):
    def __init__(self) -> None:
        self.discarded = 0

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:  # loop thread
        self.discarded += len(buf)
        buf.retrieve(len(buf))

    def on_close(self, conn: TcpConnection) -> None:
        print("%s closed; %d bytes discarded so far" % (conn.name, self.discarded), flush=True)


def main(port: int) -> None:
    with EventLoop() as loop:
        server = TcpServer(loop, ("127.0.0.1", port), Discard(), name="discard")
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9000)
