"""Idle-connection memory: server RSS growth per idle TCP connection.

Starts the echo server for ``--impl`` (cppnp: ``python -m cppnp echo --threads 0
--fib 0``; asyncio/uvloop: ``servers/asyncio_echo.py``) as a subprocess, reads its
VmRSS, opens ``--conns`` idle connections from this process, waits until the server
has accepted all of them (its fd count), lets it settle, reads VmRSS again and
reports ``bytes_per_conn = (after - before) / conns``.  Kernel socket buffers are
not part of RSS, so this is the server's own per-connection state.

RLIMIT_NOFILE is raised to the hard limit here and inherited by the server (the
asyncio server also raises its own); if the hard limit is too low for ``--conns``
the count is reduced and ``conns_capped`` is set.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import time
from typing import Any

import benchlib

IMPL_SERVER = {"cppnp": "cppnp", "asyncio": "asyncio", "uvloop": "uvloop"}


def raise_nofile(want: int) -> int:
    """Raise the soft fd limit towards the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_accepted(pid: int, want_fds: int, timeout: float) -> int:
    """Wait until *pid* holds at least *want_fds* descriptors; return its count."""
    deadline = time.monotonic() + timeout
    count = benchlib.proc_fd_count(pid)
    while count < want_fds and time.monotonic() < deadline:
        time.sleep(0.01)
        count = benchlib.proc_fd_count(pid)
    return count


def measure(impl: str, conns: int, python: str, settle: float) -> dict[str, Any]:
    """Open *conns* idle connections to a fresh server; return the RSS figures."""
    spec = benchlib.SERVERS[IMPL_SERVER[impl]]
    out: dict[str, Any] = {"bench": "idle_memory", "impl": impl}
    limit = raise_nofile(conns + 256)
    if limit < conns + 256:
        out["conns_capped"] = True
        conns = max(1, limit - 256)
    out["conns"] = conns

    socks: list[socket.socket] = []
    with benchlib.ServerProcess(f"idle_{impl}", benchlib.server_argv(spec, python)) as server:
        time.sleep(settle)
        rss0 = benchlib.proc_rss_bytes(server.pid)
        fd0 = benchlib.proc_fd_count(server.pid)
        t0 = time.monotonic()
        try:
            batch = 256
            for i in range(conns):
                socks.append(socket.create_connection((benchlib.HOST, server.port), timeout=10))
                if (i + 1) % batch == 0:  # keep the accept queue short: no SYN retries
                    wait_accepted(server.pid, fd0 + i + 1 - batch, 10)
            accepted = wait_accepted(server.pid, fd0 + conns, 30) - fd0
            out["connect_s"] = round(time.monotonic() - t0, 3)
            time.sleep(settle)
            # One echo proves the server still serves with all connections open.
            probe = socks[-1]
            probe.sendall(b"ping")
            out["echo_ok"] = probe.recv(16) == b"ping"
            rss1 = benchlib.proc_rss_bytes(server.pid)
        finally:
            for s in socks:
                s.close()
        out.update(
            {
                "accepted": accepted,
                "rss_before": rss0,
                "rss_after": rss1,
                "bytes_per_conn": round((rss1 - rss0) / conns, 1),
            }
        )
        if accepted < conns:
            out["error"] = f"server accepted only {accepted} of {conns} connections"
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=sorted(IMPL_SERVER), required=True)
    p.add_argument("--conns", type=int, default=10_000)
    p.add_argument("--python", default=sys.executable, help="interpreter for the server")
    p.add_argument("--settle", type=float, default=0.5, help="seconds to wait before reading RSS")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"bench": "idle_memory", "impl": args.impl}
    return benchlib.print_result(
        out, lambda: measure(args.impl, args.conns, args.python, args.settle)
    )


if __name__ == "__main__":
    sys.exit(main())
