"""TcpClient: connects to (host, port) and serves the connection with an ICppnpUsr.

``TcpClient(loop, address, handler, retry=True, ...)``: ``connect()`` starts a
non-blocking connect on *loop* (names resolved off the loop thread), retried with
exponential backoff and jitter; the connection is an ordinary TcpConnection.  See
``TcpClient.__doc__`` for the thread contract.
"""

from _core.tcp_client import TcpClient

__all__ = ["TcpClient"]
