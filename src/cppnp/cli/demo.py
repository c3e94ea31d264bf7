"""The main job: the seed's EchoServer with its worker pool, driven by a built-in client.

The server (loop thread + ThreadPool) runs in this process; the client runs in a child
process (so it does not share our GIL), opens several connections and sends messages
of mixed sizes, each connection in ping-pong, checks every echo byte for byte, then
half-closes and waits for the server to close.  Prints a report; exit status 1 if any
echo was wrong or missing.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from typing import Any

from cppnp import EventLoopThread, TcpServer, ThreadPool
from cppnp.cli.common import format_address, int_range, positive_float
from cppnp.cli.servers import FIB_MAX, EchoServer

SIZES = (1, 16, 64, 512, 4096, 65536)
MAX_SIZE = 16 << 20


def _payload(conn_no: int, seq: int, size: int) -> bytes:
    head = b"%d:%d:" % (conn_no, seq)
    body = (head * (size // max(1, len(head)) + 1))[:size]
    return body


def run_client(
    host: str, port: int, conns: int, messages: int, duration: float, sizes: tuple[int, ...]
) -> dict[str, Any]:
    """Drive the server; return counts and latencies (runs in the child process)."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, dict[str, Any]] = {}
    for i in range(conns):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state[s] = {"no": i, "seq": 0, "want": b"", "got": bytearray(), "t0": 0.0, "closing": False}
        sel.register(s, selectors.EVENT_READ)
    lat: list[float] = []
    mismatches = verified = sent_bytes = 0
    deadline = time.monotonic() + duration
    last_progress = start = time.monotonic()

    def send_next(s: socket.socket, st: dict[str, Any]) -> None:
        nonlocal sent_bytes
        if st["seq"] >= messages or time.monotonic() > deadline:
            st["closing"] = True
            s.shutdown(socket.SHUT_WR)  # half-close: the server closes after replying
            return
        size = sizes[(st["no"] + st["seq"]) % len(sizes)]
        st["want"] = _payload(st["no"], st["seq"], size)
        st["got"] = bytearray()
        st["seq"] += 1
        st["t0"] = time.perf_counter()
        s.setblocking(True)
        s.sendall(st["want"])
        s.setblocking(False)
        sent_bytes += size

    for s, st in state.items():
        send_next(s, st)
    open_conns = conns
    while open_conns and time.monotonic() < deadline + 10:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj  # type: ignore[assignment]
            st = state[s]
            data = s.recv(1 << 20)
            if not data:
                if not st["closing"] or st["got"]:
                    mismatches += 1  # closed early, or a partial echo
                sel.unregister(s)
                s.close()
                open_conns -= 1
                continue
            st["got"] += data
            if len(st["got"]) >= len(st["want"]):
                if bytes(st["got"]) == st["want"]:
                    verified += 1
                    st["got"] = bytearray()
                    lat.append(time.perf_counter() - st["t0"])
                else:
                    mismatches += 1
                send_next(s, st)
        now = time.monotonic()
        if now - last_progress > 1.0 and sys.stderr.isatty():
            last_progress = now
            sys.stderr.write(
                "\r  %d echoes verified, %.0f/s ...   " % (verified, verified / (now - start))
            )
            sys.stderr.flush()
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 60 + "\r")
    elapsed = time.monotonic() - start
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else 0.0

    return {
        "verified": verified,
        "mismatches": mismatches,
        "unclosed": open_conns,
        "bytes": sent_bytes,
        "elapsed": elapsed,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1e3 if lat else 0.0,
    }


def sizes_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated message sizes in bytes, each 1..16 MiB."""
    try:
        sizes = tuple(int(x, 10) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r is not a comma-separated list of sizes in bytes" % text
        ) from None
    if not all(1 <= n <= MAX_SIZE for n in sizes):
        raise argparse.ArgumentTypeError("each size must be 1..%d bytes, got %s" % (MAX_SIZE, text))
    return sizes


def add_parsers(sub: Any) -> None:
    """Register ``demo``."""
    text = "the main job: the seed's EchoServer and worker pool, checked by a built-in client"
    p = sub.add_parser("demo", help=text, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads",
        type=int_range("threads", 0),
        default=4,
        metavar="N",
        help="worker threads; 0 = single-thread mode (default: %(default)s)",
    )
    p.add_argument(
        "--fib",
        type=int_range("fib", 0, FIB_MAX),
        default=18,
        metavar="N",
        help="compute fib(N), 0..%d, per message in the worker (default: %%(default)s)" % FIB_MAX,
    )
    p.add_argument(
        "--conns",
        type=int_range("conns", 1),
        default=10,
        metavar="N",
        help="client connections (default: %(default)s)",
    )
    p.add_argument(
        "--messages",
        type=int_range("messages", 1),
        default=200,
        metavar="N",
        help="messages per connection (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=positive_float("duration"),
        default=60.0,
        metavar="SECONDS",
        help="stop sending after this many seconds (default: %(default)s)",
    )
    p.add_argument(
        "--sizes",
        type=sizes_list,
        default=SIZES,
        metavar="BYTES,...",
        help="message sizes in bytes, comma-separated, used in turn "
        "(default: %s)" % ",".join(map(str, SIZES)),
    )
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int_range("port", 1, 65535), default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    """``cppnp demo``: run the seed's echo server and check it with a client."""
    sizes: tuple[int, ...] = a.sizes
    sizes_text = ",".join(map(str, sizes))
    if a.client:
        print(json.dumps(run_client("127.0.0.1", a.port, a.conns, a.messages, a.duration, sizes)))
        return 0

    pool = ThreadPool(a.threads, name="worker")
    pool.start()

    def init(loop: Any) -> TcpServer:  # runs on the loop thread
        server = TcpServer(loop, ("127.0.0.1", 0), EchoServer(pool, a.fib), name="demo")
        server.start()
        return server

    mode = "single-thread mode" if a.threads == 0 else "%d worker threads" % a.threads
    print("cppnp demo: the seed's EchoServer, %s, fib(%d) per message" % (mode, a.fib))
    loop_thread = EventLoopThread(init, name="loop")
    with loop_thread as loop:
        server: TcpServer = loop_thread.result  # what init returned
        port = server.address[1]
        print(
            "  server on %s; client: %d connections x %d messages, sizes %s bytes"
            % (format_address(server.address), a.conns, a.messages, sizes_text)
        )
        cmd = [
            sys.executable,
            "-m",
            "cppnp",
            "demo",
            "--client",
            "--port",
            str(port),
            "--conns",
            str(a.conns),
            "--messages",
            str(a.messages),
            "--duration",
            str(a.duration),
            "--sizes",
            sizes_text,
        ]
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, check=False, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        deadline = time.monotonic() + 10
        while server.connection_count and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = loop.stats()
        conns_left = server.connection_count
        server.stop()
    pool.stop()
    if out.returncode != 0:
        print("client failed with exit status %d" % out.returncode)
        return 1
    r = json.loads(out.stdout)
    ps = pool.stats()
    expected = a.conns * a.messages
    print(
        "  echoes verified: %d of %d sent, byte for byte; mismatches: %d"
        % (r["verified"], expected, r["mismatches"])
    )
    print(
        "  throughput: %.0f messages/s, %.2f MB/s each way, in %.2f s"
        % (r["verified"] / r["elapsed"], r["bytes"] / r["elapsed"] / 1e6, r["elapsed"])
    )
    print(
        "  latency: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms"
        % (r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"])
    )
    print("  tasks per worker: %s" % ", ".join("%s=%d" % kv for kv in ps["per_worker"].items()))
    print(
        "  tasks: %d completed, %d failed; peak running at once: %d"
        % (ps["completed"], ps["failed"], ps["peak_running"])
    )
    print(
        "  dropped replies: %d; callback errors: %d; connections left open: %d"
        % (stats["dropped_sends"], stats["callback_errors"], conns_left)
    )
    ok = (
        r["verified"] == expected
        and r["mismatches"] == 0
        and r["unclosed"] == 0
        and stats["dropped_sends"] == 0
        and stats["callback_errors"] == 0
        and ps["failed"] == 0
        and conns_left == 0
    )
    print("  result: %s" % ("OK: every echo verified" if ok else "FAILED"))
    return 0 if ok else 1
