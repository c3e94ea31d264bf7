"""``make bench-resp``: the RESP example under redis-benchmark, next to redis-server and the
same RESP server on asyncio and uvloop.

Every server runs pinned to CPU 0 and ``redis-benchmark`` to CPU 1 (``taskset``).  One
round runs ``redis-benchmark -c 50 -r 100000 -t ping,set,get,incr,mset`` plus an MGET of
10 keys (redis-benchmark has no built-in MGET test: it is given as a command line) against
each server, at ``-P 1`` and at ``-P 16``; the servers' order rotates every round and the
tables quote the median over the rounds, and ratios of medians.  The machine may be shared:
the load average at start and end is recorded with the results.

Writes ``benchmarks/results/resp-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_CPU, CLIENT_CPU = 0, 1
TESTS = "ping,set,get,incr,mset"
MGET = ["MGET"] + ["key:__rand_int__"] * 10
SERVERS = ["cppnp", "uvloop", "asyncio", "redis-server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server on a free port, no persistence, pinned like the others."""

    def __init__(self, cpu: int | None) -> None:
        self.port = free_port()
        argv = [
            *benchlib.pin_prefix(cpu),
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        benchlib.track(self.proc)
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        benchlib.terminate(self.proc)


def start_servers(pin: bool) -> dict[str, Any]:
    cpu = SERVER_CPU if pin else None
    py = sys.executable
    servers: dict[str, Any] = {}
    specs = {
        "cppnp": [py, str(REPO / "examples" / "resp_server.py"), "--port", "0"],
        "uvloop": [py, str(HERE / "servers" / "resp_asyncio.py"), "--port", "0", "--uvloop"],
        "asyncio": [py, str(HERE / "servers" / "resp_asyncio.py"), "--port", "0"],
    }
    for name, argv in specs.items():
        sp = benchlib.ServerProcess("resp-" + name, argv, cpu=cpu)
        sp.start()
        servers[name] = sp
    servers["redis-server"] = RedisServer(cpu)
    return servers


def run_benchmark(
    port: int, pipeline: int, n: int, pin: bool, command: list[str] | None = None
) -> dict[str, float]:
    argv = [
        *benchlib.pin_prefix(CLIENT_CPU if pin else None),
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-c",
        "50",
        "-n",
        str(n),
        "-r",
        "100000",
        "-P",
        str(pipeline),
        "--csv",
    ]
    argv += command if command else ["-t", TESTS]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    rows: dict[str, float] = {}
    for row in csv.reader(io.StringIO(out.stdout)):
        if len(row) >= 2 and row[0] != "test":
            with contextlib.suppress(ValueError):
                rows["MGET (10 keys)" if command else row[0]] = float(row[1])
    if not rows:
        raise RuntimeError("redis-benchmark gave no result: %s %s" % (out.stdout, out.stderr))
    return rows


def per_round_ratios(samples: dict[str, Any], pl: Any, other: str) -> list[float]:
    """cppnp / *other*, geometric mean over the tests, for each round (same time window)."""
    tests = list(samples["cppnp"][pl])
    rounds = len(samples["cppnp"][pl][tests[0]])
    return [
        statistics.geometric_mean([samples["cppnp"][pl][t][r] for t in tests])
        / statistics.geometric_mean([samples[other][pl][t][r] for t in tests])
        for r in range(rounds)
    ]


def render(
    info: dict[str, Any], args: dict[str, Any], samples: dict[str, Any], medians: dict[str, Any]
) -> list[str]:
    """The Markdown report (pipeline keys are ints)."""
    tests = list(medians["cppnp"][1])
    pinned = "taskset" if info.get("pinned", True) else "NOT pinned (taskset missing)"
    lines = [
        f"# RESP example under redis-benchmark ({info.get('date', '')})",
        "",
        f"`make bench-resp`: `redis-benchmark -c 50 -r 100000 -t {TESTS}` plus `MGET` of 10 "
        f"keys, at `-P 1` (n={args['n1']:,}) and `-P 16` (n={args['n16']:,}); "
        f"{args['rounds']} rounds, servers in rotating order, medians of requests/s. Servers "
        f"pinned to CPU {SERVER_CPU}, redis-benchmark to CPU {CLIENT_CPU} ({pinned}).",
        "",
        "cppnp = `examples/resp_server.py` (single-thread mode); asyncio/uvloop = "
        "`benchmarks/servers/resp_asyncio.py` (same command engine and parser algorithm); "
        f"{info['redis']}. Python {info['python']}, uvloop {info['uvloop']}, "
        f"{info['cpu_model']}, load average {info['loadavg_at_start']} at start, "
        f"{info['loadavg_at_end']} at end.",
        "",
    ]
    for pl in (1, 16):
        lines += [
            f"## -P {pl}",
            "",
            "| test | cppnp | uvloop | asyncio | redis-server | cppnp/uvloop "
            "| cppnp/asyncio | cppnp/redis |",
            "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for t in tests:
            c, u, a, r = (medians[s][pl].get(t, float("nan")) for s in SERVERS)
            lines.append(
                f"| {t} | {fmt(c)} | {fmt(u)} | {fmt(a)} | {fmt(r)} | "
                f"{c / u:.2f}x | {c / a:.2f}x | {c / r:.2f}x |"
            )
        gm = {s: statistics.geometric_mean([medians[s][pl][t] for t in tests]) for s in SERVERS}
        lines.append(
            f"| **geometric mean** | {fmt(gm['cppnp'])} | {fmt(gm['uvloop'])} | "
            f"{fmt(gm['asyncio'])} | {fmt(gm['redis-server'])} | "
            f"{gm['cppnp'] / gm['uvloop']:.2f}x | {gm['cppnp'] / gm['asyncio']:.2f}x | "
            f"{gm['cppnp'] / gm['redis-server']:.2f}x |"
        )
        lines.append("")
        lines.append(
            "Per-round ratios (geometric mean over the tests, cppnp and the other "
            "server measured in the same round):"
        )
        lines.append("")
        for other in SERVERS[1:]:
            rs = per_round_ratios(samples, pl, other)
            lines.append(
                f"- cppnp/{other}: "
                + ", ".join(f"{x:.2f}" for x in rs)
                + f" (median {statistics.median(rs):.2f}x)"
            )
        samples_txt = "; ".join(
            f"{s}: " + ", ".join(fmt(x) for x in samples[s][pl].get("GET", [])) for s in SERVERS
        )
        lines += ["", f"GET samples per round at -P {pl}: {samples_txt}.", ""]
    goals = [
        ("cppnp >= 1.3x uvloop at -P 16", per_round_ratios(samples, 16, "uvloop"), 1.3),
        ("cppnp >= 0.9x redis-server at -P 1", per_round_ratios(samples, 1, "redis-server"), 0.9),
        (
            "fraction of redis-server at -P 16 (reported; moonshot >= 0.5x)",
            per_round_ratios(samples, 16, "redis-server"),
            0.5,
        ),
    ]
    lines += [
        "## Goals (issue #10)",
        "",
        "Median of the per-round ratios (geometric mean over the tests).",
        "",
        "| goal | measured | met |",
        "| :--- | ---: | :--- |",
    ]
    for text, ratios, target in goals:
        value = statistics.median(ratios)
        lines.append(f"| {text} | {value:.2f}x | {'met' if value >= target else 'not met'} |")
    lines.append("")
    return lines


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n1", type=int, default=100_000, help="requests per test at -P 1")
    p.add_argument("--n16", type=int, default=500_000, help="requests per test at -P 16")
    p.add_argument("--quick", action="store_true", help="1 round, 20k/100k requests")
    p.add_argument("--out", default=None, help="results file stem (default resp-<date>)")
    p.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="print the report of an earlier run's JSON instead of measuring",
    )
    args = p.parse_args()
    if args.quick:
        args.rounds, args.n1, args.n16 = 1, 20_000, 100_000
    for tool in ("redis-benchmark", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y redis-tools redis-server")
    if args.render:
        data = json.loads(Path(args.render).read_text())
        samples = {s: {int(pl): v for pl, v in per.items()} for s, per in data["samples"].items()}
        medians = {s: {int(pl): v for pl, v in per.items()} for s, per in data["medians"].items()}
        print("\n".join(render(data["machine"], data["args"], samples, medians)))
        return 0
    pin = benchlib.can_pin([SERVER_CPU, CLIENT_CPU])
    info = benchlib.machine_info()
    info["pinned"] = pin
    info["date"] = time.strftime("%Y-%m-%d")
    info["redis"] = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    servers = start_servers(pin)
    samples: dict[str, dict[int, dict[str, list[float]]]] = {s: {1: {}, 16: {}} for s in SERVERS}
    try:
        for rnd in range(args.rounds):
            order = SERVERS[rnd % len(SERVERS) :] + SERVERS[: rnd % len(SERVERS)]
            for pipeline, n in ((1, args.n1), (16, args.n16)):
                for name in order:
                    port = servers[name].port
                    rows = run_benchmark(port, pipeline, n, pin)
                    rows.update(run_benchmark(port, pipeline, n, pin, MGET))
                    for test, rps in rows.items():
                        samples[name][pipeline].setdefault(test, []).append(rps)
                    print(
                        f"round {rnd + 1}/{args.rounds} -P {pipeline:<2} {name:<12} "
                        + " ".join(f"{t}={fmt(v)}" for t, v in rows.items()),
                        flush=True,
                    )
    finally:
        for sp in servers.values():
            sp.stop()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    medians = {
        s: {pl: {t: statistics.median(v) for t, v in tests.items()} for pl, tests in per.items()}
        for s, per in samples.items()
    }
    lines = render(info, vars(args), samples, medians)
    stem = args.out or f"resp-{time.strftime('%Y-%m-%d')}"
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stem}.md").write_text("\n".join(lines))
    (results / f"{stem}.json").write_text(
        json.dumps(
            {"machine": info, "args": vars(args), "samples": samples, "medians": medians}, indent=1
        )
    )
    print("\n".join(lines))
    print(f"wrote {results / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
