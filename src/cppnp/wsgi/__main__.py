"""``python -m cppnp.wsgi module:app``."""

from cppnp.wsgi.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
