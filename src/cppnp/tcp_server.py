"""TcpServer: listens on (host, port) and serves connections with an ICppnpUsr."""

from _core.tcp_server import TcpServer

__all__ = ["TcpServer"]
