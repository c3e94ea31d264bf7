"""Count the hand-off's futex and sched_yield calls per message (issue 12).

For each server (plain cppnp echo and the seed's pool with 1 and 2 workers) and each
connection count, the server runs pinned to CPU 0 and the C load generator (64 B
ping-pong) to CPU 1.  A counter is attached to the server for the load generator's run:

- ``--tool perf`` (default): ``perf stat`` on the syscall tracepoints and the context
  switches -- cheap enough to leave the timing close to an unobserved run;
- ``--tool strace``: ``strace -c -f``, the issue's method (it slows every syscall, so
  the loop gathers more messages per pass and the per-message counts come out lower).

Messages are the server's ``readv`` calls (one per 64 B message: each ping-pong
connection has one message in flight).  Prints a Markdown table, and JSON with
``--json``.  Needs ``perf`` or ``strace`` and ``taskset``; Linux only.

    python benchmarks/handoff_syscalls.py --conns 10,100 --threads 0,1,2
    python benchmarks/handoff_syscalls.py --python .venv-ft/bin/python   # PYTHON_GIL=0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

EVENTS = ("futex", "sched_yield", "readv", "write", "epoll_wait")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    p.add_argument("--threads", default="0,1,2", help="pool sizes (0: plain echo)")
    p.add_argument("--conns", default="10,100", help="connection counts")
    p.add_argument("--duration", type=float, default=2.0, help="seconds of load per cell")
    p.add_argument("--tool", choices=("perf", "strace"), default="perf")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


def _counter_argv(tool: str, pid: int, out: Path) -> list[str]:
    if tool == "strace":
        return ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)]
    events = ",".join(f"syscalls:sys_enter_{e}" for e in EVENTS) + ",context-switches"
    return ["perf", "stat", "-e", events, "-p", str(pid), "-o", str(out)]


def _parse(tool: str, text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if tool == "strace":
            # % time  seconds  usecs/call  calls  [errors]  syscall
            if len(parts) >= 5 and parts[-1] in EVENTS and parts[3].isdigit():
                counts[parts[-1]] = int(parts[3])
        else:
            m = re.match(r"\s*([\d,]+)\s+(\S+)", line)
            if m:
                name = m.group(2).rsplit(":", 1)[-1].removeprefix("sys_enter_")
                counts[name] = int(m.group(1).replace(",", ""))
    return counts


def measure(args: argparse.Namespace, threads: int, conns: int) -> dict[str, Any]:
    """One cell: start the server, attach the counter, run the load, return the counts."""
    loadgen = benchlib.build_c(benchlib.BENCH_DIR / "loadgen.c")
    argv = [args.python, "-m", "cppnp", "echo", "--threads", str(threads), "--fib", "0"]
    argv += ["--host", benchlib.HOST, "--port", "0"]
    out = Path(benchlib.LOG_DIR) / f"handoff_syscalls_{threads}_{conns}.txt"
    with benchlib.ServerProcess(f"handoff-syscalls-{threads}", argv, cpu=0) as server:
        port = server.port
        counter = subprocess.Popen(
            _counter_argv(args.tool, server.pid, out),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)  # attached
            result, _rc, _err = benchlib.run_loadgen(
                loadgen,
                port,
                conns=conns,
                size=64,
                duration=args.duration,
                warmup=0.2,
                client_cpu=1,
                on_window=lambda _edge, _pid: None,
            )
        finally:
            counter.send_signal(signal.SIGINT)
            counter.wait(timeout=30)
    counts = _parse(args.tool, out.read_text(errors="replace"))
    msgs = max(counts.get("readv", 0), 1)
    row: dict[str, Any] = {
        "server": "cppnp" if threads == 0 else f"cppnp_pool{threads}",
        "conns": conns,
        "tool": args.tool,
        "rt_per_s": result.get("rt_per_s"),
        "messages": counts.get("readv", 0),
    }
    for name in ("futex", "sched_yield", "write", "epoll_wait", "context-switches"):
        row[name] = counts.get(name, 0)
        row[name + "_per_msg"] = round(counts.get(name, 0) / msgs, 3)
    row["futex_yield_per_msg"] = round(
        (counts.get("futex", 0) + counts.get("sched_yield", 0)) / msgs, 3
    )
    return row


def main(argv: list[str] | None = None) -> int:
    """Run every cell and print the table."""
    args = parse_args(argv)
    tool = "strace" if args.tool == "strace" else "perf"
    if shutil.which(tool) is None or not benchlib.can_pin((0, 1)):
        print(f"needs {tool} and taskset with CPUs 0 and 1", file=sys.stderr)
        return 2
    rows = []
    for conns in (int(c) for c in args.conns.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            rows.append(measure(args, threads, conns))
    print(
        "| server | conns | rt/s | messages | futex/msg | sched_yield/msg | "
        "futex+yield/msg | eventfd+other writes/msg | epoll_wait/msg |"
    )
    print("| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['server']} | {r['conns']} | {r['rt_per_s']:,.0f} | {r['messages']:,} | "
            f"{r['futex_per_msg']} | {r['sched_yield_per_msg']} | "
            f"{r['futex_yield_per_msg']} | {r['write_per_msg']} | {r['epoll_wait_per_msg']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
