"""Plain cppnp echo server with ``TcpServer(io_threads=N)`` for benchmarks/scaling.py.

The main thread runs the base loop (it only accepts); with ``--io-threads N`` > 0 each
connection is served by one of N io loop threads, with 0 by the main thread (the same as
``python -m cppnp echo --threads 0``).  ``on_message`` sends the input straight back.

Prints ``listening on HOST:PORT`` (flushed) when ready; runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

from cppnp import EventLoop, ICppnpUsr, TcpServer


class Echo(ICppnpUsr):
    """Echo every byte on the connection's loop thread."""

    def on_message(self, conn: Any, buf: Any) -> None:
        conn.send(buf.retrieve_all())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "::1"))
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--io-threads", type=int, default=0)
    args = p.parse_args(argv)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    with EventLoop() as loop:
        server = TcpServer(
            loop, (args.host, args.port), Echo(), name="echo", io_threads=args.io_threads
        )
        server.start()
        print("listening on %s:%d" % (args.host, server.address[1]), flush=True)
        try:
            loop.loop()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
