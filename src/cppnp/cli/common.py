"""What every ``cppnp`` subcommand shares: one-line errors, checked argument types,
addresses printed as ``host:port`` / ``[v6]:port``, and serving until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, NoReturn

from cppnp import EventLoop, TcpServer, ThreadPool

__all__ = [
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "CliError",
    "CliParser",
    "add_server_options",
    "format_address",
    "int_range",
    "listen",
    "positive_float",
    "program_name",
    "serve_until_signal",
]

EXIT_USAGE = 2  # a bad command line (argparse's convention)
EXIT_RUNTIME = 1  # a good command line that failed (port in use, host unknown, ...)


class CliError(Exception):
    """A failure to report as one line on stderr, with an exit status; no traceback."""

    def __init__(self, message: str, status: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.status = status


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line: ``prog: error: what (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, "%s: error: %s (see %s --help)\n" % (self.prog, message, self.prog))


def int_range(name: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
        if value < lo or (hi is not None and value > hi):
            bound = "%d..%d" % (lo, hi) if hi is not None else ">= %d" % lo
            raise argparse.ArgumentTypeError("%s must be %s, got %d" % (name, bound, value))
        return value

    parse.__name__ = name
    return parse


def positive_float(name: str) -> Callable[[str], float]:
    """An argparse type: a finite number > 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError("%s must be > 0, got %s" % (name, text))
        return value

    parse.__name__ = name
    return parse


port_number = int_range("port", 0, 65535)


def format_address(address: tuple[Any, ...]) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 host (RFC 3986)."""
    host, port = address[0], address[1]
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def add_server_options(parser: argparse.ArgumentParser, port: int = 9000) -> None:
    """--host, --port, --reuse-port, -v: the options of every server subcommand."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address to listen on, IPv4 or IPv6 (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=port,
        metavar="PORT",
        help="TCP port, 0..65535; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so several processes can share the port",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def listen(
    loop: EventLoop, host: str, port: int, handler: Any, *, name: str, reuse_port: bool = False
) -> TcpServer:
    """Create and start a server; a bad address or a busy port is a CliError."""
    where = format_address((host, port))
    try:
        server = TcpServer(loop, (host, port), handler, name=name, reuse_port=reuse_port)
        server.start()
    except socket.gaierror as exc:
        raise CliError("cannot resolve host %r: %s" % (host, exc.strerror)) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CliError(
            "cannot listen on %s: %s" % (where, reason[:1].lower() + reason[1:])
        ) from None
    except ValueError as exc:
        raise CliError("cannot listen on %s: %s" % (where, exc), 2) from None
    return server


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(0) in the main thread while the block runs."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_until_signal(loop: EventLoop, server: TcpServer, pool: ThreadPool | None = None) -> int:
    """Print ``listening on ADDRESS``, run *loop* until SIGINT/SIGTERM, stop; exit 0."""
    print("listening on %s" % format_address(server.address), flush=True)
    with _sigterm_exits():
        try:
            loop.loop()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            server.stop()
            if pool is not None:
                pool.stop(drain=False)
    return 0


def program_name(argv0: str | None = None) -> str:
    """``python -m cppnp`` when run as a module, else ``cppnp`` (the console script)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return "python -m cppnp" if os.path.basename(argv0) == "__main__.py" else "cppnp"
