"""The ``cppnp`` command line (also ``python -m cppnp``): an application built on cppnp.

Each subcommand lives in a module of this package that defines ``add_parsers(sub)``; the
module registers its subcommand(s) with ``set_defaults(func=run)``, where ``run(args)``
returns the exit status.  To add one, write the module and list it in ``COMMANDS``.
The library (``cppnp`` and ``_core``) never imports this package.
"""

from __future__ import annotations

import importlib
import sys

from cppnp.cli.common import CliError, CliParser, program_name

__all__ = ["COMMANDS", "main"]

#: The modules that register subcommands, in the order ``--help`` lists them.
COMMANDS = (
    "cppnp.cli.demo",
    "cppnp.cli.servers",
    "cppnp.cli.timers",
    "cppnp.cli.wsgi",
)


def build_parser(prog: str) -> CliParser:
    """The argument parser with every subcommand of COMMANDS."""
    parser = CliParser(
        prog=prog,
        description="cppnp: a muduo-style reactor networking library; runnable servers and demos.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cppnp`` and the ``cppnp`` script; returns the exit status.

    A bad command line prints one line on stderr and returns 2; a runtime failure (port in
    use, unknown host) prints one line and returns 1.
    """
    prog = program_name()
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        sys.stderr.write("%s %s: %s\n" % (prog, args.command, exc))
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
