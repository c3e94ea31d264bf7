"""TCP relay (proxy) throughput: cppnp's ``examples/tcprelay.py`` (TcpServer + TcpClient)
against the same relay written on asyncio and on uvloop (asyncio Protocols,
``create_connection`` to the backend, pause/resume reading for flow control).

Backend: the C epoll echo server (``servers/c_echo.c``).  Client: one uvloop process with
CONNS connections; on each it keeps WINDOW messages of SIZE bytes in flight through the
relay and sends another each time SIZE bytes have come back.  Reported: bytes/s echoed
back in the measured window after a warm-up (each byte crosses the relay twice).  Relay
on CPU 0, client and backend on CPU 1 (when possible); rounds alternate the relays;
medians.

Usage: python benchmarks/relay.py [--rounds 3] [--duration 2] [--conns 4] [--size 65536]
       [--window 4] [--out benchmarks/results/relay-DATE.md]
(internal: --relay asyncio|uvloop --backend-port P;  --client --port P ...)
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

HIGH_WATER = 1 << 20

# ---- the asyncio / uvloop relay (child process) -------------------------------------------


def run_asyncio_relay(backend_port: int, uv: bool) -> None:
    import asyncio

    class Side(asyncio.Protocol):
        """One side of a relayed connection; ``peer`` is the other side's transport."""

        def __init__(self) -> None:
            self.t: Any = None
            self.peer: Any = None
            self.peer_side: Side | None = None
            self.early: list[bytes] = []

        def connection_made(self, transport: Any) -> None:
            self.t = transport
            transport.set_write_buffer_limits(high=HIGH_WATER)

        def data_received(self, data: bytes) -> None:
            if self.peer is None:
                self.early.append(data)
            else:
                self.peer.write(data)

        def eof_received(self) -> bool:
            if self.peer is not None and self.peer.can_write_eof():
                self.peer.write_eof()
            return True

        def connection_lost(self, exc: BaseException | None) -> None:
            if self.peer is not None:
                self.peer.close()

        def pause_writing(self) -> None:  # our output is full: stop reading the peer
            if self.peer is not None:
                self.peer.pause_reading()

        def resume_writing(self) -> None:
            if self.peer is not None:
                self.peer.resume_reading()

        def link(self, other: Side) -> None:
            self.peer = other.t
            self.peer_side = other
            for chunk in self.early:
                self.peer.write(chunk)
            self.early.clear()

    class Inbound(Side):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            transport.pause_reading()  # until the backend is connected
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            try:
                _t, out = await loop.create_connection(Side, "127.0.0.1", backend_port)
            except OSError:
                self.t.close()
                return
            out.link(self)
            self.link(out)
            self.t.resume_reading()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Inbound, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print("listening on 127.0.0.1:%d" % port, flush=True)
        await asyncio.Event().wait()  # until terminated

    if uv:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# ---- the client (child process, prints one JSON line) -------------------------------------


def run_client(
    port: int, conns: int, size: int, window: int, duration: float, warmup: float
) -> dict[str, Any]:
    import asyncio

    import uvloop

    msg = b"x" * size
    state = {"bytes": 0}

    class Push(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.pending = 0
            for _ in range(window):
                transport.write(msg)

        def data_received(self, data: bytes) -> None:
            state["bytes"] += len(data)
            self.pending += len(data)
            while self.pending >= size:
                self.pending -= size
                self.t.write(msg)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(conns):
            t, _p = await loop.create_connection(Push, "127.0.0.1", port)
            transports.append(t)
        await asyncio.sleep(warmup)
        b0 = state["bytes"]
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        n = state["bytes"] - b0
        t1 = time.perf_counter()
        for t in transports:
            t.close()
        return {"bytes": n, "seconds": t1 - t0, "total_bytes": state["bytes"]}

    return uvloop.run(main())


# ---- the driver ---------------------------------------------------------------------------


def start_listening(argv: list[str], what: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise SystemExit("%s did not start: %r" % (what, line))
    return proc, int(line.rsplit(":", 1)[1])


def start_relay(
    name: str, backend_port: int, pin: bool, cppnp_script: str | None = None
) -> tuple[subprocess.Popen[str], int]:
    import benchlib

    prefix = benchlib.pin_prefix(0 if pin else None)
    if name == "cppnp":
        script = Path(cppnp_script) if cppnp_script else HERE.parent / "examples" / "tcprelay.py"
        argv = [*prefix, sys.executable, str(script), "0", "127.0.0.1", str(backend_port)]
    else:
        argv = [
            *prefix,
            sys.executable,
            __file__,
            "--relay",
            name,
            "--backend-port",
            str(backend_port),
        ]
    return start_listening(argv, "%s relay" % name)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def measure(name: str, backend_port: int, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    import benchlib

    relay, port = start_relay(name, backend_port, pin, args.cppnp_script)
    cpu0 = benchlib.proc_cpu_seconds(relay.pid)
    try:
        argv = [
            *benchlib.pin_prefix(1 if pin else None),
            sys.executable,
            __file__,
            "--client",
            "--port",
            str(port),
            "--conns",
            str(args.conns),
            "--size",
            str(args.size),
            "--window",
            str(args.window),
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
        ]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60 + args.duration * 2)
        cpu1 = benchlib.proc_cpu_seconds(relay.pid)
    finally:
        stop(relay)
    if out.returncode != 0:
        raise SystemExit("client through %s relay failed: %s" % (name, out.stderr))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    # relay CPU per byte relayed, over the whole client run (warm-up included)
    result["relay_cpu_us_per_mb"] = (cpu1 - cpu0) * 1e6 / (result["total_bytes"] / 1e6)
    return result


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--relay")
    p.add_argument("--backend-port", type=int)
    p.add_argument("--client", action="store_true")
    p.add_argument("--port", type=int)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--relays", default="cppnp,asyncio,uvloop")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument(
        "--cppnp-script",
        help="the cppnp relay to run (default examples/tcprelay.py), to try a variant",
    )
    p.add_argument("--out")
    args = p.parse_args()
    if args.relay:
        run_asyncio_relay(args.backend_port, args.relay == "uvloop")
        return 0
    if args.client:
        r = run_client(args.port, args.conns, args.size, args.window, args.duration, args.warmup)
        print(json.dumps(r))
        return 0

    import benchlib

    pin = not args.no_pin and benchlib.can_pin([0, 1])
    relays = args.relays.split(",")
    binary = benchlib.build_c(benchlib.SERVERS_DIR / "c_echo.c")
    backend, backend_port = start_listening(
        [
            *benchlib.pin_prefix(1 if pin else None),
            str(binary),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        "c_echo",
    )
    rates: dict[str, list[float]] = {}
    cpu_cost: dict[str, list[float]] = {}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        for rnd in range(args.rounds):
            order = relays if rnd % 2 == 0 else list(reversed(relays))
            for name in order:
                r = measure(name, backend_port, args, pin)
                rate = r["bytes"] / r["seconds"]
                rates.setdefault(name, []).append(rate)
                cpu_cost.setdefault(name, []).append(r["relay_cpu_us_per_mb"])
                print(
                    "round %d %-7s %8.1f MB/s  relay CPU %6.0f us/MB"
                    % (rnd + 1, name, rate / 1e6, r["relay_cpu_us_per_mb"]),
                    flush=True,
                )
    finally:
        stop(backend)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    med = {name: statistics.median(rates[name]) for name in relays}
    med_cpu = {name: statistics.median(cpu_cost[name]) for name in relays}
    lines = [
        "# TCP relay throughput (%s)" % time.strftime("%Y-%m-%d"),
        "",
        "`python benchmarks/relay.py --rounds %d --duration %g --warmup %g --conns %d --size %d"
        " --window %d`"
        % (args.rounds, args.duration, args.warmup, args.conns, args.size, args.window),
        "",
        "Client (uvloop) -> relay -> C echo server -> relay -> client; %d connections, %d"
        " messages of %d bytes in flight on each; MB/s = bytes echoed back per second in the"
        " measured window (each byte crosses the relay twice); median of %d alternating"
        " rounds; relay pinned to CPU 0, client and backend to CPU 1: %s. Python %s."
        " Load average before / after: %s / %s."
        % (
            args.conns,
            args.window,
            args.size,
            args.rounds,
            "yes" if pin else "no",
            sys.version.split()[0],
            " ".join(load_before),
            " ".join(load_after),
        ),
        "",
        "| relay | median MB/s | rounds (MB/s) | vs uvloop | vs asyncio"
        " | relay CPU µs/MB (median) | CPU/MB vs uvloop |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in relays:
        r_uv = med[name] / med["uvloop"] if "uvloop" in med else float("nan")
        r_aio = med[name] / med["asyncio"] if "asyncio" in med else float("nan")
        c_uv = med_cpu[name] / med_cpu["uvloop"] if "uvloop" in med_cpu else float("nan")
        lines.append(
            "| %s | %.1f | %s | %.2fx | %.2fx | %.0f | %.2fx |"
            % (
                name,
                med[name] / 1e6,
                ", ".join("%.1f" % (x / 1e6) for x in rates[name]),
                r_uv,
                r_aio,
                med_cpu[name],
                c_uv,
            )
        )
    lines += [
        "",
        "Relay CPU µs/MB: the relay process's CPU time over the whole client run (warm-up"
        " included) per MB echoed back; lower is better, and it is less sensitive to other"
        " load on the machine than MB/s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "pinned": pin,
                    "python": sys.version.split()[0],
                    "loadavg": [load_before, load_after],
                    "bytes_per_s": rates,
                    "relay_cpu_us_per_mb": cpu_cost,
                    "median_bytes_per_s": med,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
