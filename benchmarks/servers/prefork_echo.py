"""The cppnp echo server under the prefork supervisor, for benchmarks/scaling.py.

``prefork_echo.py --processes N [--threads T] [--fib K] --host H --port P``: what
``python -m cppnp echo --processes N`` runs (cppnp.cli.servers.serve_echo).  Prints
``listening on HOST:PORT`` once every child listens; SIGINT/SIGTERM drain and stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cppnp.cli.servers import serve_echo


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until SIGINT/SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "::1"))
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fib", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(process)d %(message)s")
    return serve_echo(
        args.host,
        args.port,
        processes=args.processes,
        threads=args.threads,
        fib=args.fib,
        drain_timeout=5.0,
    )


if __name__ == "__main__":
    sys.exit(main())
