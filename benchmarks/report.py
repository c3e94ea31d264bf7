"""Render a benchmark results JSON into markdown tables and a PNG chart.

``run.py`` calls ``write_reports``; to re-render an existing run::

    python benchmarks/report.py benchmarks/results/2025-01-31.json

Every figure is read from the one results file, so all ratios compare numbers from
the same run.  A missing cell (server unavailable, failed or not selected) prints
as ``n/a``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NA = "n/a"
HEADLINE = (64, 100)  # the cell the project quotes: 64 B x 100 connections
NOISY_PCT = 10.0  # other processes used more than this share of the server's core
NOISE_MARK = "*"


class Results:
    """Lookup helpers over one results dict."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.cells: dict[tuple[str, int, int], dict[str, Any]] = {
            (m["server"], m["size"], m["conns"]): m for m in data["echo"]["medians"]
        }
        self.micro: dict[str, dict[str, Any]] = data["micro"].get("medians", {})
        self.servers = list(data["config"]["servers"])
        self.sizes = sorted({c[0] for s in data["config"]["servers"].values() for c in s["cells"]})
        self.conns = sorted({c[1] for s in data["config"]["servers"].values() for c in s["cells"]})

    def echo(self, server: str, size: int, conns: int, key: str) -> float | None:
        """Median *key* of an echo cell, or None."""
        value = self.cells.get((server, size, conns), {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def micro_value(self, bench: str, impl: str, key: str) -> float | None:
        """Median *key* of a micro-benchmark, or None."""
        value = self.micro.get(f"{bench}/{impl}", {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None


def fmt(value: float | None, digits: int = 0) -> str:
    """Number with thousands separators, or n/a."""
    if value is None:
        return NA
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    """``1.23x`` or n/a."""
    return NA if value is None else f"{value:.2f}x"


def size_label(size: int) -> str:
    """64 -> ``64 B``, 4096 -> ``4 KiB``."""
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """Markdown table; *align* is one char per column (l or r, default r but first l)."""
    aligns = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in aligns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def echo_tables(r: Results) -> list[str]:
    """Matrix tables: rt/s, p99, CPU per round trip (rows servers, columns cells)."""
    cells = [(size, n) for size in r.sizes for n in r.conns]
    header = ["server"] + [f"{size_label(s)} x {n}" for s, n in cells]
    out: list[str] = []
    metrics = (
        ("Round trips per second (median)", "rt_per_s", 0),
        ("p99 latency, µs (median of repeats)", "p99_us", 0),
        (
            "Server CPU per round trip, µs (utime+stime of all threads / round trips)",
            "cpu_us_per_rt",
            1,
        ),
    )
    for title, key, digits in metrics:
        out += [f"### {title}", ""]
        rows = [
            [name]
            + [fmt(r.echo(name, s, n, key), digits) + noise_mark(r, name, s, n) for s, n in cells]
            for name in r.servers
        ]
        out += table(header, rows)
    out += [
        f"Cells marked `{NOISE_MARK}` were disturbed: other processes used more than "
        f"{NOISY_PCT:.0f} % of the server's or the load generator's core during the "
        "measured window (median over repeats; `*_core_other_pct` in the JSON).",
        "",
    ]
    return out


def noise_mark(r: Results, server: str, size: int, conns: int) -> str:
    """``*`` when other load disturbed the cell on the server's or the client's core."""
    for key in ("server_core_other_pct", "client_core_other_pct"):
        other = r.echo(server, size, conns, key)
        if other is not None and other > NOISY_PCT:
            return NOISE_MARK
    return ""


def ratio_tables(r: Results) -> list[str]:
    """The ratios the project tracks, all from this run."""
    size, conns = HEADLINE
    cell = f"{size_label(size)} x {conns} conns"

    def rt(server: str, s: int = size, n: int = conns) -> float | None:
        return r.echo(server, s, n, "rt_per_s")

    def p99(server: str) -> float | None:
        return r.echo(server, size, conns, "p99_us")

    rows: list[list[str]] = []

    def add(what: str, a: str, b: str, av: float | None, bv: float | None, digits: int = 0) -> None:
        rows.append(
            [what, f"{a}: {fmt(av, digits)}", f"{b}: {fmt(bv, digits)}", fmt_ratio(ratio(av, bv))]
        )

    for fib in ("", "_fib20"):
        tag = " fib 20" if fib else ""
        for other in ("asyncio_exec2", "uvloop_exec2"):
            add(
                f"rt/s, pool(2){tag} vs {other.split('_')[0]}+executor(2){tag}",
                f"cppnp_pool2{fib}",
                f"{other}{fib}",
                rt(f"cppnp_pool2{fib}"),
                rt(f"{other}{fib}"),
            )
    for other in ("asyncio_exec2", "uvloop_exec2"):
        add(
            f"p99 µs, pool(2) vs {other.split('_')[0]}+executor(2) (lower is better)",
            "cppnp_pool2",
            other,
            p99("cppnp_pool2"),
            p99(other),
        )
    for pool in ("cppnp_pool1", "cppnp_pool2"):
        add(
            f"rt/s, {pool.replace('cppnp_', '')} vs plain (thread-pool overhead)",
            pool,
            "cppnp",
            rt(pool),
            rt("cppnp"),
        )
    add("rt/s, plain vs uvloop", "cppnp", "uvloop", rt("cppnp"), rt("uvloop"))
    add("rt/s, plain vs asyncio", "cppnp", "asyncio", rt("cppnp"), rt("asyncio"))
    add(
        "rt/s, plain vs c_echo (share of the C ceiling)",
        "cppnp",
        "c_echo",
        rt("cppnp"),
        rt("c_echo"),
    )
    add(
        "server CPU µs/rt, plain vs uvloop (lower is better)",
        "cppnp",
        "uvloop",
        r.echo("cppnp", size, conns, "cpu_us_per_rt"),
        r.echo("uvloop", size, conns, "cpu_us_per_rt"),
        2,
    )

    out = [f"### Headline ratios ({cell})", ""]
    out += table(["comparison", "a", "b", "a / b"], rows, "llrr")

    out += ["### cppnp plain per cell", ""]
    per_cell = []
    for s in r.sizes:
        for n in r.conns:
            cp, uv, ce = rt("cppnp", s, n), rt("uvloop", s, n), rt("c_echo", s, n)
            ccpu = r.echo("cppnp", s, n, "cpu_us_per_rt")
            ucpu = r.echo("uvloop", s, n, "cpu_us_per_rt")
            per_cell.append(
                [
                    f"{size_label(s)} x {n}",
                    fmt(cp),
                    fmt(uv),
                    fmt_ratio(ratio(cp, uv)),
                    fmt(ccpu, 1),
                    fmt(ucpu, 1),
                    fmt_ratio(ratio(ccpu, ucpu)),
                    fmt(ce),
                    fmt_ratio(ratio(cp, ce)),
                ]
            )
    out += table(
        [
            "cell",
            "cppnp rt/s",
            "uvloop rt/s",
            "cppnp/uvloop",
            "cppnp CPU µs/rt",
            "uvloop CPU µs/rt",
            "CPU cppnp/uvloop",
            "c_echo rt/s",
            "cppnp/c_echo",
        ],
        per_cell,
    )
    return out


MICRO_ROWS = (
    ("timers", "timers_per_s", "timers: schedule+fire, timers/s", 0),
    ("timers", "cancel_ops_per_s", "timers: schedule+cancel, ops/s", 0),
    ("handoff", "calls_per_s", "cross-thread hand-off, calls/s", 0),
    ("idle", "bytes_per_conn", "idle memory, bytes per connection (lower is better)", 0),
)


def micro_table(r: Results) -> list[str]:
    """Micro-benchmarks: values per implementation and ratios vs asyncio/uvloop."""
    rows = []
    for bench, key, label, digits in MICRO_ROWS:
        cp, aio, uv = (r.micro_value(bench, impl, key) for impl in ("cppnp", "asyncio", "uvloop"))
        rows.append(
            [
                label,
                fmt(cp, digits),
                fmt(aio, digits),
                fmt(uv, digits),
                fmt_ratio(ratio(cp, aio)),
                fmt_ratio(ratio(cp, uv)),
                fmt_ratio(ratio(uv, aio)),
            ]
        )
    cfg = r.data["config"]
    out = [
        "## Micro-benchmarks",
        "",
        f"Timers: {cfg['timer_count']:,} per test, delays 0-10 ms; hand-off: "
        f"{cfg['handoff_count']:,} callbacks; idle memory: {cfg['idle_conns']:,} connections. "
        "Each script runs pinned to one core.",
        "",
    ]
    out += table(
        [
            "benchmark",
            "cppnp",
            "asyncio",
            "uvloop",
            "cppnp/asyncio",
            "cppnp/uvloop",
            "uvloop/asyncio",
        ],
        rows,
    )
    errors = [
        f"- {run['bench']}/{run['impl']}: {run['error']}"
        for run in r.data["micro"]["runs"]
        if "error" in run
    ]
    if errors:
        out += ["Micro-benchmark failures:", "", *errors, ""]
    return out


def problems_section(r: Results) -> list[str]:
    """Failed servers and cells with mismatches or errors."""
    out: list[str] = []
    failed = r.data["echo"].get("failed_servers", {})
    if failed:
        out += ["## Servers that failed", ""]
        for name, why in failed.items():
            first = why.strip().splitlines()
            last = first[-1] if len(first) > 1 else ""
            out.append(f"- `{name}`: {first[0] if first else why}" + (f" ({last})" if last else ""))
        out.append("")
    bad = [run for run in r.data["echo"]["runs"] if run.get("problems")]
    if bad:
        out += ["## Cells with problems", ""]
        for run in bad:
            out.append(
                f"- r{run['repeat']} `{run['server']}` {size_label(run['size'])} x "
                f"{run['conns']}: {'; '.join(run['problems'])}"
                + ("" if run.get("ok") else " (excluded from medians)")
            )
        out.append("")
    return out


def markdown(data: dict[str, Any], png_name: str | None) -> str:
    """The whole report."""
    r = Results(data)
    m, cfg = data["machine"], data["config"]
    pin = (
        f"servers on CPU {cfg['server_cpu']}, load generator on CPU {cfg['client_cpu']}"
        if cfg["pinned"]
        else "not pinned (taskset unavailable)"
    )
    lines = [
        f"# cppnp benchmarks, {data['started'][:10]}" + (" (quick)" if cfg["quick"] else ""),
        "",
        f"- Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, kernel {m['kernel']}, {m['os']}",
        f"- Python {m['python']} ({m['python_impl']}), uvloop {m['uvloop'] or NA}, "
        f"cppnp {m['cppnp'] or 'not importable'}, {m['gcc'] or 'gcc ?'}",
        f"- Pinning: {pin}; load average at start {_loadavg(data['machine'])}, "
        f"at end {_loadavg(data)}",
        f"- Echo: ping-pong, {cfg['duration_s']} s measured after {cfg['warmup_s']} s warm-up "
        f"per cell, {cfg['repeats']} interleaved repeat(s), medians shown; "
        f"wall time {data.get('elapsed_s', 0):.0f} s"
        + (" — **INTERRUPTED, partial results**" if data.get("interrupted") else ""),
        "- Thread-pool/executor variants (`*_pool*`, `*_exec*`) run at 64 B only unless "
        "`--full-matrix`/`--sizes` was given.",
        "",
    ]
    if png_name:
        lines += [f"![echo benchmark]({png_name})", ""]
    lines += ["## Ratios", "", *ratio_tables(r), "## Echo matrix", "", *echo_tables(r)]
    lines += micro_table(r)
    lines += problems_section(r)
    return "\n".join(lines).rstrip() + "\n"


def _loadavg(d: dict[str, Any]) -> str:
    key = "loadavg_at_start" if "loadavg_at_start" in d else "loadavg_at_end"
    values = d.get(key)
    return " / ".join(f"{v:.2f}" for v in values) if values else NA


def plot(data: dict[str, Any], path: Path) -> bool:
    """Bar charts: all servers at the headline cell, and the main servers per size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return False
    r = Results(data)
    size, conns = HEADLINE
    fig = plt.figure(figsize=(13, 10))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.3, 1))
    names = r.servers[::-1]

    for col, (key, title, digits) in enumerate(
        (
            ("rt_per_s", f"round trips/s, {size_label(size)} x {conns} conns", 0),
            ("cpu_us_per_rt", "server CPU µs per round trip (lower is better)", 1),
        )
    ):
        ax = fig.add_subplot(grid[0, col])
        vals = [r.echo(n, size, conns, key) for n in names]
        ys = range(len(names))
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(-0.6, len(names) - 0.4)
        # Log scale: fib-20 servers are ~100x slower than the rest.
        ax.set_xscale("log")
        for y, name, v in zip(ys, names, vals):
            if v is None or v <= 0:
                ax.text(0.01, y, NA, va="center", fontsize=8, transform=ax.get_yaxis_transform())
                continue
            ax.barh(y, v, color=_color(name))
            ax.text(v, y, f" {fmt(v, digits)}", va="center", fontsize=8)
        ax.set_title(title + " (log scale)")
        ax.margins(x=0.15)

    ax = fig.add_subplot(grid[1, :])
    main = [n for n in ("c_echo", "cppnp", "uvloop", "asyncio") if n in r.servers]
    per_size_conns = max(r.conns) if r.conns else conns
    width = 0.8 / max(1, len(main))
    for i, name in enumerate(main):
        xs = [j + i * width for j in range(len(r.sizes))]
        vals = [r.echo(name, s, per_size_conns, "rt_per_s") for s in r.sizes]
        ax.bar(xs, [v or 0 for v in vals], width, label=name, color=_color(name))
        for x, v in zip(xs, vals):
            ax.text(
                x, v or 0, fmt(v) if v else NA, ha="center", va="bottom", fontsize=7, rotation=90
            )
    ax.set_xticks([j + width * (len(main) - 1) / 2 for j in range(len(r.sizes))])
    ax.set_xticklabels([size_label(s) for s in r.sizes])
    ax.set_ylabel("round trips/s")
    ax.set_title(f"per message size, {per_size_conns} conns")
    if main:
        ax.legend()
    ax.margins(y=0.3)
    fig.suptitle(f"cppnp echo benchmarks {data['started'][:10]} — {data['machine']['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _color(name: str) -> str:
    if name.startswith("cppnp"):
        return "tab:blue"
    if name.startswith("uvloop"):
        return "tab:green"
    if name.startswith("asyncio"):
        return "tab:orange"
    return "tab:gray"


def write_reports(data: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.md`` and ``<stem>.png`` into *out_dir*; return their paths."""
    paths: dict[str, Path] = {}
    png = out_dir / f"{stem}.png"
    if plot(data, png):
        paths["png"] = png
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(data, png.name if "png" in paths else None))
    paths["md"] = md
    return paths


def main(argv: list[str] | None = None) -> int:
    """Re-render the reports of an existing results JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    args = p.parse_args(argv)
    data = json.loads(args.results.read_text())
    for path in write_reports(data, args.results.parent, args.results.stem).values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
