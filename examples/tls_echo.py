"""TLS echo: a TcpServer with ssl= that echoes, and a TcpClient with ssl= that sends one
line and prints the answer.

Server: python examples/tls_echo.py PORT --certfile CERT.pem --keyfile KEY.pem
        (0 picks a free port; prints "listening on HOST:PORT"; Ctrl-C stops)
Client: python examples/tls_echo.py PORT --connect --cafile CA.pem [--hostname localhost]
        (sends "hello over TLS", prints the echo and the TLS version, exits)

Make a test certificate with e.g. ``openssl req -x509 -newkey rsa:2048 -nodes -subj
/CN=localhost -addext subjectAltName=DNS:localhost -keyout key.pem -out cert.pem`` (then
pass cert.pem as --cafile too), or with the ``trustme`` package.
"""

import argparse
import ssl
from typing import Any

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpClient, TcpConnection, TcpServer


class Echo(ICppnpUsr):
    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:  # loop thread
        conn.send(buf.retrieve_all())


class OneLine(ICppnpUsr):
    """Sends one line once the handshake is done, prints the echo, then stops the loop."""

    MESSAGE = b"hello over TLS\n"

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.got = b""
        self.failed = False

    def on_connection(self, conn: TcpConnection) -> None:  # after the TLS handshake
        assert conn.ssl_object is not None
        print("connected with", conn.ssl_object.version(), flush=True)
        conn.send(self.MESSAGE)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.got += buf.retrieve_all()
        if self.got.endswith(b"\n"):
            print("echo:", self.got.decode().rstrip("\n"), flush=True)
            self.loop.quit()

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        print("TLS connect failed:", exc, flush=True)
        self.failed = True
        self.loop.quit()


def serve(port: int, certfile: str, keyfile: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    with EventLoop() as loop:
        server = TcpServer(loop, ("127.0.0.1", port), Echo(), name="tls-echo", ssl=ctx)
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            pass


def connect(port: int, cafile: str, hostname: str) -> int:
    ctx = ssl.create_default_context(cafile=cafile)
    with EventLoop() as loop:
        handler = OneLine(loop)
        client = TcpClient(
            loop, ("127.0.0.1", port), handler, ssl=ctx, server_hostname=hostname, retry=False
        )
        client.connect()
        loop.run_after(10.0, loop.quit)  # give up after 10 s
        loop.loop()
        client.stop()
        loop.run_once(0)  # let the close (close_notify, FIN) go out
        return 0 if handler.got else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--certfile")
    p.add_argument("--keyfile")
    p.add_argument("--connect", action="store_true")
    p.add_argument("--cafile")
    p.add_argument("--hostname", default="localhost")
    a = p.parse_args()
    if a.connect:
        if not a.cafile:
            p.error("--connect needs --cafile")
        return connect(a.port, a.cafile, a.hostname)
    if not (a.certfile and a.keyfile):
        p.error("the server needs --certfile and --keyfile")
    serve(a.port, a.certfile, a.keyfile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
