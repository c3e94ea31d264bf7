"""cppnp.wsgi: an HTTP/1.1 WSGI server on the cppnp reactor (an application of the library).

Serve a Flask app in one line::

    python -m cppnp.wsgi myapp:app --threads 8          # or: cppnp wsgi myapp:app

or from Python: ``cppnp.wsgi.serve(app, "127.0.0.1", 8000, threads=8)``.  Needs httptools
(``pip install 'cppnp[wsgi]'``).  The library never imports this package.
"""

from cppnp.wsgi.config import Config
from cppnp.wsgi.response import FileWrapper
from cppnp.wsgi.server import WsgiServer, serve

__all__ = ["Config", "FileWrapper", "WsgiServer", "serve"]
