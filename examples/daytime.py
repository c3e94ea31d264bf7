"""RFC 867 daytime server: one line with the date and time, then a half-close.

Usage: python examples/daytime.py [PORT]   (default 9000; 0 picks a free port; Ctrl-C stops)
"""

import sys
import time

from cppnp import EventLoop, ICppnpUsr, TcpConnection, TcpServer


class Daytime(ICppnpUsr):
    def on_connection(self, conn: TcpConnection) -> None:  # loop thread
        conn.send(time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n"))
        conn.shutdown()  # the client's close then releases the connection


def main(port: int) -> None:
    with EventLoop() as loop:
        server = TcpServer(loop, ("127.0.0.1", port), Daytime(), name="daytime")
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9000)
