"""TLS echo throughput: cppnp (TcpServer ssl=) against asyncio and uvloop (start_server
ssl=), 4 KiB request/response on 50 connections, alternating rounds, medians.

Usage: python benchmarks/tls_echo.py [--rounds 3] [--duration 3] [--conns 50] [--size 4096]
                                     [--out benchmarks/results/tls-DATE.md]

Each server runs in its own process pinned to CPU 0; the load generator (asyncio on
uvloop if installed, TLS through the ssl module) is pinned to CPU 1.  The certificate is
made with the openssl binary.  127.0.0.1 only.  The load generator is itself Python, so
the absolute numbers are bounded by it: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVERS = ("cppnp", "asyncio", "uvloop")


def make_cert(d: Path) -> tuple[str, str]:
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert, "-days",
         "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
    except (AttributeError, OSError):
        pass


# -- servers (child processes) -----------------------------------------------------------


def serve(kind: str, cert: str, key: str) -> None:
    pin(0)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if kind == "cppnp":
        from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer

        class Echo(ICppnpUsr):
            def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
                conn.send(buf.retrieve_all())

        with EventLoop() as loop:
            server = TcpServer(loop, ("127.0.0.1", 0), Echo(), ssl=ctx)
            server.start()
            print(server.address[1], flush=True)
            try:
                loop.loop()
            except KeyboardInterrupt:
                pass
        return

    class EchoProto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(EchoProto, "127.0.0.1", 0, ssl=ctx)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    if kind == "uvloop":
        import uvloop

        uvloop.install()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# -- load generator -------------------------------------------------------------------


async def load(port: int, cafile: str, conns: int, size: int, duration: float) -> float:
    ctx = ssl.create_default_context(cafile=cafile)
    payload = os.urandom(size)
    count = 0
    measuring = False
    stop = False

    async def one() -> None:
        nonlocal count
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        while not stop:
            w.write(payload)
            await r.readexactly(size)
            if measuring:
                count += 1
        w.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(conns)]
    await asyncio.sleep(0.5)  # warm-up: handshakes done
    measuring = True
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    measuring = False
    elapsed = time.perf_counter() - t0
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return count / elapsed


def run_round(kind: str, cert: str, key: str, args: argparse.Namespace) -> float:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--cert", cert, "--key", key],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        return asyncio.run(load(port, cert, args.conns, args.size, args.duration))
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", choices=SERVERS)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--out")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.cert, args.key)
        return
    pin(1)
    try:
        import uvloop

        kinds = list(SERVERS)
        uvloop.install()  # the load generator too
    except ImportError:
        kinds = ["cppnp", "asyncio"]
    results: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_cert(Path(d))
        for rnd in range(args.rounds):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                rate = run_round(kind, cert, key, args)
                results[kind].append(rate)
                print("round %d %-8s %10.0f req/s" % (rnd + 1, kind, rate), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        "# TLS echo: %d B request/response x %d connections" % (args.size, args.conns),
        "",
        "`python benchmarks/tls_echo.py --rounds %d --duration %g` (Python %s, %s; server on"
        " CPU 0, the Python load generator on CPU 1: it bounds the absolute numbers)."
        % (args.rounds, args.duration, sys.version.split()[0], ssl.OPENSSL_VERSION),
        "",
        "| server | median req/s | rounds | vs asyncio |",
        "| --- | ---: | --- | ---: |",
    ]
    for k in kinds:
        lines.append(
            "| %s | %.0f | %s | %.2f |"
            % (k, med[k], ", ".join("%.0f" % x for x in results[k]), med[k] / med["asyncio"])
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
