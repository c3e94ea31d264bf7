"""``cppnp wsgi module:app``: serve a WSGI application (the cppnp.wsgi application)."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> int:
    from cppnp.cli.common import EXIT_USAGE, CliError
    from cppnp.wsgi.cli import load_app
    from cppnp.wsgi.cli import run as run_wsgi

    try:
        load_app(args.app)  # a bad module:app is a usage error, before anything binds
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise CliError("cannot load %r: %s" % (args.app, exc), EXIT_USAGE) from None
    try:
        return run_wsgi(args)
    except OSError as exc:
        unix = getattr(args, "unix", None)
        where = "unix:%s" % unix if unix is not None else "%s:%s" % (args.host, args.port)
        raise CliError("%s: %s" % (where, exc.strerror or exc), 1) from None


def add_parsers(sub: Any) -> None:
    """Register ``wsgi``."""
    from cppnp.wsgi.cli import add_arguments

    text = "serve a WSGI application: HTTP/1.1, the app on a worker pool (cppnp.wsgi)"
    p = sub.add_parser("wsgi", help=text, description=text)
    add_arguments(p)
    p.set_defaults(func=run)
