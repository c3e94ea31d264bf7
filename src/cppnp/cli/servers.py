"""``cppnp echo|discard|daytime``: the classic test servers (RFC 862, 863, 867); echo
with ``--threads``/``--fib`` is the seed's EchoServer handing each message to a pool."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any, TextIO

from cppnp import Buffer, EventLoop, ICppnpUsr, IRun2, Task, TcpConnection, TcpServer, ThreadPool
from cppnp.cli.common import add_server_options, int_range, listen, serve_until_signal

log = logging.getLogger("cppnp.cli.echo")

FIB_MAX = 60  # fib(60) already takes hours per message; more is surely a typo


class EchoHandler(ICppnpUsr):
    """RFC 862 on the loop thread: whatever arrives is sent back."""

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        conn.send(buf.retrieve_all())


class DiscardHandler(ICppnpUsr):
    """RFC 863: reads and throws away everything, counting it."""

    def __init__(self) -> None:
        self.discarded = 0

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.discarded += len(buf)
        buf.retrieve(len(buf))


class DaytimeHandler(ICppnpUsr):
    """RFC 867: one line with the date and time, then a half-close."""

    def on_connection(self, conn: TcpConnection) -> None:
        conn.send(time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n"))
        conn.shutdown()


def fib(n: int) -> int:
    """Deliberately slow recursive Fibonacci: the seed's stand-in for CPU work."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class EchoServer(ICppnpUsr, IRun2):
    """The seed's EchoServer: on_message (loop thread) hands each message to the pool;
    run2 (a worker) computes fib(n) and sends the message back through the loop."""

    def __init__(self, pool: ThreadPool, fib_n: int = 30) -> None:
        self.pool = pool
        self.fib_n = fib_n

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        # The connection is the Task's param: the pool counts the task on it (the
        # connection outlives it) and runs one connection's tasks in order.
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))

    def run2(self, msg: bytes, param: TcpConnection) -> None:
        if self.fib_n > 0:
            result = fib(self.fib_n)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("fib(%d) = %d on thread %d", self.fib_n, result, threading.get_ident())
        param.send(msg)  # queued to the loop thread (the seed's Send -> QueueLoop)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (main thread)."""
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(threadName)s %(message)s")
    if args.command == "echo" and args.processes > 1:
        return serve_echo(
            args.host, args.port, processes=args.processes, threads=args.threads, fib=args.fib
        )
    pool = None
    handler: Any
    with EventLoop() as loop:
        if args.command == "echo" and (args.threads > 0 or args.fib > 0):
            pool = ThreadPool(args.threads, name="worker")
            pool.start()
            handler = EchoServer(pool, args.fib)
        else:
            handler = {"echo": EchoHandler, "discard": DiscardHandler, "daytime": DaytimeHandler}[
                args.command
            ]()
        try:
            server = listen(
                loop, args.host, args.port, handler, name=args.command, reuse_port=args.reuse_port
            )
        except BaseException:
            if pool is not None:
                pool.stop(drain=False)
            raise
        return serve_until_signal(loop, server, pool)


def add_parsers(sub: Any) -> None:
    """Register echo, discard and daytime."""
    for name, text in (
        ("echo", "echo server (RFC 862); with --threads/--fib, the seed's worker pool"),
        ("discard", "discard server (RFC 863)"),
        ("daytime", "daytime server (RFC 867)"),
    ):
        sp = sub.add_parser(name, help=text, description=text)
        add_server_options(sp)
        if name == "echo":
            sp.add_argument(
                "--threads",
                type=int_range("threads", 0),
                default=0,
                metavar="N",
                help="worker threads; 0 = single-thread mode, the seed's "
                "tasks run on the loop thread (default: %(default)s)",
            )
            sp.add_argument(
                "--fib",
                type=int_range("fib", 0, FIB_MAX),
                default=0,
                metavar="N",
                help="compute fib(N), 0..%d, per message in the worker, the "
                "seed's CPU work; 0 = none, echo only (default: %%(default)s)" % FIB_MAX,
            )
            sp.add_argument(
                "--processes",
                type=int_range("processes", 1, 1024),
                default=1,
                metavar="N",
                help="prefork: N child processes share the port (SO_REUSEPORT), each with "
                "its own loop and pool; the parent restarts a child that dies and drains "
                "all on SIGTERM/SIGINT (default: %(default)s)",
            )
        sp.set_defaults(func=run)


def serve_echo(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    processes: int = 1,
    threads: int = 0,
    fib: int = 0,
    drain_timeout: float = 30.0,
    out: TextIO | None = None,
) -> int:
    """``cppnp echo --processes N``: the echo server (``threads``/``fib`` as in the CLI: the
    seed's pool) in *processes* prefork children on one port.

    Port 0 reserves a free port first.  Prints ``listening on HOST:PORT`` and
    ``children: PID ...`` to *out* (default stdout) once every child listens; returns the
    exit status (EXIT_BOOT_FAILED with the reason on stderr when it cannot start).

    Main thread only.
    """
    from cppnp.prefork import EXIT_BOOT_FAILED, PreforkError, Supervisor, reserve_port, serve

    out = sys.stdout if out is None else out
    reserved = reserve_port(host, port) if port == 0 else None
    if reserved is not None:
        port = reserved.getsockname()[1]

    def make_server(loop: EventLoop) -> list[Any]:
        if threads > 0 or fib > 0:
            pool = ThreadPool(threads, name="worker")
            pool.start()
            server = TcpServer(
                loop, (host, port), EchoServer(pool, fib), name="echo", reuse_port=True
            )
            return [server, pool]
        return [TcpServer(loop, (host, port), EchoHandler(), name="echo", reuse_port=True)]

    def on_ready(sup: Supervisor) -> None:
        h, p = (sup.address or [[host, port]])[0][:2]
        print("listening on %s:%d" % (h, p), file=out, flush=True)
        print("children: %s" % " ".join(str(pid) for pid in sup.pids), file=out, flush=True)

    try:
        return serve(
            make_server, processes=processes, drain_timeout=drain_timeout, on_ready=on_ready
        )
    except PreforkError as exc:
        print("cppnp echo: %s" % exc, file=sys.stderr, flush=True)
        return EXIT_BOOT_FAILED
    finally:
        if reserved is not None:
            reserved.close()
