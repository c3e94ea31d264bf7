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
import threading
import time
from typing import Any

from cppnp import EventLoopThread, TcpServer, ThreadPool
from cppnp.examples.seed_echo import EchoServer

SIZES = (1, 16, 64, 512, 4096, 65536)


def _payload(conn_no: int, seq: int, size: int) -> bytes:
    head = b"%d:%d:" % (conn_no, seq)
    body = (head * (size // max(1, len(head)) + 1))[:size]
    return body


def run_client(host: str, port: int, conns: int, messages: int, duration: float,
               sizes: tuple[int, ...]) -> dict[str, Any]:
    """Drive the server; return counts and latencies (runs in the child process)."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, dict[str, Any]] = {}
    for i in range(conns):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state[s] = {"no": i, "seq": 0, "want": b"", "got": bytearray(), "t0": 0.0,
                    "closing": False}
        sel.register(s, selectors.EVENT_READ)
    lat: list[float] = []
    mismatches = verified = sent_bytes = 0
    deadline = time.monotonic() + duration
    last_progress = start = time.monotonic()

    def send_next(s: socket.socket, st: dict[str, Any]) -> None:
        nonlocal sent_bytes
        if st["seq"] >= messages or time.monotonic() > deadline:
            st["closing"] = True
            s.shutdown(socket.SHUT_WR)      # half-close: the server closes after replying
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
                    mismatches += 1     # closed early, or a partial echo
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
            sys.stderr.write("\r  %d echoes verified, %.0f/s ...   " % (
                verified, verified / (now - start)))
            sys.stderr.flush()
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 60 + "\r")
    elapsed = time.monotonic() - start
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else 0.0

    return {"verified": verified, "mismatches": mismatches, "unclosed": open_conns,
            "bytes": sent_bytes, "elapsed": elapsed, "p50_ms": pct(0.50),
            "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": lat[-1] * 1e3 if lat else 0.0}


def main(argv: list[str] | None = None) -> int:
    """``python -m cppnp demo``: run the seed's echo server and check it with a client."""
    p = argparse.ArgumentParser(prog="python -m cppnp demo", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=4, help="worker threads (0: single-thread)")
    p.add_argument("--fib", type=int, default=18, help="fib(n) per message in the worker")
    p.add_argument("--conns", type=int, default=10, help="client connections")
    p.add_argument("--messages", type=int, default=200, help="messages per connection")
    p.add_argument("--duration", type=float, default=60.0, help="stop sending after this")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message sizes")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = tuple(int(x) for x in a.sizes.split(","))
    if a.client:
        print(json.dumps(run_client("127.0.0.1", a.port, a.conns, a.messages, a.duration,
                                    sizes)))
        return 0

    pool = ThreadPool(a.threads, name="worker")
    pool.start()
    servers: list[TcpServer] = []

    def init(loop: Any) -> None:
        server = TcpServer(loop, ("127.0.0.1", 0), EchoServer(pool, a.fib), name="demo")
        server.start()
        servers.append(server)

    mode = "single-thread mode" if a.threads == 0 else "%d worker threads" % a.threads
    print("cppnp demo: the seed's EchoServer, %s, fib(%d) per message" % (mode, a.fib))
    with EventLoopThread(init, name="loop") as loop:
        host, port = servers[0].address
        print("  server on %s:%d; client: %d connections x %d messages, sizes %s"
              % (host, port, a.conns, a.messages, a.sizes))
        cmd = [sys.executable, "-m", "cppnp.examples.demo", "--client", "--port", str(port),
               "--conns", str(a.conns), "--messages", str(a.messages),
               "--duration", str(a.duration), "--sizes", a.sizes]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, check=False,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 10
        while servers[0].connection_count and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = loop.stats()
        conns_left = servers[0].connection_count
        servers[0].stop()
    pool.stop()
    if out.returncode != 0:
        print("client failed with exit status %d" % out.returncode)
        return 1
    r = json.loads(out.stdout)
    ps = pool.stats()
    expected = a.conns * a.messages
    print("  echoes verified: %d of %d sent, byte for byte; mismatches: %d"
          % (r["verified"], expected, r["mismatches"]))
    print("  throughput: %.0f messages/s, %.2f MB/s each way, in %.2f s"
          % (r["verified"] / r["elapsed"], r["bytes"] / r["elapsed"] / 1e6, r["elapsed"]))
    print("  latency: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms"
          % (r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"]))
    print("  tasks per worker: %s" % ", ".join(
        "%s=%d" % kv for kv in ps["per_worker"].items()))
    print("  tasks: %d completed, %d failed; peak running at once: %d"
          % (ps["completed"], ps["failed"], ps["peak_running"]))
    print("  dropped replies: %d; callback errors: %d; connections left open: %d; thread %s"
          % (stats["dropped_sends"], stats["callback_errors"], conns_left,
             threading.current_thread().name))
    ok = (r["verified"] == expected and r["mismatches"] == 0 and r["unclosed"] == 0
          and stats["dropped_sends"] == 0 and stats["callback_errors"] == 0
          and ps["failed"] == 0 and conns_left == 0)
    print("  result: %s" % ("OK: every echo verified" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
