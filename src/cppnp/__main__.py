"""``python -m cppnp``: the command line (see cppnp.cli)."""

import sys

from cppnp.cli import main

if __name__ == "__main__":
    sys.exit(main())
