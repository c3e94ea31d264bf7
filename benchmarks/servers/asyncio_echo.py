"""Reference echo server on asyncio (or uvloop) for the cppnp benchmarks.

Modes:

* plain: ``data_received`` writes the chunk straight back.
* ``--fib K`` without ``--executor``: compute fib(K) inline before echoing.
* ``--executor N``: the seed's design done the asyncio way. ``data_received`` hands
  each chunk to ``loop.run_in_executor(ThreadPoolExecutor(N), work, data)``; the
  future's done-callback writes the result if the transport is not closing.
  ``work`` computes fib(K) (recursive Python) when ``--fib K`` > 0, then returns the
  chunk. Results are written in arrival order: with N > 1 two chunks of one
  connection can finish out of order, and an echo server must not reorder bytes
  (the load generator would report a mismatch), so each connection keeps a FIFO
  of its futures and writes from the head while the head is done.

Prints ``listening on HOST:PORT`` (flushed) when ready; runs until SIGINT/SIGTERM.
Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import resource
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import cast

LOOPBACK = ("127.0.0.1", "::1")


def fib(k: int) -> int:
    """Deliberately slow recursive Fibonacci: the per-message CPU work."""
    return k if k < 2 else fib(k - 1) + fib(k - 2)


def make_work(k: int) -> Callable[[bytes], bytes]:
    """Return ``work(data) -> data`` that burns fib(*k*) first (nothing if k == 0)."""
    if k <= 0:
        return lambda data: data

    def work(data: bytes) -> bytes:
        fib(k)
        return data

    return work


class EchoProtocol(asyncio.Protocol):
    """Echo each chunk back, optionally after inline work."""

    def __init__(self, work: Callable[[bytes], bytes] | None) -> None:
        self._work = work
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        if self._work is not None:
            data = self._work(data)
        self._transport.write(data)


class ExecutorEchoProtocol(asyncio.Protocol):
    """Echo each chunk after running ``work`` in a thread pool; writes keep chunk order."""

    def __init__(self, pool: Executor, work: Callable[[bytes], bytes]) -> None:
        self._pool = pool
        self._work = work
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending: collections.deque[asyncio.Future[bytes]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack alike.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        fut = self._loop.run_in_executor(self._pool, self._work, data)
        self._pending.append(fut)
        fut.add_done_callback(self._on_done)

    def _on_done(self, _fut: asyncio.Future[bytes]) -> None:
        transport = self._transport
        pending = self._pending
        while pending and pending[0].done():
            fut = pending.popleft()
            if fut.cancelled() or transport is None or transport.is_closing():
                continue
            exc = fut.exception()
            if exc is not None:
                print(f"work failed: {exc!r}", file=sys.stderr)
                transport.close()
                return
            transport.write(fut.result())


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (idle-connection benchmark)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


async def serve(args: argparse.Namespace) -> None:
    """Listen, announce the port, and serve until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    pool: ThreadPoolExecutor | None = None
    factory: Callable[[], asyncio.Protocol]
    if args.executor > 0:
        pool = ThreadPoolExecutor(max_workers=args.executor, thread_name_prefix="echo-work")
        work = make_work(args.fib)
        executor = pool

        def factory() -> asyncio.Protocol:
            return ExecutorEchoProtocol(executor, work)

    else:
        inline = make_work(args.fib) if args.fib > 0 else None

        def factory() -> asyncio.Protocol:
            return EchoProtocol(inline)

    server = await loop.create_server(
        factory, args.host, args.port, backlog=4096, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {args.host}:{port}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", choices=LOOPBACK)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument(
        "--executor",
        type=int,
        default=0,
        metavar="N",
        help="do the work in a ThreadPoolExecutor(N) (0 = on the loop)",
    )
    parser.add_argument(
        "--fib",
        type=int,
        default=0,
        metavar="K",
        help="compute fib(K) per received chunk (0 = no work)",
    )
    args = parser.parse_args(argv)
    raise_nofile_limit()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
