"""The ``wsgi`` command: ``python -m cppnp.wsgi module:app [options]``.

``add_arguments(parser)`` adds the options to any argparse parser (the ``cppnp wsgi``
subcommand uses it); ``main(argv)`` parses and serves.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from typing import Any

from cppnp.wsgi.config import HELP, Config

__all__ = ["add_arguments", "load_app", "main", "run"]


def load_app(spec: str) -> Any:
    """Import ``module:attr`` (``module`` alone means ``module:app``, then
    ``module:application``; ``module:factory()`` calls a no-argument factory)."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ValueError("expected module:app, got %r" % (spec,))
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    names = [attr] if attr else ["app", "application"]
    for name in names:
        obj: Any = module
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if call:
            obj = obj()
        if not callable(obj):
            raise TypeError("%s is not callable" % (spec,))
        return obj
    raise AttributeError("module %r has no attribute %s" % (module_name, " or ".join(names)))


def _processes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError("expected an int from 1 to 1024, got %r" % (text,))
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the wsgi options (each documented with its default) to *parser*."""
    defaults = Config()
    parser.add_argument(
        "app", help="the WSGI application: module:attr (module:factory() calls a factory)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--unix",
        default=None,
        metavar="PATH",
        help="serve on this Unix socket path instead of --host/--port (a leading '@' "
        "means the abstract namespace); a stale socket file is replaced, a live one "
        "refused, the file removed on exit (default: none)",
    )
    parser.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N",
        help="prefork: N processes serve the port (SO_REUSEPORT), each with its own loop "
        "and --threads workers; a child that dies is restarted, SIGTERM drains them all "
        "(default: %(default)s: one process, no supervisor)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of the 'cppnp' loggers on stderr (default: %(default)s)",
    )
    for f in dataclasses.fields(Config):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = HELP.get(f.name, "")
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                default=default,
                action=argparse.BooleanOptionalAction,
                help=text + " (default: %s)" % ("on" if default else "off"),
            )
        else:
            kind = type(default)
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=default,
                metavar=kind.__name__.upper(),
                help=text + " (default: %(default)s)",
            )


def run(args: argparse.Namespace) -> int:
    """Serve with parsed *args* (from a parser set up by add_arguments)."""
    from cppnp.wsgi.server import serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("cppnp.wsgi.access").setLevel(
        logging.INFO if args.access_log else logging.WARNING
    )
    app = load_app(args.app)
    options = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if f.name != "extra" and hasattr(args, f.name)
    }
    threads = options.pop("threads")
    processes = getattr(args, "processes", 1)
    unix = getattr(args, "unix", None)
    if unix is not None:
        if processes > 1:
            logging.getLogger("cppnp.wsgi").error("cannot serve: --unix needs --processes 1")
            return 2
        path = "\0" + unix[1:] if unix.startswith("@") else unix
        return serve(app, args.host, args.port, threads=threads, unix=path, **options)
    if processes > 1:
        from cppnp.prefork import EXIT_BOOT_FAILED, PreforkError

        try:
            return serve(app, args.host, args.port, threads=threads, processes=processes, **options)
        except PreforkError as exc:
            logging.getLogger("cppnp.wsgi").error("cannot serve: %s", exc)
            return EXIT_BOOT_FAILED
    return serve(app, args.host, args.port, threads=threads, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cppnp.wsgi",
        description="Serve a WSGI application with cppnp: HTTP/1.1, the app on a worker "
        "pool, the I/O on one loop thread (or --io-threads N loops).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
