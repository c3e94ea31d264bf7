"""The goals of issue 13 as ratios, from a bench-wsgi results file.

    python benchmarks/wsgi/goals.py benchmarks/results/wsgi-<date>.json   # prints a table

run.py appends the same table to the .md it writes.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _median(cell: dict[str, Any], key: str) -> float | None:
    vals = [r[key] for r in cell["runs"] if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def goal_rows(cells: list[dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    """(goal, measured, target, met) rows."""
    by: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for c in cells:
        k = c["cell"]
        if k.get("io_threads", 0):
            continue  # the goals are for one server core
        by[(k["app"], k["server"], k["threads"], k["conns"])] = c

    def m(app: str, server: str, threads: int, key: str, conns: int = 50) -> float | None:
        c = by.get((app, server, threads, conns))
        return _median(c, key) if c else None

    rows: list[tuple[str, str, str, bool | None]] = []

    def ratio(
        goal: str,
        a: float | None,
        b: float | None,
        target: float,
        higher: bool = True,
        unit: str = "x",
    ) -> None:
        if a is None or b is None or not b:
            rows.append((goal, "n/a", "%s %.2f%s" % (">=" if higher else "<=", target, unit), None))
            return
        r = a / b
        ok = r >= target if higher else r <= target
        rows.append(
            (goal, "%.2f%s" % (r, unit), "%s %.2f%s" % (">=" if higher else "<=", target, unit), ok)
        )

    ratio(
        "hello, --threads 0: server CPU/req vs bjoern",
        m("hello", "cppnp", 0, "cpu_us_per_req"),
        m("hello", "bjoern", 0, "cpu_us_per_req"),
        1.0,
        higher=False,
    )
    ratio(
        "hello, --threads 4: req/s vs granian",
        m("hello", "cppnp", 4, "rps"),
        m("hello", "granian", 4, "rps"),
        1.2,
    )
    ratio(
        "hello, --threads 4: req/s vs gunicorn gthread",
        m("hello", "cppnp", 4, "rps"),
        m("hello", "gthread", 4, "rps"),
        5.0,
    )
    ratio(
        "hello, --threads 4: req/s vs waitress",
        m("hello", "cppnp", 4, "rps"),
        m("hello", "waitress", 4, "rps"),
        4.0,
    )
    ratio(
        "hello, --threads 4: CPU/req, granian / cppnp (same work, less CPU = higher)",
        m("hello", "granian", 4, "cpu_us_per_req"),
        m("hello", "cppnp", 4, "cpu_us_per_req"),
        1.2,
    )
    ratio(
        "Flask, --threads 4: req/s vs granian",
        m("flask", "cppnp", 4, "rps"),
        m("flask", "granian", 4, "rps"),
        1.1,
    )
    ratio(
        "Flask, --threads 4: req/s vs waitress",
        m("flask", "cppnp", 4, "rps"),
        m("flask", "waitress", 4, "rps"),
        2.0,
    )
    for n in (4, 16):
        rps = m("block2ms", "cppnp", n, "rps")
        ratio("2 ms app, %d threads: req/s vs ideal (%d)" % (n, n * 500), rps, n * 500.0, 0.95)
        ratio(
            "2 ms app, %d threads: req/s vs granian" % n,
            rps,
            m("block2ms", "granian", n, "rps"),
            1.0,
        )
        ratio(
            "2 ms app, %d threads: CPU/req vs granian" % n,
            m("block2ms", "cppnp", n, "cpu_us_per_req"),
            m("block2ms", "granian", n, "cpu_us_per_req"),
            1.0,
            higher=False,
        )
    c1000 = by.get(("hello", "cppnp", 4, 1000))
    if c1000:
        errors = max(r.get("socket_errors", 0) + r.get("non2xx", 0) for r in c1000["runs"])
        seen = min(r.get("established_mid_run", 0) for r in c1000["runs"])
        rows.append(
            (
                "-c1000, --threads 4: every connection served, no errors",
                "%d established mid-run, %d errors" % (seen, errors),
                "1000, 0",
                seen >= 1000 and errors == 0,
            )
        )
    ratio(
        "-c1000, --threads 4: req/s vs its -c50 figure",
        m("hello", "cppnp", 4, "rps", 1000),
        m("hello", "cppnp", 4, "rps"),
        0.9,
    )
    ratio(
        "-c1000, --threads 4: p99 vs granian's",
        m("hello", "cppnp", 4, "p99_ms", 1000),
        m("hello", "granian", 4, "p99_ms", 1000),
        1.0,
        higher=False,
    )
    return rows


def goals_markdown(cells: list[dict[str, Any]]) -> str:
    lines = [
        "## Goals (issue 13), as ratios of the medians above",
        "",
        "| goal | measured | target | met |",
        "| :--- | ---: | ---: | :---: |",
    ]
    for goal, measured, target, ok in goal_rows(cells):
        lines.append(
            "| %s | %s | %s | %s |"
            % (goal, measured, target, "n/a" if ok is None else ("met" if ok else "not met"))
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        data = json.load(f)
    print(goals_markdown(data["cells"]))
