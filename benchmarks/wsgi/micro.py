"""Python CPU per request of cppnp.wsgi's HTTP layer, without sockets.

wrk's request is fed to one HttpConn through a stand-in connection whose send() only
counts; the app is the plain hello (threads=0, so the app runs inline).  Prints the CPU
time (time.thread_time) per request, the minimum of 7 repeats of 50,000 requests: the
steadier figure on a shared machine, for comparing two versions of src/cppnp/wsgi.

    python benchmarks/wsgi/micro.py
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apps import hello

from cppnp import EventLoop
from cppnp.wsgi import WsgiServer

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends


class StandInConnection:
    """The TcpConnection attributes the WSGI layer uses on the hello path."""

    connected = True
    output_bytes = 0
    bytes_sent = 0
    name = "stand-in"
    context: Any = None
    peer_address = ("127.0.0.1", 5555)
    local_address = ("127.0.0.1", 8080)

    def __init__(self) -> None:
        self.sent = 0

    def send(self, data: bytes, after_tasks: bool = False) -> None:
        self.sent += len(data)

    def stop_reading(self) -> None:
        pass

    def start_reading(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_close(self) -> None:
        pass


class OneRequest:
    def retrieve_all(self) -> bytes:
        return REQUEST


def main(n: int = 50_000, repeats: int = 7) -> float:
    with EventLoop() as loop:
        server = WsgiServer(loop, hello, "127.0.0.1", 0, threads=0)
        server.start()
        conn = StandInConnection()
        server.on_connection(conn)  # type: ignore[arg-type]
        on_message = server.on_message
        on_write_complete = server.on_write_complete
        buf = OneRequest()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(n):
                on_message(conn, buf)  # type: ignore[arg-type]
                on_write_complete(conn)  # type: ignore[arg-type]
            best = min(best, (time.thread_time() - t0) / n)
        assert conn.sent > n * repeats * 100, conn.sent  # every request was answered
        server.stop()
    print("Python CPU per request (min of %d x %d): %.2f us" % (repeats, n, best * 1e6))
    return best


if __name__ == "__main__":
    main()
