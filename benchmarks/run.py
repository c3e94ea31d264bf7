"""Run cppnp's benchmark matrix: echo servers x message sizes x connection counts.

One command (``python benchmarks/run.py``) builds the C tools, runs every echo cell
with the C load generator, runs the micro-benchmarks (timers, cross-thread hand-off,
idle memory) and writes ``results/<date>.json``, ``.md``, ``.png`` and ``latest.md``.

Servers run pinned to CPU 0 and the load generator to CPU 1 (``taskset``; skipped
when unavailable).  Repeats are interleaved: every repeat walks all servers (in a
rotated order) before the next repeat starts, and the tables report medians.  For
each cell the server's CPU time (utime + stime of all its threads, from
``/proc/PID/stat``) is sampled at the edges of the measured window and divided by
the round trips.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import benchlib
import report
from benchlib import SERVERS, ServerProcess, ServerSpec

DEFAULT_SIZES = (64, 4096, 65536)
DEFAULT_CONNS = (1, 10, 100)
QUICK_SIZES = (64,)
QUICK_CONNS = (10, 100)
MICRO_BENCHES = ("timers", "handoff", "idle")
MICRO_IMPLS = ("cppnp", "asyncio", "uvloop")
MEDIAN_KEYS = (
    "rt_per_s",
    "mb_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "mean_us",
    "cpu_us_per_rt",
    "server_cpu_pct",
    "client_cpu_pct",
    "server_core_other_pct",
    "server_core_steal_pct",
    "client_core_other_pct",
    "client_core_steal_pct",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the runner."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="64 B x {10,100} conns, 1 repeat, fib-0 servers only, small micro runs",
    )
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per cell")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument(
        "--servers",
        default=None,
        help="comma list of server names, groups or globs (default: all); "
        f"names: {', '.join(SERVERS)}",
    )
    p.add_argument("--sizes", default=None, help="comma list of message sizes in bytes")
    p.add_argument("--conns", default=None, help="comma list of connection counts")
    p.add_argument(
        "--full-matrix",
        action="store_true",
        help="also run the thread-pool/executor variants at 4 KiB and 64 KiB",
    )
    p.add_argument(
        "--micro",
        default=",".join(MICRO_BENCHES),
        help="micro-benchmarks to run: timers,handoff,idle or 'none'",
    )
    p.add_argument("--micro-impls", default=",".join(MICRO_IMPLS))
    p.add_argument("--micro-repeats", type=int, default=1)
    p.add_argument("--timer-count", type=int, default=None, help="default 1M (quick: 200k)")
    p.add_argument("--handoff-count", type=int, default=None, help="default 1M (quick: 200k)")
    p.add_argument("--idle-conns", type=int, default=None, help="default 10000 (quick: 2000)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the Python servers and micro-benchmarks",
    )
    p.add_argument("--out", type=Path, default=benchlib.BENCH_DIR / "results")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.timer_count is None:
        args.timer_count = 200_000 if args.quick else 1_000_000
    if args.handoff_count is None:
        args.handoff_count = 200_000 if args.quick else 1_000_000
    if args.idle_conns is None:
        args.idle_conns = 2_000 if args.quick else 10_000
    return args


def int_list(text: str | None, default: tuple[int, ...]) -> list[int]:
    """Parse ``"64,4096"``; *default* when *text* is None."""
    if text is None:
        return list(default)
    return [int(x) for x in text.split(",") if x.strip()]


def select_servers(args: argparse.Namespace) -> list[ServerSpec]:
    """Servers picked by ``--servers`` (names, groups or globs); quick drops fib > 0."""
    specs = list(SERVERS.values())
    explicit: set[str] = set()
    if args.servers:
        tokens = [t.strip() for t in args.servers.split(",") if t.strip()]
        unknown = [
            t
            for t in tokens
            if not any(t in (s.name, s.group) or fnmatch.fnmatch(s.name, t) for s in specs)
        ]
        if unknown:
            sys.exit(f"unknown server(s): {', '.join(unknown)}; known: {', '.join(SERVERS)}")
        explicit = {t for t in tokens if t in SERVERS}
        specs = [
            s
            for s in specs
            if any(t in (s.name, s.group) or fnmatch.fnmatch(s.name, t) for t in tokens)
        ]
    if args.quick:
        specs = [s for s in specs if s.fib == 0 or s.name in explicit]
    return specs


def cells_for(spec: ServerSpec, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(size, conns) cells *spec* runs; pool/executor variants only at 64 B by default."""
    sizes = int_list(args.sizes, QUICK_SIZES if args.quick else DEFAULT_SIZES)
    conns = int_list(args.conns, QUICK_CONNS if args.quick else DEFAULT_CONNS)
    if not spec.full_matrix and args.sizes is None and not args.full_matrix:
        sizes = [s for s in sizes if s == 64]
    return [(size, n) for size in sizes for n in conns]


def run_cell(
    loadgen: Path,
    server: ServerProcess,
    size: int,
    conns: int,
    args: argparse.Namespace,
    server_cpu: int | None,
    client_cpu: int | None,
) -> dict[str, Any]:
    """Run the load generator against *server*; sample the server's CPU at the window edges."""
    marks: dict[str, float] = {}
    client_marks: dict[str, float] = {}
    cores: dict[tuple[str, int], tuple[int, int, int]] = {}

    def on_window(edge: str, loadgen_pid: int) -> None:
        try:
            marks[edge] = benchlib.proc_cpu_seconds(server.pid)  # the one that matters
            client_marks[edge] = benchlib.proc_cpu_seconds(loadgen_pid)
        except OSError:
            pass  # server gone; reported below
        for cpu in (server_cpu, client_cpu):
            if cpu is not None:
                cores[edge, cpu] = benchlib.cpu_ticks(cpu)

    result, rc, stderr = benchlib.run_loadgen(
        loadgen,
        server.port,
        conns=conns,
        size=size,
        duration=args.duration,
        warmup=args.warmup,
        client_cpu=client_cpu,
        on_window=on_window,
    )
    rec: dict[str, Any] = {"size": size, "conns": conns, **result, "loadgen_rc": rc}
    if stderr:
        rec["loadgen_stderr"] = "\n".join(stderr.splitlines()[-10:])
    if "window-start" in marks and "window-end" in marks and result.get("round_trips"):
        cpu = marks["window-end"] - marks["window-start"]
        rec["server_cpu_s"] = round(cpu, 3)
        rec["cpu_us_per_rt"] = round(cpu / result["round_trips"] * 1e6, 3)
        rec["server_cpu_pct"] = round(100 * cpu / result.get("window_s", args.duration), 1)
        # Whatever else ran on each pinned core during the window (other processes,
        # hypervisor steal): a noise indicator, not subtracted from anything.
        own = {
            "server": (server_cpu, cpu),
            "client": (
                client_cpu,
                client_marks.get("window-end", 0.0) - client_marks.get("window-start", 0.0),
            ),
        }
        for role, (core, used) in own.items():
            if core is None or ("window-end", core) not in cores:
                continue
            (b0, s0, t0), (b1, s1, t1) = cores["window-start", core], cores["window-end", core]
            ticks = max(1, t1 - t0)
            other = (b1 - b0) - used * benchlib.CLK_TCK
            rec[f"{role}_core_other_pct"] = round(max(0.0, 100 * other / ticks), 1)
            rec[f"{role}_core_steal_pct"] = round(100 * (s1 - s0) / ticks, 1)
    problems = []
    if not result:
        problems.append(f"no result from loadgen (rc {rc})")
    if result.get("mismatches"):
        problems.append(f"{result['mismatches']} echo mismatches")
    if result and not result.get("round_trips"):
        problems.append("no round trips")
    if result.get("stalled"):
        problems.append(f"{result['stalled']} stalled connections (echo lost or withheld)")
    if result.get("errors"):
        problems.append(f"{result['errors']} connection errors")
    if not server.alive():
        problems.append(f"server died (status {server.proc.poll() if server.proc else None})")
    # Any problem voids the cell for the medians; the raw run stays in the JSON.
    rec["ok"] = not problems
    if problems:
        rec["problems"] = problems
    return rec


def run_echo_matrix(
    args: argparse.Namespace,
    specs: list[ServerSpec],
    loadgen: Path,
    server_cpu: int | None,
    client_cpu: int | None,
    results: dict[str, Any],
) -> None:
    """All repeats of all cells; appends to ``results["echo"]`` as it goes."""
    echo = results["echo"]
    failed: dict[str, str] = echo["failed_servers"]
    total = sum(len(cells_for(s, args)) for s in specs) * args.repeats
    done = 0
    started = time.monotonic()
    for rep in range(args.repeats):
        shift = rep % len(specs) if specs else 0
        for spec in specs[shift:] + specs[:shift]:
            cells = cells_for(spec, args)
            if spec.name in failed:
                done += len(cells)
                continue
            server = ServerProcess(
                spec.name, benchlib.server_argv(spec, args.python), cpu=server_cpu
            )
            try:
                server.start()
            except benchlib.ServerStartError as exc:
                failed[spec.name] = str(exc)
                lines = str(exc).strip().splitlines()
                print(f"[{spec.name}] FAILED to start: {lines[0]} {lines[-1].strip()}", flush=True)
                done += len(cells)
                continue
            try:
                for size, conns in cells:
                    done += 1
                    if server.alive():
                        rec = run_cell(loadgen, server, size, conns, args, server_cpu, client_cpu)
                    else:
                        status = server.proc.poll() if server.proc else None
                        rec = {
                            "size": size,
                            "conns": conns,
                            "ok": False,
                            "problems": [f"server not running (status {status})"],
                        }
                    rec = {"server": spec.name, "repeat": rep, **rec}
                    echo["runs"].append(rec)
                    print(progress_line(rec, done, total, started), flush=True)
            finally:
                rc = server.stop()
                if rc not in (0, None, -signal.SIGINT, 130):
                    print(f"[{spec.name}] exit status {rc} after SIGINT", flush=True)


def progress_line(rec: dict[str, Any], done: int, total: int, started: float) -> str:
    """One line of progress output for a finished cell."""
    elapsed = time.monotonic() - started
    eta = elapsed / done * (total - done) if done else 0.0
    head = (
        f"[{done}/{total} eta {eta:4.0f}s] r{rec['repeat']} {rec['server']:<20} "
        f"{rec['size']:>6} B x {rec['conns']:>3}"
    )
    if not rec.get("rt_per_s") and rec.get("problems"):
        return f"{head}  FAILED: {'; '.join(rec['problems'])}"
    cpu = rec.get("cpu_us_per_rt")
    tail = (
        f"  {rec['rt_per_s']:>10.0f} rt/s  p99 {rec['p99_us']:>9.1f} us  "
        f"cpu {cpu if cpu is not None else 'n/a':>7} us/rt"
    )
    if rec.get("problems"):
        tail += f"  ! {'; '.join(rec['problems'])}"
    return head + tail


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each metric over the good repeats of every (server, size, conns)."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("ok"):
            groups.setdefault((run["server"], run["size"], run["conns"]), []).append(run)
    out = []
    for (server, size, conns), group in groups.items():
        row: dict[str, Any] = {"server": server, "size": size, "conns": conns, "n": len(group)}
        for key in MEDIAN_KEYS:
            vals = [r[key] for r in group if isinstance(r.get(key), (int, float))]
            row[key] = round(statistics.median(vals), 3) if vals else None
        rts = [r["rt_per_s"] for r in group]
        if len(rts) > 1 and row["rt_per_s"]:
            row["rt_spread_pct"] = round(100 * (max(rts) - min(rts)) / row["rt_per_s"], 1)
        row["errors"] = sum(r.get("errors", 0) for r in group)
        out.append(row)
    return out


def run_micro(args: argparse.Namespace, cpu: int | None, results: dict[str, Any]) -> None:
    """Run the selected micro-benchmarks for each implementation, interleaved."""
    benches = [] if args.micro == "none" else [b.strip() for b in args.micro.split(",")]
    impls = [i.strip() for i in args.micro_impls.split(",") if i.strip()]
    scripts = {
        "timers": ["timers_bench.py", "--n", str(args.timer_count)],
        "handoff": ["handoff_bench.py", "--n", str(args.handoff_count)],
        "idle": ["idle_memory.py", "--conns", str(args.idle_conns)],
    }
    micro = results["micro"]
    for bench in benches:
        if bench not in scripts:
            sys.exit(f"unknown micro-benchmark {bench!r}; choose from {', '.join(scripts)}")
    for rep in range(args.micro_repeats):
        for bench in benches:
            script, *extra = scripts[bench]
            for impl in impls:
                argv = [args.python, str(benchlib.BENCH_DIR / script), "--impl", impl, *extra]
                t0 = time.monotonic()
                res = benchlib.run_json_script(argv, timeout=300, cpu=cpu)
                res.update(
                    {
                        "bench": bench,
                        "impl": impl,
                        "repeat": rep,
                        "wall_s": round(time.monotonic() - t0, 2),
                    }
                )
                micro["runs"].append(res)
                summary = res.get("error") or ", ".join(
                    f"{k}={v}"
                    for k, v in res.items()
                    if k.endswith("_per_s") or k == "bytes_per_conn"
                )
                print(f"[micro r{rep}] {bench:<8} {impl:<8} {summary}", flush=True)
    micro["medians"] = micro_medians(micro["runs"])


def micro_medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"timers/cppnp": {metric: median}}`` over runs without errors."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if "error" not in run:
            groups.setdefault(f"{run['bench']}/{run['impl']}", []).append(run)
    out: dict[str, dict[str, Any]] = {}
    for key, group in groups.items():
        metrics = {
            k
            for r in group
            for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "repeat"
        }
        out[key] = {k: statistics.median(r[k] for r in group if k in r) for k in sorted(metrics)}
        out[key]["n"] = len(group)
    return out


def output_stem(out_dir: Path, quick: bool) -> str:
    """``YYYY-MM-DD`` (``-quick`` for quick runs), with ``-2``, ``-3``... if taken."""
    base = time.strftime("%Y-%m-%d") + ("-quick" if quick else "")
    stem, n = base, 1
    while (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run everything and write the reports; servers are always stopped."""
    args = parse_args(argv)
    # Handled (not ignored) signals reset to the default in exec'd children, so the
    # servers always get a working SIGINT even when this runs as a background job.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    pin = not args.no_pin and benchlib.can_pin([args.server_cpu, args.client_cpu])
    server_cpu = args.server_cpu if pin else None
    client_cpu = args.client_cpu if pin else None
    if not pin and not args.no_pin:
        print("note: taskset or CPUs unavailable; running unpinned", flush=True)

    specs = select_servers(args)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": benchlib.machine_info(args.python),
        "config": {
            "quick": args.quick,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "pinned": pin,
            "server_cpu": server_cpu,
            "client_cpu": client_cpu,
            "full_matrix": args.full_matrix,
            "servers": {
                s.name: {"argv": benchlib.server_argv(s, args.python), "cells": cells_for(s, args)}
                for s in specs
            },
            "timer_count": args.timer_count,
            "handoff_count": args.handoff_count,
            "idle_conns": args.idle_conns,
            "micro_repeats": args.micro_repeats,
        },
        "echo": {"runs": [], "failed_servers": {}, "medians": []},
        "micro": {"runs": [], "medians": {}},
        "interrupted": False,
    }
    try:
        loadgen = benchlib.build_c(benchlib.BENCH_DIR / "loadgen.c")
    except benchlib.BuildError as exc:
        print(f"cannot build the load generator: {exc}", file=sys.stderr)
        return 2
    for spec in specs:
        if spec.build:
            try:
                benchlib.build_c(benchlib.SERVERS_DIR / spec.build)
            except benchlib.BuildError as exc:
                results["echo"]["failed_servers"][spec.name] = str(exc)

    t0 = time.monotonic()
    try:
        if specs:
            run_echo_matrix(args, specs, loadgen, server_cpu, client_cpu, results)
        run_micro(args, server_cpu, results)
    except KeyboardInterrupt:
        results["interrupted"] = True
        print("\ninterrupted: stopping servers, writing partial results", file=sys.stderr)
    finally:
        benchlib.stop_all()
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["echo"]["medians"] = medians(results["echo"]["runs"])
    if not results["micro"]["medians"]:
        results["micro"]["medians"] = micro_medians(results["micro"]["runs"])

    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.out, args.quick)
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    paths = report.write_reports(results, args.out, stem)
    shutil.copyfile(paths["md"], args.out / "latest.md")
    print(f"\nwrote {json_path}")
    for path in paths.values():
        print(f"wrote {path}")
    print(f"wrote {args.out / 'latest.md'}  ({results['elapsed_s']:.0f} s)")
    return 130 if results["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
