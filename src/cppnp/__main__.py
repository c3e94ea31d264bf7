"""Command line: ``python -m cppnp {demo,echo,discard,daytime,timers}``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType


def _serve(args: argparse.Namespace) -> int:
    from cppnp import EventLoop, ThreadPool
    from cppnp.examples import daytime, discard, echo
    from cppnp.examples.seed_echo import EchoServer

    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(threadName)s %(message)s")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    pool = None
    with EventLoop() as loop:
        if args.cmd == "echo" and (args.threads > 0 or args.fib > 0):
            from cppnp import TcpServer

            pool = ThreadPool(args.threads, name="worker")
            pool.start()
            server = TcpServer(loop, (args.host, args.port), EchoServer(pool, args.fib),
                               name="echo", reuse_port=args.reuse_port)
            server.start()
        else:
            module = {"echo": echo, "discard": discard, "daytime": daytime}[args.cmd]
            server = module.serve(loop, args.host, args.port)
        host, port = server.address
        print("listening on %s:%d" % (host, port), flush=True)
        try:
            loop.loop()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            server.stop()
            if pool is not None:
                pool.stop(drain=False)
    return 0


def _timers(args: argparse.Namespace) -> int:
    from cppnp import EventLoop
    from cppnp.examples import timers

    with EventLoop() as loop:
        for line in timers.run(loop):
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cppnp`` and the ``cppnp`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from cppnp.examples import demo

        return demo.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m cppnp")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="the main job: seed echo server + built-in client")
    for name, text in (("echo", "echo server (RFC 862); --threads/--fib: the seed's pool"),
                       ("discard", "discard server (RFC 863)"),
                       ("daytime", "daytime server (RFC 867)")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=9000)
        sp.add_argument("--reuse-port", action="store_true")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name == "echo":
            sp.add_argument("--threads", type=int, default=0,
                            help="worker threads (0: single-thread mode)")
            sp.add_argument("--fib", type=int, default=0, help="fib(n) per message (0: none)")
        sp.set_defaults(func=_serve)
    sub.add_parser("timers", help="timer demo").set_defaults(func=_timers)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
