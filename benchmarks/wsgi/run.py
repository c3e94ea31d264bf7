"""WSGI server benchmark: cppnp.wsgi against bjoern, granian, waitress, gunicorn and a raw
uvloop+httptools "hello" (the no-WSGI ceiling).

One server process at a time, pinned to CPU 0 (taskset); ``wrk -t1`` on CPU 1.  Every cell
runs once per round and the rounds alternate (cell order rotates), so a noisy neighbour
hits all servers alike; the report gives medians.  Server CPU per request is read from
/proc (utime+stime of the server's process tree over the measured run).

    python benchmarks/wsgi/run.py [--rounds 3] [--duration 5] [--quick] [--only cppnp,granian]
                                  [--io-threads 0,2]

``--io-threads 0,2`` adds, for every cppnp cell, a variant with ``--io-threads 2``; such a
server is not pinned (its io loops need more than one core), wrk stays on CPU 1.

Writes benchmarks/results/wsgi-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")
PY = sys.executable
BIN = os.path.dirname(PY)
CLK_TCK = os.sysconf("SC_CLK_TCK")
APPS = {"hello": "apps:hello", "flask": "apps:flask_app", "block2ms": "apps:block2ms"}


def server_argv(kind: str, app: str, threads: int, port: int, io_threads: int = 0) -> list[str]:
    target = APPS[app]
    if kind == "cppnp":
        io = ["--io-threads", str(io_threads)] if io_threads else []
        return [
            PY,
            "-m",
            "cppnp.wsgi",
            target,
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
            "--backlog",
            "4096",
            *io,
        ]
    if kind == "granian":
        return [
            os.path.join(BIN, "granian"),
            "--interface",
            "wsgi",
            "--workers",
            "1",
            "--runtime-threads",
            "1",
            "--blocking-threads",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--backlog",
            "4096",
            target,
        ]
    if kind == "waitress":
        return [
            os.path.join(BIN, "waitress-serve"),
            "--threads",
            str(threads),
            "--listen",
            "127.0.0.1:%d" % port,
            target,
        ]
    if kind == "gthread":
        return [
            os.path.join(BIN, "gunicorn"),
            "-w",
            "1",
            "-k",
            "gthread",
            "--threads",
            str(threads),
            "-b",
            "127.0.0.1:%d" % port,
            "--log-level",
            "warning",
            "--backlog",
            "4096",
            target,
        ]
    if kind == "sync":
        return [
            os.path.join(BIN, "gunicorn"),
            "-w",
            "1",
            "-k",
            "sync",
            "-b",
            "127.0.0.1:%d" % port,
            "--log-level",
            "warning",
            "--backlog",
            "4096",
            target,
        ]
    if kind == "bjoern":
        module, attr = target.split(":")
        return [
            PY,
            "-c",
            "import bjoern, %s as m; bjoern.run(m.%s, '127.0.0.1', %d)" % (module, attr, port),
        ]
    if kind == "raw":
        return [PY, os.path.join(HERE, "raw_uvloop.py"), str(port)]
    raise ValueError(kind)


@dataclass
class Cell:
    app: str
    server: str
    threads: int
    conns: int = 50
    io_threads: int = 0

    @property
    def key(self) -> str:
        io = "|io%d" % self.io_threads if self.io_threads else ""
        return "%s|%s|%d|c%d%s" % (self.app, self.server, self.threads, self.conns, io)

    @property
    def label(self) -> str:
        names = {
            "cppnp": "cppnp",
            "granian": "granian",
            "waitress": "waitress",
            "gthread": "gunicorn gthread",
            "sync": "gunicorn sync",
            "bjoern": "bjoern",
            "raw": "raw uvloop+httptools",
        }
        name = names[self.server]
        if self.server in ("cppnp", "granian", "waitress", "gthread"):
            name += " (%d thr)" % self.threads if self.threads else " (--threads 0)"
        if self.io_threads:
            name += " --io-threads %d, not pinned" % self.io_threads
        return name


def cells(quick: bool) -> list[Cell]:
    out: list[Cell] = []
    for srv, thr in (
        ("raw", 0),
        ("bjoern", 0),
        ("cppnp", 0),
        ("cppnp", 4),
        ("granian", 4),
        ("waitress", 4),
        ("gthread", 4),
        ("sync", 0),
    ):
        out.append(Cell("hello", srv, thr))
    for srv, thr in (
        ("bjoern", 0),
        ("cppnp", 0),
        ("cppnp", 4),
        ("granian", 4),
        ("waitress", 4),
        ("gthread", 4),
        ("sync", 0),
    ):
        out.append(Cell("flask", srv, thr))
    for n in (4, 16):
        for srv in ("cppnp", "granian", "waitress", "gthread"):
            out.append(Cell("block2ms", srv, n))
    out.append(Cell("block2ms", "bjoern", 0))
    out.append(Cell("block2ms", "sync", 0))
    for srv, thr in (
        ("raw", 0),
        ("bjoern", 0),
        ("cppnp", 0),
        ("cppnp", 4),
        ("granian", 4),
        ("waitress", 4),
        ("gthread", 4),
    ):
        out.append(Cell("hello", srv, thr, 1000))
    if quick:
        out = [c for c in out if c.server in ("cppnp", "granian", "bjoern")]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(root: int) -> float:
    """utime+stime (s) of *root* and its descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()
        stats[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    total = 0.0
    todo = [root]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(p for p, (pp, _) in stats.items() if pp == pid)
    return total


def established(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", "( sport = :%d )" % port],
        capture_output=True,
        text=True,
    ).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def wait_up(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not come up")


def parse_wrk(out: str) -> dict[str, Any]:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    def dur(text: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        assert m, text
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {
        "rps": num(r"Requests/sec:\s+([\d.]+)"),
        "requests": int(num(r"(\d+) requests in")),
        "p99_ms": dur(p99.group(1)) if p99 else None,
        "socket_errors": errors,
        "non2xx": int(num(r"Non-2xx or 3xx responses: (\d+)")),
    }


def run_cell(cell: Cell, duration: float) -> dict[str, Any]:
    port = free_port()
    # With io threads the server needs both cores: not pinned (wrk stays on CPU 1).
    pin = ["taskset", "-c", "0"] if not cell.io_threads else []
    argv = [*pin, *server_argv(cell.server, cell.app, cell.threads, port, cell.io_threads)]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Output to a file, never to an unread pipe: a server that logs (waitress warns about
    # its task queue under load) would block on a full pipe.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_up(port, proc)
        url = "http://127.0.0.1:%d/" % port
        wrk = [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            "-c%d" % cell.conns,
            "--latency",
            "--timeout",
            "10s",
        ]
        subprocess.run([*wrk, "-d1s", url], capture_output=True, timeout=60)  # warm-up
        cpu0 = tree_cpu(proc.pid)
        w = subprocess.Popen(
            [*wrk, "-d%gs" % duration, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(duration / 2)
        conns_seen = established(port)
        out, _ = w.communicate(timeout=duration + 60)
        cpu1 = tree_cpu(proc.pid)
        res = parse_wrk(out)
        res["cpu_us_per_req"] = (cpu1 - cpu0) / res["requests"] * 1e6 if res["requests"] else None
        res["established_mid_run"] = conns_seen
        return res
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@dataclass
class Summary:
    cell: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        vals = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None


def fmt_rps(v: float | None) -> str:
    if v is None:
        return "-"
    return "%.1fk" % (v / 1000) if v >= 10000 else f"{v:,.0f}"


def report(summaries: dict[str, Summary], meta: dict[str, Any]) -> str:
    lines = [
        "# WSGI servers, one process each (%s)" % meta["date"],
        "",
        "`make bench-wsgi` (%s): server on CPU 0 (taskset), `wrk -t1` on CPU 1, %d "
        "rounds of %g s per cell, cells alternating; medians.  Python %s, %s.  "
        "Server CPU per request from /proc (utime+stime of the server's process tree)."
        % (meta["command"], meta["rounds"], meta["duration"], meta["python"], meta["versions"]),
        "",
    ]
    groups = [
        ("hello", 50, "plain WSGI hello, -c50"),
        ("flask", 50, "Flask hello, -c50"),
        ("block2ms", 50, "app blocks 2 ms, -c50 (ideal: threads / 2 ms)"),
        ("hello", 1000, "plain WSGI hello, -c1000"),
    ]
    for app, conns, title in groups:
        rows = [s for s in summaries.values() if s.cell["app"] == app and s.cell["conns"] == conns]
        if not rows:
            continue
        lines += [
            "## " + title,
            "",
            "| server | req/s | server CPU / req | p99 | errors | conns mid-run |",
            "| :--- | ---: | ---: | ---: | ---: | ---: |",
        ]
        rows.sort(
            key=lambda s: (s.cell["threads"], s.cell.get("io_threads", 0), -(s.median("rps") or 0))
        )
        for s in rows:
            cpu = s.median("cpu_us_per_req")
            p99 = s.median("p99_ms")
            errs = max((r["socket_errors"] + r["non2xx"]) for r in s.runs)
            lines.append(
                "| %s | %s | %s | %s | %d | %d |"
                % (
                    s.cell["label"],
                    fmt_rps(s.median("rps")),
                    "%.1f µs" % cpu if cpu is not None else "-",
                    "%.2f ms" % p99 if p99 is not None else "-",
                    errs,
                    int(s.median("established_mid_run") or 0),
                )
            )
        lines.append("")
    return "\n".join(lines)


def versions() -> str:
    out = []
    for name in ("granian", "bjoern", "waitress", "gunicorn", "uvloop", "httptools", "flask"):
        try:
            from importlib.metadata import version

            out.append("%s %s" % (name, version(name)))
        except Exception:
            pass
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, fewer servers")
    ap.add_argument("--only", default="", help="comma-separated servers to run")
    ap.add_argument("--apps", default="", help="comma-separated apps (hello,flask,block2ms)")
    ap.add_argument("--conns", default="", help="comma-separated connection counts")
    ap.add_argument("--out", default="", help="results file stem (default wsgi-<date>)")
    ap.add_argument(
        "--io-threads",
        default="0",
        help="comma-separated io_threads values for the cppnp cells (default 0; "
        "0,2 adds an --io-threads 2 variant of each)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    for tool in ("wrk", "taskset", "ss"):
        if shutil.which(tool) is None:
            raise SystemExit("%s is needed" % tool)
    todo = cells(args.quick)
    if args.only:
        keep = set(args.only.split(","))
        todo = [c for c in todo if c.server in keep]
    if args.apps:
        keep = set(args.apps.split(","))
        todo = [c for c in todo if c.app in keep]
    if args.conns:
        keep_n = {int(x) for x in args.conns.split(",")}
        todo = [c for c in todo if c.conns in keep_n]
    ios = [int(x) for x in args.io_threads.split(",")]
    todo = [
        dataclasses.replace(c, io_threads=n) if c.server == "cppnp" else c
        for c in todo
        for n in (ios if c.server == "cppnp" else [0])
    ]
    summaries = {c.key: Summary(dict(asdict(c), label=c.label)) for c in todo}
    for rnd in range(args.rounds):
        order = todo[rnd % len(todo) :] + todo[: rnd % len(todo)]
        for cell in order:
            try:
                res = run_cell(cell, args.duration)
            except Exception as exc:  # a peer that fails to start is reported
                res = {"error": str(exc)[-500:], "socket_errors": 0, "non2xx": 0}
            summaries[cell.key].runs.append(res)
            print(
                "round %d %-40s %s"
                % (rnd + 1, cell.key, json.dumps({k: v for k, v in res.items() if k != "error"})),
                flush=True,
            )
    date = datetime.date.today().isoformat()
    meta = {
        "date": date,
        "rounds": args.rounds,
        "duration": args.duration,
        "python": platform.python_version(),
        "versions": versions(),
        "command": "benchmarks/wsgi/run.py " + " ".join(argv or sys.argv[1:]),
    }
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, args.out or "wsgi-%s" % date)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "cells": [asdict(s) for s in summaries.values()]}, f, indent=1)
    from goals import goals_markdown

    text = report(summaries, meta) + "\n" + goals_markdown([asdict(s) for s in summaries.values()])
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
