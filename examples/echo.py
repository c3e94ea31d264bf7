"""RFC 862 echo server: sends back whatever it receives, on the loop thread.

Usage: python examples/echo.py [PORT]      (default 9000; 0 picks a free port; Ctrl-C stops)
"""

import sys

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer


class Echo(ICppnpUsr):
    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:  # loop thread
        conn.send(buf.retrieve_all())


def main(port: int) -> None:
    with EventLoop() as loop:
        server = TcpServer(loop, ("127.0.0.1", port), Echo(), name="echo")
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9000)
