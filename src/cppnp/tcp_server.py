"""TcpServer: listens on (host, port) and serves connections with an ICppnpUsr.

``TcpServer(loop, address, handler, io_threads=N)``: with N > 0 the server's *loop* only
accepts, and each connection is served for its whole life by one of N io loop threads
(the one with the fewest connections; ``conn.loop`` is that loop), so the handler's
callbacks run on N threads at once.  ``io_threads=0`` (the default) serves everything on
*loop*.  See ``TcpServer.__doc__`` for the thread contract.
"""

from _core.tcp_server import TcpServer

__all__ = ["TcpServer"]
