"""Ping-pong client benchmark (muduo's pingpong): cppnp's TcpClient against an asyncio
``create_connection`` client and a uvloop one, all driving the C epoll echo server.

Each client opens N connections; on each it sends one SIZE-byte message and sends it
again every time SIZE bytes have come back (one message in flight per connection).
Reported: messages/s (round trips) in the measured window after a warm-up.  Server on
CPU 0, client on CPU 1 (when possible); rounds alternate the clients; medians.

Usage: python benchmarks/pingpong.py [--rounds 3] [--duration 2] [--conns 1,10]
       [--size 64] [--out benchmarks/results/pingpong-DATE.md]
(internal: --client NAME --port P --conns N --size S --duration D --warmup W)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# ---- the clients (run in a child process, print one JSON line) ----------------------------


def run_cppnp(port: int, conns: int, size: int, duration: float, warmup: float) -> dict[str, Any]:
    from cppnp import Buffer, EventLoop, ICppnpUsr, TcpClient, TcpConnection

    msg = b"x" * size
    state = {"count": 0, "measuring": False, "connected": 0}

    class Ping(ICppnpUsr):
        def on_connection(self, conn: TcpConnection) -> None:
            state["connected"] += 1
            conn.send(msg)

        def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
            while len(buf) >= size:
                buf.retrieve(size)
                state["count"] += 1
                conn.send(msg)

    with EventLoop() as loop:
        handler = Ping()
        clients = [TcpClient(loop, ("127.0.0.1", port), handler, retry=False) for _ in range(conns)]
        for c in clients:
            c.connect()
        marks: dict[str, float] = {}

        def start() -> None:
            state["count"] = 0
            marks["t0"] = time.perf_counter()

        def stop() -> None:
            marks["n"] = state["count"]
            marks["t1"] = time.perf_counter()
            loop.quit()

        loop.run_after(warmup, start)
        loop.run_after(warmup + duration, stop)
        loop.loop()
        for c in clients:
            c.stop()
        loop.run_once(0.05)
    return {"messages": marks["n"], "seconds": marks["t1"] - marks["t0"]}


def run_asyncio(
    port: int, conns: int, size: int, duration: float, warmup: float, uv: bool
) -> dict[str, Any]:
    import asyncio

    msg = b"x" * size
    state = {"count": 0}

    class Ping(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.pending = 0
            transport.write(msg)

        def data_received(self, data: bytes) -> None:
            self.pending += len(data)
            while self.pending >= size:
                self.pending -= size
                state["count"] += 1
                self.t.write(msg)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(conns):
            t, _p = await loop.create_connection(Ping, "127.0.0.1", port)
            transports.append(t)
        await asyncio.sleep(warmup)
        state["count"] = 0
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        n = state["count"]
        t1 = time.perf_counter()
        for t in transports:
            t.close()
        return {"messages": n, "seconds": t1 - t0}

    if uv:
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


# ---- the driver ---------------------------------------------------------------------------


def start_server(pin: bool) -> tuple[subprocess.Popen[str], int]:
    import benchlib

    binary = benchlib.build_c(benchlib.SERVERS_DIR / "c_echo.c")
    argv = [
        *benchlib.pin_prefix(0 if pin else None),
        str(binary),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise SystemExit("c_echo did not start: %r" % line)
    return proc, int(line.rsplit(":", 1)[1])


def run_client(
    name: str, port: int, conns: int, args: argparse.Namespace, pin: bool
) -> dict[str, Any]:
    import benchlib

    argv = [
        *benchlib.pin_prefix(1 if pin else None),
        sys.executable,
        __file__,
        "--client",
        name,
        "--port",
        str(port),
        "--conns",
        str(conns),
        "--size",
        str(args.size),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60 + args.duration * 2)
    if out.returncode != 0:
        raise SystemExit("%s client failed: %s" % (name, out.stderr))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--client")
    p.add_argument("--port", type=int)
    p.add_argument("--conns", default="1,10")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", default="cppnp,asyncio,uvloop")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    if args.client:
        n = int(args.conns)
        if args.client == "cppnp":
            r = run_cppnp(args.port, n, args.size, args.duration, args.warmup)
        else:
            r = run_asyncio(
                args.port, n, args.size, args.duration, args.warmup, args.client == "uvloop"
            )
        print(json.dumps(r))
        return 0

    import benchlib

    pin = not args.no_pin and benchlib.can_pin([0, 1])
    clients = args.clients.split(",")
    conn_counts = [int(c) for c in args.conns.split(",")]
    server, port = start_server(pin)
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for rnd in range(args.rounds):
            order = clients if rnd % 2 == 0 else list(reversed(clients))
            for conns in conn_counts:
                for name in order:
                    r = run_client(name, port, conns, args, pin)
                    rate = r["messages"] / r["seconds"]
                    rates.setdefault((name, conns), []).append(rate)
                    print(
                        "round %d %-7s conns=%-3d %10.0f msg/s" % (rnd + 1, name, conns, rate),
                        flush=True,
                    )
    finally:
        server.terminate()
        server.wait(10)
    lines = [
        "# Ping-pong clients against the C echo server (%s)" % time.strftime("%Y-%m-%d"),
        "",
        "`python benchmarks/pingpong.py --rounds %d --duration %g --warmup %g --conns %s --size %d`"
        % (args.rounds, args.duration, args.warmup, args.conns, args.size),
        "",
        "One %d-byte message in flight per connection; messages/s = round trips per second in"
        " the measured window; median of %d alternating rounds; server pinned to CPU 0, client"
        " to CPU 1: %s. Python %s."
        % (args.size, args.rounds, "yes" if pin else "no", sys.version.split()[0]),
        "",
        "| conns | " + " | ".join(clients) + " | cppnp / uvloop | cppnp / asyncio |",
        "| ---: | " + " | ".join("---:" for _ in clients) + " | ---: | ---: |",
    ]
    for conns in conn_counts:
        med = {name: statistics.median(rates[(name, conns)]) for name in clients}
        cells = " | ".join("%.0f" % med[name] for name in clients)
        r_uv = med["cppnp"] / med["uvloop"] if "uvloop" in med and "cppnp" in med else float("nan")
        r_aio = (
            med["cppnp"] / med["asyncio"] if "asyncio" in med and "cppnp" in med else float("nan")
        )
        lines.append("| %d | %s | %.2fx | %.2fx |" % (conns, cells, r_uv, r_aio))
    lines.append("")
    lines.append(
        "Per round (msg/s): "
        + json.dumps({"%s/%d" % k: [round(x) for x in v] for k, v in rates.items()})
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
