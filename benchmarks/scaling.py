"""Multi-core scaling of cppnp: prefork processes on CPython 3.11, the seed's pool on
free-threaded CPython 3.13t (GIL off), and a model for 8, 16 and 64 cores.

``python benchmarks/scaling.py --python-ft .venv-ft/bin/python`` (= ``make bench-scaling``)
runs 64 B ping-pong on 100 connections (the C load generator, ``loadgen.c``) against
each server configuration below, in interleaved repeats: the configurations run in a
fixed order on even repeats and in reverse on odd ones, so the two sides of every
compared pair run next to each other in both orders.  Ratios are the median of the
per-repeat ratios of adjacent runs.  At the edges of the measured window it samples the
CPU time of the server's whole process tree and of each of its threads (``/proc``), and
the busy time of both cores, which gives the CPU other processes took during the window
(the machine is shared).  Writes ``results/scaling-<date>.json`` and ``.md``.

Pinning (2 cores): a server that should use both cores runs with ``taskset -c 0,1`` and
the load generator with ``taskset -c 1``, sharing a core with the server (the work is
fib(20), about 1 ms per message, so the load generator needs about 1 % of a core); the
no-work hand-off rows keep ``run.py``'s layout (server on CPU 0, load generator on 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import ServerProcess

HERE = Path(__file__).resolve().parent
PREFORK = "{servers}/prefork_echo.py"
AIO = "{servers}/asyncio_echo.py"
IOECHO = "{servers}/io_threads_echo.py"
CPPNP = ("-m", "cppnp", "echo")


@dataclass(frozen=True)
class Config:
    """One server configuration: interpreter (``py`` = CPython 3.11, ``ft`` = 3.13t with
    PYTHON_GIL=0), arguments, CPUs for the server and for the load generator."""

    name: str
    interp: str
    argv: tuple[str, ...]
    server_cpus: str
    client_cpu: int
    what: str
    par: int = 1  # how many threads/processes can run the work at once


BOTH = "0,1"
CONFIGS = (
    Config(
        "py_prefork1_fib20",
        "py",
        (PREFORK, "--processes", "1", "--threads", "1", "--fib", "20"),
        BOTH,
        1,
        "3.11, prefork 1 child, pool of 1, fib(20)",
    ),
    Config(
        "py_prefork2_fib20",
        "py",
        (PREFORK, "--processes", "2", "--threads", "1", "--fib", "20"),
        BOTH,
        1,
        "3.11, prefork 2 children, pool of 1 each, fib(20)",
        2,
    ),
    Config(
        "py_prefork2_t0_fib20",
        "py",
        (PREFORK, "--processes", "2", "--threads", "0", "--fib", "20"),
        BOTH,
        1,
        "3.11, prefork 2 children, fib(20) on the loop thread",
        2,
    ),
    Config(
        "py_prefork1_t0_fib20",
        "py",
        (PREFORK, "--processes", "1", "--threads", "0", "--fib", "20"),
        BOTH,
        1,
        "3.11, prefork 1 child, fib(20) on the loop thread",
    ),
    Config(
        "py_pool2_fib20",
        "py",
        (*CPPNP, "--threads", "2", "--fib", "20"),
        BOTH,
        1,
        "3.11, one process, pool of 2, fib(20) (GIL-bound reference)",
    ),
    Config(
        "ft_pool1_fib20",
        "ft",
        (*CPPNP, "--threads", "1", "--fib", "20"),
        BOTH,
        1,
        "3.13t GIL off, seed echo, pool of 1, fib(20)",
    ),
    Config(
        "ft_pool2_fib20",
        "ft",
        (*CPPNP, "--threads", "2", "--fib", "20"),
        BOTH,
        1,
        "3.13t GIL off, seed echo, pool of 2, fib(20)",
        2,
    ),
    Config(
        "ft_aio_exec2_fib20",
        "ft",
        (AIO, "--executor", "2", "--fib", "20"),
        BOTH,
        1,
        "3.13t GIL off, asyncio + run_in_executor(2 threads), fib(20)",
        2,
    ),
    Config(
        "ft_aio_exec1_fib20",
        "ft",
        (AIO, "--executor", "1", "--fib", "20"),
        BOTH,
        1,
        "3.13t GIL off, asyncio + run_in_executor(1 thread), fib(20)",
    ),
    Config(
        "ft_plain",
        "ft",
        (*CPPNP, "--threads", "0", "--fib", "0"),
        "0",
        1,
        "3.13t GIL off, plain echo on the loop thread",
    ),
    Config(
        "ft_pool2_nowork",
        "ft",
        (*CPPNP, "--threads", "2", "--fib", "0"),
        "0",
        1,
        "3.13t GIL off, seed echo, pool of 2, no work (the hand-off)",
    ),
    Config(
        "ft_aio_exec2_nowork",
        "ft",
        (AIO, "--executor", "2"),
        "0",
        1,
        "3.13t GIL off, asyncio + run_in_executor(2 threads), no work",
    ),
    # TcpServer(io_threads=N): both on both cores, the load generator sharing CPU 1, so
    # the two io loops can use both cores (the load generator then competes with them).
    Config(
        "ft_io0_plain",
        "ft",
        (IOECHO, "--io-threads", "0"),
        BOTH,
        1,
        "3.13t GIL off, plain echo, io_threads=0 (the base loop serves)",
    ),
    Config(
        "ft_io2_plain",
        "ft",
        (IOECHO, "--io-threads", "2"),
        BOTH,
        1,
        "3.13t GIL off, plain echo, io_threads=2",
        2,
    ),
)
BY_NAME = {c.name: c for c in CONFIGS}

# (label, a, b, goal): rt/s of a / rt/s of b.
PAIRS = (
    (
        "3.11: --processes 2 vs --processes 1, fib(20) (pool of 1 per child)",
        "py_prefork2_fib20",
        "py_prefork1_fib20",
        1.8,
    ),
    (
        "3.11: --processes 2 vs 1, fib(20) on the loop thread (--threads 0)",
        "py_prefork2_t0_fib20",
        "py_prefork1_t0_fib20",
        None,
    ),
    (
        "3.11: --processes 2 vs one process with a pool of 2, fib(20)",
        "py_prefork2_fib20",
        "py_pool2_fib20",
        None,
    ),
    ("3.13t: seed echo fib(20), pool of 2 vs pool of 1", "ft_pool2_fib20", "ft_pool1_fib20", 1.8),
    (
        "3.13t: seed echo fib(20) pool of 2 vs asyncio + executor(2)",
        "ft_pool2_fib20",
        "ft_aio_exec2_fib20",
        1.2,
    ),
    (
        "3.13t: asyncio + executor fib(20), 2 threads vs 1",
        "ft_aio_exec2_fib20",
        "ft_aio_exec1_fib20",
        None,
    ),
    (
        "3.13t: no-work hand-off 64 B x 100, pool of 2 vs asyncio + executor(2)",
        "ft_pool2_nowork",
        "ft_aio_exec2_nowork",
        4.0,
    ),
    (
        "3.13t: no-work hand-off, pool of 2 vs plain echo (hand-off overhead)",
        "ft_pool2_nowork",
        "ft_plain",
        None,
    ),
    (
        "3.13t: plain echo 64 B x 100, io_threads=2 vs 0 (both cores; load generator-bound)",
        "ft_io2_plain",
        "ft_io0_plain",
        None,
    ),
)

FIB_MICRO = r"""
import json, sys, threading, time
def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)
cpu = []
def work(k):
    t0 = time.thread_time()
    for _ in range(k): fib(20)
    cpu.append(time.thread_time() - t0)
K = int(sys.argv[1])
out = {"gil": getattr(sys, "_is_gil_enabled", lambda: True)()}
for n in (1, 2):
    cpu.clear()
    ts = [threading.Thread(target=work, args=(K,)) for _ in range(n)]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    out["threads%d_s" % n] = time.perf_counter() - t0
    out["cpu_ms_per_fib%d" % n] = 1000 * sum(cpu) / (n * K)
out["fib20_ms"] = out["cpu_ms_per_fib1"]
# wall-clock: 1.0 = two threads in the time of one (needs two free cores);
# CPU: 1.0 = a fib(20) costs as much CPU with two threads running as with one.
out["efficiency2"] = out["threads1_s"] / out["threads2_s"]
out["cpu_efficiency2"] = out["cpu_ms_per_fib1"] / out["cpu_ms_per_fib2"]
print(json.dumps(out))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the scaling benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default=sys.executable, help="CPython 3.11 (or any GIL build)")
    p.add_argument(
        "--python-ft",
        default=None,
        help="free-threaded 3.13t with cppnp installed (its rows are skipped without it)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--conns", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument(
        "--only",
        default=None,
        help="comma list of configuration names; io_threads = the io_threads row "
        "(ft_io0_plain,ft_io2_plain)",
    )
    p.add_argument(
        "--quiet-pct",
        type=float,
        default=15.0,
        help="before each run wait (up to --max-wait s) until other processes "
        "use less than this share of both cores; runs whose window saw "
        "more are marked noisy and left out of the medians when enough "
        "quiet ones exist",
    )
    p.add_argument("--max-wait", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only recompute the summaries of this results JSON and rewrite it and its .md",
    )
    return p.parse_args(argv)


# ---- /proc sampling -----------------------------------------------------------------------


def children_of(ppid: int) -> list[int]:
    """Live processes whose parent is *ppid*."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = benchlib.stat_fields(f"/proc/{name}/stat")
        except OSError:
            continue
        if int(fields[1]) == ppid and fields[0] not in ("Z", "X"):
            out.append(int(name))
    return sorted(out)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of *pid* (tid -> utime + stime)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = benchlib.stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        out[int(tid)] = benchlib.stat_cpu_seconds(fields)
    return out


def sample(server_pid: int, client_pid: int) -> dict[str, Any]:
    """CPU of the server tree (per process, per thread), of the client, and of both cores."""
    procs = [server_pid, *children_of(server_pid)]
    snap: dict[str, Any] = {"t": time.monotonic(), "procs": {}, "threads": {}}
    for pid in procs:
        try:
            snap["procs"][pid] = benchlib.proc_cpu_seconds(pid)
        except OSError:
            continue
        snap["threads"][pid] = thread_cpu(pid)
    try:
        snap["client"] = benchlib.proc_cpu_seconds(client_pid)
    except OSError:
        snap["client"] = 0.0
    snap["cores"] = {cpu: benchlib.cpu_ticks(cpu) for cpu in (0, 1)}
    return snap


def diff(
    a: dict[str, Any], b: dict[str, Any], server_pid: int, round_trips: int, window: float
) -> dict[str, Any]:
    """Per-round-trip CPU figures between samples *a* and *b*."""
    us = 1e6 / round_trips
    procs = {pid: b["procs"][pid] - a["procs"].get(pid, 0.0) for pid in b["procs"]}
    rec: dict[str, Any] = {
        "server_cpu_us_per_rt": round(sum(procs.values()) * us, 3),
        "server_cores": round(sum(procs.values()) / window, 3),
    }
    children = [pid for pid in procs if pid != server_pid]
    if children:  # prefork: the parent, then each child
        rec["parent_cpu_us_per_rt"] = round(procs.get(server_pid, 0.0) * us, 3)
        rec["child_cpu_us_per_rt"] = [round(procs[pid] * us, 3) for pid in children]
    loop_cpu = worker_cpu = 0.0
    for pid in children or [server_pid]:  # the serving processes
        ta, tb = a["threads"].get(pid, {}), b["threads"].get(pid, {})
        for tid, cpu in tb.items():
            used = cpu - ta.get(tid, 0.0)
            if tid == pid:
                loop_cpu += used  # the main thread runs the loop
            else:
                worker_cpu += used
    nproc = len(children) or 1
    # Every thread's busy fraction, the main thread first (io_threads rows: the io loops
    # are the other threads).
    pid0 = (children or [server_pid])[0]
    ta0, tb0 = a["threads"].get(pid0, {}), b["threads"].get(pid0, {})
    rec["threads_busy_pct"] = [
        round(100 * (tb0[tid] - ta0.get(tid, 0.0)) / window, 1)
        for tid in sorted(tb0, key=lambda t: (t != pid0, t))
    ]
    rec["loop_thread_us_per_rt"] = round(loop_cpu * us, 3)
    rec["worker_threads_us_per_rt"] = round(worker_cpu * us, 3)
    rec["loop_busy_pct"] = round(100 * loop_cpu / nproc / window, 1)
    client = b["client"] - a["client"]
    busy = sum(b["cores"][c][0] - a["cores"][c][0] for c in (0, 1)) / benchlib.CLK_TCK
    total = sum(b["cores"][c][2] - a["cores"][c][2] for c in (0, 1)) / benchlib.CLK_TCK
    other = busy - sum(procs.values()) - client
    rec["other_load_pct"] = round(max(0.0, 100 * other / max(total, 1e-9)), 1)
    rec["steal_pct"] = round(
        100
        * sum(b["cores"][c][1] - a["cores"][c][1] for c in (0, 1))
        / benchlib.CLK_TCK
        / max(total, 1e-9),
        1,
    )
    return rec


# ---- running ------------------------------------------------------------------------------


def run_cell(
    loadgen: Path, server: ServerProcess, cfg: Config, args: argparse.Namespace
) -> dict[str, Any]:
    """One load-generator run against *server* with window-edge samples."""
    marks: dict[str, dict[str, Any]] = {}

    def on_window(edge: str, loadgen_pid: int) -> None:
        marks[edge] = sample(server.pid, loadgen_pid)

    result, rc, _ = benchlib.run_loadgen(
        loadgen,
        server.port,
        conns=args.conns,
        size=args.size,
        duration=args.duration,
        warmup=args.warmup,
        client_cpu=cfg.client_cpu,
        on_window=on_window,
    )
    rec: dict[str, Any] = {"server": cfg.name, **result, "loadgen_rc": rc}
    if "window-start" in marks and "window-end" in marks and result.get("round_trips"):
        rec.update(
            diff(
                marks["window-start"],
                marks["window-end"],
                server.pid,
                result["round_trips"],
                result.get("window_s", args.duration),
            )
        )
    problems = []
    if not result.get("round_trips"):
        problems.append(f"no round trips (loadgen rc {rc})")
    for key in ("mismatches", "stalled", "errors"):
        if result.get(key):
            problems.append(f"{result[key]} {key}")
    if not server.alive():
        problems.append("server died")
    rec["ok"] = not problems
    if problems:
        rec["problems"] = problems
    return rec


def interp_path(cfg: Config, args: argparse.Namespace) -> str | None:
    return args.python if cfg.interp == "py" else args.python_ft


def server_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    if cfg.interp == "ft":
        env["PYTHON_GIL"] = "0"
    return env


def machine_busy_pct(interval: float = 1.0) -> float:
    """Share of both cores busy (all processes) over *interval* seconds."""
    a = [benchlib.cpu_ticks(c) for c in (0, 1)]
    time.sleep(interval)
    b = [benchlib.cpu_ticks(c) for c in (0, 1)]
    busy = sum(y[0] - x[0] for x, y in zip(a, b))
    total = sum(y[2] - x[2] for x, y in zip(a, b))
    return 100.0 * busy / max(total, 1)


def wait_quiet(args: argparse.Namespace) -> tuple[float, float]:
    """Wait until the machine is quiet (bounded); return (busy %, seconds waited)."""
    t0 = time.monotonic()
    busy = machine_busy_pct()
    while busy > args.quiet_pct and time.monotonic() - t0 < args.max_wait:
        time.sleep(1.0)
        busy = machine_busy_pct()
    return busy, time.monotonic() - t0


def run_all(
    args: argparse.Namespace, configs: list[Config], loadgen: Path, results: dict[str, Any]
) -> None:
    subst = {"servers": str(benchlib.SERVERS_DIR)}
    total = len(configs) * args.repeats
    done = 0
    for rep in range(args.repeats):
        order = configs if rep % 2 == 0 else configs[::-1]
        for cfg in order:
            done += 1
            python = interp_path(cfg, args)
            assert python is not None
            argv = [
                python,
                *(part.format(**subst) for part in cfg.argv),
                "--host",
                benchlib.HOST,
                "--port",
                "0",
            ]
            busy, waited = wait_quiet(args)
            server = ServerProcess(
                cfg.name, ["taskset", "-c", cfg.server_cpus, *argv], env=server_env(cfg)
            )
            try:
                server.start()
            except benchlib.ServerStartError as exc:
                rec = {"server": cfg.name, "ok": False, "problems": [str(exc)[:500]]}
            else:
                try:
                    rec = run_cell(loadgen, server, cfg, args)
                finally:
                    rc = server.stop()
                rec["server_exit"] = rc
            rec["repeat"] = rep
            rec["order"] = done
            rec["busy_before_pct"] = round(busy, 1)
            rec["waited_s"] = round(waited, 1)
            rec["quiet"] = rec.get("other_load_pct", 100.0) <= args.quiet_pct
            results["runs"].append(rec)
            print(progress(rec, done, total), flush=True)


def progress(rec: dict[str, Any], done: int, total: int) -> str:
    head = f"[{done}/{total}] r{rec['repeat']} {rec['server']:<22}"
    if not rec.get("ok"):
        return f"{head} FAILED: {'; '.join(rec.get('problems', []))}"
    return (
        f"{head} {rec['rt_per_s']:>9.0f} rt/s  p99 {rec['p99_us']:>8.0f} us  "
        f"cpu {rec.get('server_cpu_us_per_rt', 0):>7.1f} us/rt  "
        f"loop {rec.get('loop_thread_us_per_rt', 0):>6.1f}  "
        f"other {rec.get('other_load_pct', 0):>4.1f}%"
    )


def fib_micro(python: str, env: dict[str, str], k: int = 1000) -> dict[str, Any]:
    """fib(20) in 1 and then 2 threads of *python*: the interpreter's own scaling."""
    out = subprocess.run(
        [*benchlib.pin_prefix(None), python, "-c", FIB_MICRO, str(k)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return dict(json.loads(line))
    return {"error": out.stderr[-500:]}


# ---- summaries ----------------------------------------------------------------------------

MED_KEYS = (
    "rt_per_s",
    "p99_us",
    "server_cpu_us_per_rt",
    "server_cores",
    "loop_thread_us_per_rt",
    "worker_threads_us_per_rt",
    "loop_busy_pct",
    "parent_cpu_us_per_rt",
    "client_cpu_pct",
    "other_load_pct",
    "steal_pct",
)


MIN_QUIET = 3


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: medians over its quiet runs when there are MIN_QUIET of them,
    else over all its good runs (``noisy`` then says so)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["server"] for r in runs):
        good = [r for r in runs if r["server"] == name and r.get("ok")]
        quiet = [r for r in good if r.get("quiet")]
        use = quiet if len(quiet) >= min(MIN_QUIET, len(good)) else good
        row: dict[str, Any] = {
            "n": len(use),
            "good": len(good),
            "quiet": len(quiet),
            "noisy": use is good and len(quiet) < len(good),
            "failed": sum(1 for r in runs if r["server"] == name) - len(good),
        }
        for key in MED_KEYS:
            vals = [r[key] for r in use if isinstance(r.get(key), (int, float))]
            row[key] = round(statistics.median(vals), 3) if vals else None
        rts = [r["rt_per_s"] for r in use]
        if len(rts) > 1:
            row["rt_spread_pct"] = round(100 * (max(rts) - min(rts)) / statistics.median(rts), 1)
        out[name] = row
    return out


def pair_ratios(runs: list[dict[str, Any]], a: str, b: str, quiet_only: bool) -> list[float]:
    """rt/s ratio a/b for every repeat in which both ran (adjacent runs)."""
    out = []
    for rep in sorted({r["repeat"] for r in runs}):
        ra = [r for r in runs if r["repeat"] == rep and r["server"] == a and r.get("ok")]
        rb = [r for r in runs if r["repeat"] == rep and r["server"] == b and r.get("ok")]
        if ra and rb and (not quiet_only or (ra[0].get("quiet") and rb[0].get("quiet"))):
            out.append(ra[0]["rt_per_s"] / rb[0]["rt_per_s"])
    return out


def capacity(name: str, meds: dict[str, dict[str, Any]]) -> float | None:
    """rt/s the configuration would reach on its cores with nothing else running, from its
    CPU per round trip: par units each serve 1e6 / cpu rt/s, and each serving process's
    loop thread at most 1e6 / loop.  An upper bound: waiting that burns no CPU (a lock
    convoy) does not show in CPU time."""
    row, cfg = meds.get(name), BY_NAME[name]
    if not row or not row.get("server_cpu_us_per_rt"):
        return None
    cores = len(cfg.server_cpus.split(","))
    par = min(cfg.par, cores)
    x = par * 1e6 / row["server_cpu_us_per_rt"]
    loop = row.get("loop_thread_us_per_rt")
    nproc = cfg.par if "prefork" in cfg.name else 1
    if loop:
        x = min(x, nproc * 1e6 / loop)
    return x


def pairs_table(
    runs: list[dict[str, Any]], meds: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    for label, a, b, goal in PAIRS:
        if a not in meds or b not in meds:
            continue
        ratios = pair_ratios(runs, a, b, quiet_only=True)
        everything = pair_ratios(runs, a, b, quiet_only=False)
        noisy = len(ratios) < min(MIN_QUIET, len(everything))
        if noisy:
            ratios = everything
        row: dict[str, Any] = {
            "label": label,
            "a": a,
            "b": b,
            "goal": goal,
            "a_rt": meds[a]["rt_per_s"],
            "b_rt": meds[b]["rt_per_s"],
            "ratios": [round(x, 3) for x in ratios],
            "noisy": noisy,
            "all_ratios": [round(x, 3) for x in everything],
        }
        ca, cb = capacity(a, meds), capacity(b, meds)
        if ca and cb:
            row["cpu_derived_ratio"] = round(ca / cb, 3)
        if ratios:
            row["ratio"] = round(statistics.median(ratios), 3)
            row["ratio_min"] = round(min(ratios), 3)
            row["ratio_max"] = round(max(ratios), 3)
            if goal is not None:
                row["met"] = row["ratio"] >= goal
        rows.append(row)
    return rows


def model(meds: dict[str, dict[str, Any]], micro: dict[str, Any], conns: int) -> dict[str, Any]:
    """Expected speed-up at 8, 16 and 64 cores from the measured costs (see the report)."""
    out: dict[str, Any] = {}
    ft1, ft2 = meds.get("ft_pool1_fib20"), meds.get("ft_pool2_fib20")
    plain, nowork = meds.get("ft_plain"), meds.get("ft_pool2_nowork")
    if ft2 and ft2.get("loop_thread_us_per_rt") and ft2.get("worker_threads_us_per_rt"):
        loop = ft2["loop_thread_us_per_rt"]  # at ~the fib rate: a wakeup per reply
        work = ft2["worker_threads_us_per_rt"]
        # At scale the loop runs at the hand-off rate, where it batches: its cost there.
        loop_rate = (nowork or {}).get("loop_thread_us_per_rt") or loop
        eff = 1.0
        if ft1 and ft1.get("worker_threads_us_per_rt"):
            eff = min(1.0, ft1["worker_threads_us_per_rt"] / work)
        handoff = None
        if (
            plain
            and nowork
            and plain.get("server_cpu_us_per_rt")
            and nowork.get("server_cpu_us_per_rt")
        ):
            handoff = round(nowork["server_cpu_us_per_rt"] - plain["server_cpu_us_per_rt"], 3)
        rows = {}
        for n in (2, 8, 16, 64):
            # Loop and workers share N cores: X(N) = min(N * e / (L + W), 1 / L_rate).
            x_n = min(n * eff / (loop + work), 1 / loop_rate) * 1e6
            rows[n] = {"rt_per_s": round(x_n), "speedup": round(x_n * (loop + work) / 1e6, 1)}
        out["ft_pool"] = {
            "loop_us_per_rt": loop,
            "loop_us_per_rt_at_rate": loop_rate,
            "worker_us_per_rt": work,
            "serial_fraction": round(loop / (loop + work), 5),
            "speedup_cap": round((loop + work) / loop_rate, 1),
            "worker_efficiency2": round(eff, 3),
            "interp_cpu_efficiency2": micro.get("ft", {}).get("cpu_efficiency2"),
            "handoff_us_per_rt": handoff,
            "loop_capacity_rt_per_s": round(1e6 / loop_rate),
            "cores": rows,
        }
    p1, p2 = meds.get("py_prefork1_fib20"), meds.get("py_prefork2_fib20")
    if p1 and p2 and p1.get("server_cpu_us_per_rt") and p2.get("server_cpu_us_per_rt"):
        c1, c2 = p1["server_cpu_us_per_rt"], p2["server_cpu_us_per_rt"]
        eff = min(1.0, c1 / c2)
        rows = {}
        for n in (2, 8, 16, 64):
            spread = {}
            for c in (conns, 10 * conns):
                busy = n * (1 - (1 - 1 / n) ** c)  # listeners with >= 1 connection
                spread[c] = round(busy * eff, 1)
            rows[n] = spread
        out["prefork"] = {
            "cpu_us_per_rt_1": c1,
            "cpu_us_per_rt_2": c2,
            "parent_cpu_us_per_rt": p2.get("parent_cpu_us_per_rt"),
            "per_process_efficiency": round(eff, 3),
            "cores": rows,
        }
    return out


def fmt(x: Any, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def io_threads_section(results: dict[str, Any]) -> list[str]:
    """The io_threads row: each thread's busy fraction (median over the good runs)."""
    rows = [c for c in CONFIGS if c.name.startswith("ft_io") and c.name in results["medians"]]
    if not rows:
        return []
    lines = [
        "## io_threads: loop threads' busy fraction",
        "",
        "| server | rt/s | server CPU µs/rt | cores used | main thread (base loop) busy "
        "| io loop threads busy | client CPU |",
        "| :--- | ---: | ---: | ---: | ---: | :--- | ---: |",
    ]
    for cfg in rows:
        med = results["medians"][cfg.name]
        good = [r for r in results["runs"] if r["server"] == cfg.name and r.get("ok")]
        per = [r["threads_busy_pct"] for r in good if r.get("threads_busy_pct")]
        width = max((len(p) for p in per), default=0)
        busy = [
            statistics.median(p[i] for p in per if len(p) > i) if per else None
            for i in range(width)
        ]
        main = fmt(busy[0], ".0f") + "%" if busy else "n/a"
        others = ", ".join(fmt(x, ".0f") + "%" for x in busy[1:]) or "—"
        lines.append(
            f"| {cfg.name} | {fmt(med['rt_per_s'])} | {fmt(med['server_cpu_us_per_rt'], '.1f')}"
            f" | {fmt(med['server_cores'], '.2f')} | {main} | {others} | "
            f"{fmt(med['client_cpu_pct'], '.0f')}% |"
        )
    lines += [
        "",
        "Busy: a thread's CPU time over the measured window (`/proc/PID/task/TID/stat`). "
        "Both servers may use both cores and the load generator shares CPU 1 with them: "
        "on 2 cores the load generator, not the server, is the limit (compare its CPU "
        "with the io threads'), so rt/s cannot show the io threads' scaling; server CPU "
        "per round trip and the threads' busy fractions are the figures to read.",
        "",
    ]
    return lines


def render(results: dict[str, Any]) -> str:
    meds, pairs, mdl = results["medians"], results["pairs"], results["model"]
    m = results["machine"]
    lines = [
        f"# cppnp multi-core scaling, {results['started'][:10]}",
        "",
        f"- Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, kernel {m['kernel']}; "
        f"load average at start {m['loadavg_at_start']}, at end {results['loadavg_at_end']}",
        f"- Interpreters: {results['interpreters']}",
        f"- 64 B ping-pong, {results['config']['conns']} connections, "
        f"{results['config']['duration_s']} s measured after "
        f"{results['config']['warmup_s']} s warm-up, {results['config']['repeats']} "
        "interleaved repeats (order reversed on odd repeats); medians; wall "
        f"{results['elapsed_s']:.0f} s",
        "- Pinning: `*_fib20` servers `taskset -c 0,1` (both cores) with the load "
        "generator on CPU 1; `ft_plain`/`*_nowork` servers on CPU 0, load generator on "
        "CPU 1 (as `run.py`); `ft_io*` (the io_threads row) on both cores with the load "
        "generator on CPU 1.",
        "",
    ]
    lines += [
        "## Goals",
        "",
        "| comparison | a rt/s | b rt/s | a / b (median of paired runs) "
        "| min-max | pairs | goal | | a / b from CPU per rt |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | :--- | ---: |",
    ]
    for row in pairs:
        goal = "—" if row["goal"] is None else f"≥ {row['goal']}x"
        met = "" if row.get("met") is None else ("met" if row["met"] else "**not met**")
        lines.append(
            f"| {row['label']} | {fmt(row['a_rt'])} | {fmt(row['b_rt'])} | "
            f"{fmt(row.get('ratio'), '.2f')}x | {fmt(row.get('ratio_min'), '.2f')}-"
            f"{fmt(row.get('ratio_max'), '.2f')} | {len(row['ratios'])}"
            f"{' (noisy)' if row['noisy'] else ''} | {goal} | {met} | "
            f"{fmt(row.get('cpu_derived_ratio'), '.2f')}x |"
        )
    lines += [
        "",
        "`a / b from CPU per rt`: the ratio the two would reach with their cores to "
        "themselves, computed from the CPU each used per round trip (each of `par` "
        "threads or processes that can run the work at once serves 1e6 / CPU-per-rt "
        "rt/s, capped by the loop thread's own CPU per rt). It is an upper bound "
        "(waiting that burns no CPU does not show), but does not depend on how much "
        "CPU other processes took, unlike the measured ratio.",
        "",
    ]
    lines += [
        "",
        "## Every configuration (medians)",
        "",
        "| server | what | rt/s | spread | p99 µs | server CPU µs/rt | cores used "
        "| loop thread µs/rt | workers µs/rt | loop busy | client CPU | other load | n |",
        "| :--- | :--- |" + " ---: |" * 11,
    ]
    for name, row in meds.items():
        cfg = BY_NAME[name]
        lines.append(
            f"| {name} | {cfg.what} | {fmt(row['rt_per_s'])} | "
            f"{fmt(row.get('rt_spread_pct'), '.0f')}% | {fmt(row['p99_us'])} | "
            f"{fmt(row['server_cpu_us_per_rt'], '.1f')} | {fmt(row['server_cores'], '.2f')} | "
            f"{fmt(row['loop_thread_us_per_rt'], '.1f')} | "
            f"{fmt(row['worker_threads_us_per_rt'], '.1f')} | "
            f"{fmt(row['loop_busy_pct'], '.0f')}% | {fmt(row['client_cpu_pct'], '.0f')}% | "
            f"{fmt(row['other_load_pct'], '.0f')}% | {row['n']}"
            f"{' (noisy)' if row['noisy'] else ''} |"
        )
    lines += [
        "",
        "`cores used`: the server's CPU time over the window (all its processes "
        "and threads). `loop thread`/`workers`: CPU of the serving processes' main "
        "thread (the loop) and of their other threads, per round trip (for prefork "
        "rows: summed over the children; `loop busy` is per child). `other load`: CPU "
        "that other processes used on the two cores during the window, as a share of "
        "both cores. "
        f"Runs with other load above {results['config']['quiet_pct']:.0f}% are left out "
        "of the medians and ratios when at least 3 quiet ones exist; `(noisy)` marks a "
        "figure that had to use them. `n`: runs in the median.",
        "",
    ]
    lines += io_threads_section(results)
    micro = results.get("fib_micro", {})
    if micro:
        lines += [
            "## The interpreter alone",
            "",
            "fib(20) x K in one thread, then in two threads at once (no sockets):",
            "",
            "| interpreter | GIL | fib(20) CPU ms, 1 thread | 2 threads | "
            "CPU efficiency | wall-clock speed-up |",
            "| :--- | :--- | ---: | ---: | ---: | ---: |",
        ]
        for key, res in micro.items():
            if "error" in res or "cpu_efficiency2" not in res:
                lines.append(f"| {key} | | {res.get('error', 'not measured by CPU time')} | |")
                continue
            lines.append(
                f"| {key} | {'on' if res['gil'] else 'off'} | "
                f"{res['cpu_ms_per_fib1']:.3f} | {res['cpu_ms_per_fib2']:.3f} | "
                f"{res['cpu_efficiency2']:.2f} | {2 * res['efficiency2']:.2f}x |"
            )
        lines.append("")
    if mdl:
        lines += ["## Model: expected scaling at 8, 16, 64 cores", ""]
        ft = mdl.get("ft_pool")
        if ft:
            lines += [
                f"Free-threaded pool, fib(20), per request: workers W = "
                f"{ft['worker_us_per_rt']:.0f} µs of CPU, the loop thread L = "
                f"{ft['loop_us_per_rt']:.1f} µs at this rate (it wakes for almost every reply) "
                f"and {ft['loop_us_per_rt_at_rate']:.1f} µs at the no-work hand-off's rate "
                "(where it batches; the rate it runs at with many cores). The serial "
                f"fraction is L/(L+W) = {ft['serial_fraction']:.4f}; one loop thread can feed "
                f"{ft['loop_capacity_rt_per_s']:,} requests/s, a speed-up cap of "
                f"{ft['speedup_cap']:.0f}x. The hand-off itself (pool of 2 without work, minus "
                f"plain echo) costs {fmt(ft['handoff_us_per_rt'], '.1f')} µs of CPU per "
                "request. Workers' CPU per request with 1 worker / with 2: e = "
                f"{ft['worker_efficiency2']:.2f} (the interpreter alone: "
                f"{fmt(ft['interp_cpu_efficiency2'], '.2f')}). Assuming e holds at N threads "
                "(3.13t immortalizes module-level functions and code objects once a thread "
                "starts, so fib's calls share no reference counts; the pool's queue lock is "
                "taken once per batch of up to 16 tasks) and the clients run elsewhere: "
                "X(N) = min(N·e/(L+W), 1/L_rate).",
                "",
                "| cores | rt/s | speed-up vs 1 core |",
                "| ---: | ---: | ---: |",
            ]
            for n, row in ft["cores"].items():
                lines.append(f"| {n} | {row['rt_per_s']:,} | {row['speedup']}x |")
            lines.append("")
        pf = mdl.get("prefork")
        if pf:
            conns = results["config"]["conns"]
            lines += [
                f"Prefork, 3.11, fib(20): server CPU per request {pf['cpu_us_per_rt_1']:.0f} µs "
                f"with 1 child and {pf['cpu_us_per_rt_2']:.0f} µs with 2 (per-process "
                f"efficiency e = {pf['per_process_efficiency']:.2f}); the parent used "
                f"{fmt(pf['parent_cpu_us_per_rt'], '.3f')} µs per request. Nothing is shared "
                "between children in user space, so the serial fraction is ~0; what limits "
                "N processes is how SO_REUSEPORT spreads C connections: a connection stays "
                "with the child it hashed to, and a child without connections idles. "
                "Expected busy children N(1-(1-1/N)^C), times e:",
                "",
                f"| processes | speed-up, C = {conns} | speed-up, C = {10 * conns} |",
                "| ---: | ---: | ---: |",
            ]
            for n, row in pf["cores"].items():
                vals = list(row.values())
                lines.append(f"| {n} | {vals[0]}x | {vals[1]}x |")
            lines.append("")
    failed = [r for r in results["runs"] if not r.get("ok")]
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            lines.append(f"- r{r['repeat']} {r['server']}: {'; '.join(r.get('problems', []))}")
        lines.append("")
    return "\n".join(lines) + "\n"


def output_stem(out_dir: Path) -> str:
    base = "scaling-" + time.strftime("%Y-%m-%d")
    stem, n = base, 1
    while (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def summarize(results: dict[str, Any]) -> None:
    """(Re)compute medians, pair ratios and the model from the raw runs."""
    results["medians"] = medians(results["runs"])
    results["pairs"] = pairs_table(results["runs"], results["medians"])
    results["model"] = model(
        results["medians"], results.get("fib_micro", {}), results["config"]["conns"]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        summarize(results)
        args.render.write_text(json.dumps(results, indent=1) + "\n")
        args.render.with_suffix(".md").write_text(render(results))
        print(f"wrote {args.render} and {args.render.with_suffix('.md')}")
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not benchlib.can_pin([0, 1]):
        sys.exit("scaling.py needs taskset and CPUs 0 and 1")
    only = None if args.only is None else set(args.only.split(","))
    if only is not None and "io_threads" in only:  # the io_threads row: both of its sides
        only |= {"ft_io0_plain", "ft_io2_plain"}
    configs = [c for c in CONFIGS if only is None or c.name in only]
    if args.python_ft is None or not shutil.which(args.python_ft):
        skipped = [c.name for c in configs if c.interp == "ft"]
        if skipped:
            print(f"note: no --python-ft: skipping {', '.join(skipped)}", flush=True)
        configs = [c for c in configs if c.interp != "ft"]
    loadgen = benchlib.build_c(benchlib.BENCH_DIR / "loadgen.c")
    interps = {"py": args.python, "ft": args.python_ft}
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": benchlib.machine_info(args.python),
        "interpreters": {k: benchlib._first_line([v, "-VV"]) for k, v in interps.items() if v},
        "config": {
            "repeats": args.repeats,
            "duration_s": args.duration,
            "quiet_pct": args.quiet_pct,
            "max_wait_s": args.max_wait,
            "warmup_s": args.warmup,
            "conns": args.conns,
            "size": args.size,
            "configs": {
                c.name: {
                    "interp": c.interp,
                    "argv": c.argv,
                    "server_cpus": c.server_cpus,
                    "client_cpu": c.client_cpu,
                }
                for c in configs
            },
        },
        "runs": [],
        "interrupted": False,
    }
    t0 = time.monotonic()
    try:
        micro = {}
        for key, python in interps.items():
            if python and any(c.interp == key for c in configs):
                wait_quiet(args)
                env = dict(os.environ, PYTHON_GIL="0") if key == "ft" else dict(os.environ)
                micro[key] = fib_micro(python, env)
                print(f"[fib micro] {key}: {micro[key]}", flush=True)
        results["fib_micro"] = micro
        run_all(args, configs, loadgen, results)
    except KeyboardInterrupt:
        results["interrupted"] = True
        print("\ninterrupted: writing partial results", file=sys.stderr)
    finally:
        benchlib.stop_all()
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.out)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(render(results))
    print(f"\nwrote {args.out / stem}.json and .md ({results['elapsed_s']:.0f} s)")
    return 130 if results["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
