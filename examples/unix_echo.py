"""Echo server on a Unix domain socket: sends back whatever it receives.

A socket file left by a dead server is replaced; a live one is refused; the file is
removed when the server stops.  A path starting with '@' is in the abstract namespace.

Usage: python examples/unix_echo.py PATH      (Ctrl-C stops)
"""

import sys

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer


class Echo(ICppnpUsr):
    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:  # loop thread
        conn.send(buf.retrieve_all())


def main(path: str) -> None:
    address = "\0" + path[1:] if path.startswith("@") else path
    with EventLoop() as loop:
        server = TcpServer(loop, address, Echo(), name="unix-echo", unix_mode=0o600)
        server.start()
        print("listening on unix:%s" % path, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            server.stop()  # closes the listener and removes the file


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
